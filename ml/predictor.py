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
from ml.labels import Span, spans_to_tags
from ml.model import Tagger
from ml.modules.scripting import script as compile_script
from ml.vocab import Vocabularies
from ml.windows import PieceResult, group_texts, plan, stitch, window_tokens


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
    """Wraps a Tagger in eval mode with its vocabularies; ``load`` reads a model folder.

    Every forward pass is one window of ``ml.windows.plan``: with ``document`` context the
    sentences of one text share windows (as in training), and no window exceeds ``window_tokens``
    tokens (a longer sentence is split into overlapping windows and stitched)."""

    def __init__(
        self,
        model: Union[Tagger, torch.jit.ScriptModule],
        vocab: Vocabularies,
        max_word_length: int,
        device: str | torch.device = "cpu",
        loaded: Optional[LoadedModel] = None,
        window_tokens: int = 256,
        document: bool = False,
        fast: Optional[FastTagger] = None,
    ):
        self.model = model
        self.fast = fast  # the CPU path (ml.fast): a snapshot of the weights, so only for loaded models
        self.vocab = vocab
        self.max_word_length = max_word_length
        self.device = torch.device(device)
        self.loaded = loaded  # the folder's config, meta and metrics, when loaded from one
        self.labels = entity_types(vocab)
        self.window_tokens = window_tokens
        self.document = document
        self.scheme = loaded.config.model.tag_scheme if loaded is not None else _scheme_of(vocab)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", script: bool = True, backend: str | None = None, fast: Optional[bool] = None,
             mapped_cache: Optional[Path] = None) -> Predictor:
        """Load a model folder for inference. With ``fast`` (the default on a CPU) the forward passes
        run through ``ml.fast.FastTagger``: the same weights, torch.nn's fused recurrence, cached
        token features and a numpy CRF (docs/model.md, The CPU inference path). Otherwise, with ``script`` (and the
        scripted recurrence) the whole Tagger is compiled with TorchScript, so the CRF's loops run
        without the Python interpreter too. ``backend`` overrides the folder's recurrence backend.
        ``mapped_cache``: the word table mapped from a cache file there, shared between processes (ml.mapped)."""
        loaded = load_model(path, device, backend, mapped_cache)
        model: Union[Tagger, torch.jit.ScriptModule] = loaded.model
        mc = loaded.config.model
        if fast is None:
            fast = torch.device(device).type == "cpu"
        engine = FastTagger(loaded.model, loaded.vocab, mc.max_word_length) if fast else None
        if script and mc.backend == "script":
            model = compile_script(model)
        return cls(model, loaded.vocab, mc.max_word_length, device, loaded, mc.window_tokens, mc.context == "document", engine)

    def predict(self, token_lists: Sequence[Sequence[str]], batch_size: int = 64) -> List[TaggedSentence]:
        """Tag sentences (lists of token strings), each on its own (no text around it). The results
        come back in the input order."""
        if isinstance(token_lists, (str, bytes)):
            raise TypeError("predict takes a list of token lists, not a string")
        return [r for text in self.predict_texts([[tokens] for tokens in token_lists], batch_size) for r in text]

    @torch.inference_mode()
    def predict_texts(self, texts: Sequence[Sequence[Sequence[str]]], batch_size: int = 64) -> List[List[TaggedSentence]]:
        """Tag texts, each a list of sentences (lists of token strings): one result per sentence,
        grouped as the input. With document context the sentences of a text are read together;
        windows are grouped by length so that little padding is computed."""
        if isinstance(texts, (str, bytes)):
            raise TypeError("predict_texts takes a list of texts, each a list of token lists")
        flat: List[Sequence[str]] = []
        for t, sentences in enumerate(texts):
            if isinstance(sentences, (str, bytes)):
                raise TypeError(f"text {t} is a string; give a list of token lists")
            for i, tokens in enumerate(sentences):
                if isinstance(tokens, (str, bytes)):
                    raise TypeError(f"text {t}, sentence {i} is a string; give a list of token strings")
                if not tokens:
                    raise ValueError(f"sentence {len(flat)} has no tokens (text {t}, sentence {i})")
                flat.append(tokens)
        windows = plan([[len(s) for s in sentences] for sentences in texts], self.window_tokens, self.document)
        order = sorted(range(len(windows)), key=lambda i: windows[i].length)
        parts: List[List[PieceResult]] = [[] for _ in flat]
        if self.fast is None and self.model.training:
            self.model.eval()  # (a ScriptModule's eval() walks every submodule: not on every call)
        itos = self.vocab.tags.itos
        for lo in range(0, len(order), batch_size):
            chunk = [windows[i] for i in order[lo : lo + batch_size]]
            tag_ids, scores = self._tag_batch([window_tokens(w, flat) for w in chunk])
            for row, w in enumerate(chunk):
                for p in w.pieces:
                    lo_, hi_ = p.offset, p.offset + p.end - p.start
                    parts[p.sentence].append(PieceResult(p, [itos[k] for k in tag_ids[row][lo_:hi_]], scores[row][lo_:hi_]))
        results: List[TaggedSentence] = []
        for tokens, pieces in zip(flat, parts, strict=True):
            pieces.sort(key=lambda r: r.piece.start)
            spans, probs, tags = stitch(len(tokens), pieces)
            if tags is None:
                tags = spans_to_tags(spans, len(tokens), self.scheme)
            scored = [ScoredSpan(s.start, s.end, s.label, sum(probs[s.start : s.end]) / (s.end - s.start)) for s in spans]
            results.append(TaggedSentence(tags, probs, scored))
        out: List[List[TaggedSentence]] = []
        k = 0
        for sentences in texts:
            out.append(results[k : k + len(sentences)])
            k += len(sentences)
        return out

    def _tag_batch(self, token_lists: Sequence[Sequence[str]]) -> Tuple[List[List[int]], List[List[float]]]:
        """Tag ids and chosen-tag marginals per window (lists, possibly padded past its end)."""
        if self.fast is not None:
            try:
                decoded = self.fast(token_lists)
                return [t.tolist() for t in decoded.tags], [p.tolist() for p in decoded.scores]
            except FastPathUnderflow:
                pass  # extreme emissions: the model's own log-space CRF below
        batch = tensorize(token_lists, self.vocab, self.max_word_length).to(self.device)
        tag_ids, scores = self.model(*batch.inputs)
        return tag_ids.tolist(), scores.tolist()


def _scheme_of(vocab: Vocabularies) -> str:
    return "bioes" if any(t[:2] in ("E-", "S-") for t in vocab.tags.itos) else "iob2"


def evaluate(predictor: Predictor, sentences: Sequence[Example], batch_size: int = 256) -> Scores:
    """Entity-level scores of the predictor on gold sentences, plus token and sentence counts.
    Consecutive sentences of one document (``doc_id``) are tagged as one text."""
    groups = group_texts([getattr(s, "doc_id", None) for s in sentences])
    results = [r for text in predictor.predict_texts([[sentences[i].tokens for i in g] for g in groups], batch_size) for r in text]
    scores = entity_scores([s.spans for s in sentences], [[Span(p.start, p.end, p.label) for p in r.spans] for r in results])
    scores.tokens = sum(len(s.tokens) for s in sentences)
    gold_tags = [spans_to_tags(s.spans, len(s.tokens), "iob2") for s in sentences]
    pred_tags = [spans_to_tags([Span(p.start, p.end, p.label) for p in r.spans], len(r.tags), "iob2") for r in results]
    correct = sum(g == p for gs, ps in zip(gold_tags, pred_tags, strict=True) for g, p in zip(gs, ps, strict=True))
    scores.token_accuracy = correct / scores.tokens if scores.tokens else 0.0
    return scores
