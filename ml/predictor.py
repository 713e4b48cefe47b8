"""From token lists to tags, token scores and scored entity spans (token indices).

The predictor computes; presenting (character offsets, JSON) is the caller's job."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Union

import torch

from ml.artifact import LoadedModel, entity_types, load_model
from ml.data import Example
from ml.data.tensorize import tensorize
from ml.evaluate import Scores, entity_scores
from ml.labels import Span, lenient_spans, spans_to_tags
from ml.model import Tagger
from ml.vocab import Vocabularies


class ScoredSpan(NamedTuple):
    start: int
    end: int
    label: str
    score: float  # mean marginal probability of the span's tags


@dataclass
class TaggedSentence:
    tags: List[str]
    scores: List[float]  # marginal probability of each chosen tag
    spans: List[ScoredSpan]


class Predictor:
    """Wraps a Tagger in eval mode with its vocabularies; ``load`` reads a model folder."""

    def __init__(self, model: Union[Tagger, torch.jit.ScriptModule], vocab: Vocabularies, max_word_length: int, device: str | torch.device = "cpu", loaded: Optional[LoadedModel] = None):
        self.model = model
        self.vocab = vocab
        self.max_word_length = max_word_length
        self.device = torch.device(device)
        self.loaded = loaded  # the folder's config, meta and metrics, when loaded from one
        self.labels = entity_types(vocab)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", script: bool = True) -> Predictor:
        """Load a model folder for inference. With ``script`` (and the scripted recurrence) the whole
        Tagger is compiled with TorchScript, so the CRF's loops run without the Python interpreter
        too (see README, Performance)."""
        loaded = load_model(path, device)
        model: Union[Tagger, torch.jit.ScriptModule] = loaded.model
        if script and loaded.config.model.backend == "script":
            model = torch.jit.script(model)
        return cls(model, loaded.vocab, loaded.config.model.max_word_length, device, loaded)

    @torch.inference_mode()
    def predict(self, token_lists: Sequence[Sequence[str]], batch_size: int = 64) -> List[TaggedSentence]:
        """Tag sentences (lists of token strings). Sentences are grouped by length so that little
        padding is computed; the results come back in the input order."""
        if isinstance(token_lists, (str, bytes)):
            raise TypeError("predict takes a list of token lists, not a string")
        for i, tokens in enumerate(token_lists):
            if not tokens:
                raise ValueError(f"sentence {i} has no tokens")
        order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
        results: List[Optional[TaggedSentence]] = [None] * len(token_lists)
        self.model.eval()
        itos = self.vocab.tags.itos
        for lo in range(0, len(order), batch_size):
            chunk = order[lo : lo + batch_size]
            batch = tensorize([token_lists[i] for i in chunk], self.vocab, self.max_word_length).to(self.device)
            tag_ids, scores = self.model(*batch.inputs)
            tag_ids, scores = tag_ids.tolist(), scores.tolist()
            for row, i in enumerate(chunk):
                n = len(token_lists[i])
                tags = [itos[k] for k in tag_ids[row][:n]]
                probs = scores[row][:n]
                spans = [ScoredSpan(s.start, s.end, s.label, sum(probs[s.start : s.end]) / (s.end - s.start)) for s in lenient_spans(tags)]
                results[i] = TaggedSentence(tags, probs, spans)
        return results  # type: ignore[return-value]


def evaluate(predictor: Predictor, sentences: Sequence[Example], batch_size: int = 256) -> Scores:
    """Entity-level scores of the predictor on gold sentences, plus token and sentence counts."""
    results = predictor.predict([s.tokens for s in sentences], batch_size)
    scores = entity_scores([s.spans for s in sentences], [[Span(p.start, p.end, p.label) for p in r.spans] for r in results])
    scores.tokens = sum(len(s.tokens) for s in sentences)
    gold_tags = [spans_to_tags(s.spans, len(s.tokens), "iob2") for s in sentences]
    pred_tags = [spans_to_tags([Span(p.start, p.end, p.label) for p in r.spans], len(r.tags), "iob2") for r in results]
    correct = sum(g == p for gs, ps in zip(gold_tags, pred_tags, strict=True) for g, p in zip(gs, ps, strict=True))
    scores.token_accuracy = correct / scores.tokens if scores.tokens else 0.0
    return scores
