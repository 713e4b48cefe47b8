"""Text in, entities with character offsets out: tokenizer -> sentences -> predictor -> spans.

Used by ``ner predict`` and by the service, so both present the same offsets. Offsets are Python
string indices into the text as given, so ``text[start:end] == entity.text`` always holds."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ml.data.tokenizer import Tokenizer, get_tokenizer
from ml.labels import Span, spans_to_tags
from ml.predictor import Predictor


@dataclass
class Entity:
    start: int
    end: int
    label: str
    text: str
    score: float


@dataclass
class TokenTag:
    text: str
    start: int
    end: int
    tag: str  # IOB2, from the decoded entities
    score: float  # marginal probability of the model's tag at this token


@dataclass
class TextResult:
    entities: list[Entity]
    tokens: list[TokenTag]
    sentences: int


class TextTagger:
    def __init__(self, predictor: Predictor, tokenizer: Tokenizer | None = None):
        self.predictor = predictor
        language = predictor.loaded.meta.language if predictor.loaded is not None else "en"
        self.tokenizer = tokenizer or get_tokenizer(language)

    def tag(self, texts: Sequence[str], batch_size: int = 64) -> list[TextResult]:
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
            results.append(TextResult(entities, tokens, len(sents)))
        return results


def entity_dicts(result: TextResult) -> list[dict]:
    """The entities of a result as the service answers and ``ner bulk`` writes them (scores to 6 places)."""
    return [{"start": e.start, "end": e.end, "label": e.label, "text": e.text, "score": round(e.score, 6)} for e in result.entities]


def min_token_score(result: TextResult) -> float:
    """The lowest token score of a result (1.0 without tokens): the annotation queue's confidence."""
    return min((t.score for t in result.tokens), default=1.0)
