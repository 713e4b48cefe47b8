"""Text in, entities with character offsets out: tokenizer -> sentences -> predictor -> spans.

Used by ``ner predict`` and by the service, so both present the same offsets. Offsets are Python
string indices into the text as given, so ``text[start:end] == entity.text`` always holds."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ml.data.tokenizer import Tokenizer, get_tokenizer
from ml.labels import Span, spans_to_tags
from ml.predictor import Predictor
from ml.rules import RULE_SCORE, EntityFilter, Found, Merged, RuleSet, merge


@dataclass
class Entity:
    start: int
    end: int
    label: str
    text: str
    score: float  # the model's mean tag marginal; ml.rules.RULE_SCORE for a rule's entity
    source: str = "model"  # or "rule"
    rule_id: int | None = None  # the rule that made it (source "rule")


@dataclass
class TokenTag:
    text: str
    start: int
    end: int
    tag: str  # IOB2, from the decoded entities (and the rules' entities)
    score: float  # marginal probability of the model's tag at this token (RULE_SCORE inside a rule's entity)


@dataclass
class TextResult:
    entities: list[Entity]
    tokens: list[TokenTag]
    sentences: int
    rules: Merged | None = field(default=None, repr=False)  # what the rules did (None: no rules applied)


class TextTagger:
    def __init__(self, predictor: Predictor, tokenizer: Tokenizer | None = None):
        self.predictor = predictor
        language = predictor.loaded.meta.language if predictor.loaded is not None else "en"
        self.tokenizer = tokenizer or get_tokenizer(language)

    def tag(self, texts: Sequence[str], batch_size: int = 64, rules: RuleSet | None = None) -> list[TextResult]:
        """Tag texts; with ``rules``, the rule set is applied to each text after the model (ml.rules)."""
        per_text = self.tokenizer.pipe_sentences(texts)
        # the sentences of one text are tagged together (document context, ml.windows)
        grouped = self.predictor.predict_texts([[[t.text for t in s] for s in sents] for sents in per_text], batch_size)
        predictions = [p for text in grouped for p in text]
        results: list[TextResult] = []
        k = 0
        for text, sents in zip(texts, per_text, strict=True):
            entities: list[Entity] = []
            tokens: list[TokenTag] = []
            for sent in sents:
                pred = predictions[k]
                k += 1
                for span in pred.spans:
                    start, end = sent[span.start].start, sent[span.end - 1].end
                    entities.append(Entity(start, end, span.label, text[start:end], span.score))
                iob = spans_to_tags([Span(s.start, s.end, s.label) for s in pred.spans], len(sent), "iob2")
                tokens.extend(TokenTag(tok.text, tok.start, tok.end, tag, score) for tok, tag, score in zip(sent, iob, pred.scores, strict=True))
            result = TextResult(entities, tokens, len(sents))
            results.append(apply_rules(text, result, rules) if rules is not None and len(rules) else result)
        return results


def apply_rules(text: str, result: TextResult, rules: RuleSet) -> TextResult:
    """``result`` with the rule set applied: rule matches over the text's tokens (across its
    sentences), merged with the model's entities by the set's mode; token tags follow the merged
    entities and a rule entity's tokens score RULE_SCORE."""
    words = [t.text for t in result.tokens]
    matches = rules.match(words)
    if not matches:  # the common case: nothing to merge, the model's result as it is
        return TextResult(result.entities, result.tokens, result.sentences, Merged([]))
    index_of = {t.start: i for i, t in enumerate(result.tokens)}
    after = {t.end: i + 1 for i, t in enumerate(result.tokens)}
    model = [Found(index_of[e.start], after[e.end], e.label, e.score) for e in result.entities]
    merged = merge(model, matches, rules.mode)
    by_span = {(index_of[e.start], e.label): e for e in result.entities}
    entities: list[Entity] = []
    for f in merged.entities:
        if f.source == "model":
            entities.append(by_span[(f.start, f.label)])
        else:
            start, end = result.tokens[f.start].start, result.tokens[f.end - 1].end
            entities.append(Entity(start, end, f.label, text[start:end], f.score, "rule", f.rule_id))
    tags = spans_to_tags([Span(f.start, f.end, f.label) for f in merged.entities], len(words), "iob2")
    in_rule = [False] * len(words)
    for f in merged.entities:
        if f.source == "rule":
            in_rule[f.start : f.end] = [True] * (f.end - f.start)
    # a new TokenTag only where the rules changed the tag or the score: most tokens keep theirs
    tokens = [
        t if tag == t.tag and not ruled else TokenTag(t.text, t.start, t.end, tag, RULE_SCORE if ruled else t.score)
        for t, tag, ruled in zip(result.tokens, tags, in_rule, strict=True)
    ]
    return TextResult(entities, tokens, result.sentences, merged)


def entity_dicts(result: TextResult, keep: EntityFilter | None = None) -> list[dict]:
    """The entities of a result as the service answers and ``ner bulk`` writes them (scores to 6
    places, where each came from), those ``keep`` keeps."""
    return [
        {"start": e.start, "end": e.end, "label": e.label, "text": e.text, "score": round(e.score, 6), "source": e.source, "rule_id": e.rule_id}
        for e in result.entities
        if keep is None or keep.keep(e.label, e.score)
    ]


def min_token_score(result: TextResult) -> float:
    """The lowest token score of a result (1.0 without tokens): the annotation queue's confidence."""
    return min((t.score for t in result.tokens), default=1.0)
