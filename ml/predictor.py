"""From token lists to tags, token scores and scored entity spans (token indices).

The predictor computes; presenting (character offsets, JSON) is the caller's job."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from ml.artifact import LoadedModel, entity_types, load_model
from ml.data import Example
from ml.data.tensorize import tensorize
from ml.evaluate import Scores, entity_scores
from ml.fast import FastPathUnderflow, FastTagger
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

    def __init__(self, model: Union[Tagger, torch.jit.ScriptModule], vocab: Vocabularies, max_word_length: int, device: str | torch.device = "cpu", loaded: Optional[LoadedModel] = None, fast: Optional[FastTagger] = None):
        self.model = model
        self.fast = fast  # the CPU path (ml.fast): a snapshot of the weights, so only for loaded models
        self.vocab = vocab
        self.max_word_length = max_word_length
        self.device = torch.device(device)
        self.loaded = loaded  # the folder's config, meta and metrics, when loaded from one
        self.labels = entity_types(vocab)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", script: bool = True, backend: Optional[str] = None, fast: Optional[bool] = None) -> Predictor:
        """Load a model folder for inference. With ``fast`` (the default on a CPU) predictions run
        through ``ml.fast.FastTagger``: the same weights, torch.nn's fused recurrence, cached token
        features and a numpy CRF (see README, Performance). Otherwise, with ``script`` (and the
        scripted recurrence) the whole Tagger is compiled with TorchScript, so the CRF's loops run
        without the Python interpreter too. ``backend`` overrides the folder's recurrence backend."""
        loaded = load_model(path, device, backend)
        model: Union[Tagger, torch.jit.ScriptModule] = loaded.model
        max_word_length = loaded.config.model.max_word_length
        if fast is None:
            fast = torch.device(device).type == "cpu"
        engine = FastTagger(loaded.model, loaded.vocab, max_word_length) if fast else None
        if script and loaded.config.model.backend == "script":
            model = torch.jit.script(model)
        return cls(model, loaded.vocab, max_word_length, device, loaded, engine)

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
        if self.fast is None and self.model.training:
            self.model.eval()  # (a ScriptModule's eval() walks every submodule: not on every call)
        itos = self.vocab.tags.itos
        for lo in range(0, len(order), batch_size):
            chunk = order[lo : lo + batch_size]
            tag_ids, scores = self._tag_batch([token_lists[i] for i in chunk])
            for row, i in enumerate(chunk):
                n = len(token_lists[i])
                tags = [itos[k] for k in tag_ids[row][:n]]
                probs = scores[row][:n]
                spans = [ScoredSpan(s.start, s.end, s.label, sum(probs[s.start : s.end]) / (s.end - s.start)) for s in lenient_spans(tags)]
                results[i] = TaggedSentence(tags, probs, spans)
        return results  # type: ignore[return-value]

    def _tag_batch(self, token_lists: Sequence[Sequence[str]]) -> Tuple[List[List[int]], List[List[float]]]:
        """Tag ids and chosen-tag marginals per sentence (lists, possibly padded past its end)."""
        if self.fast is not None:
            try:
                decoded = self.fast(token_lists)
                return [t.tolist() for t in decoded.tags], [p.tolist() for p in decoded.scores]
            except FastPathUnderflow:
                pass  # extreme emissions: the model's own log-space CRF below
        batch = tensorize(token_lists, self.vocab, self.max_word_length).to(self.device)
        tag_ids, scores = self.model(*batch.inputs)
        return tag_ids.tolist(), scores.tolist()


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
