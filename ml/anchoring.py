"""What keeps a fine-tune near its base model without the base corpus.

* ``RowCorrection``: the word table frozen, a trainable correction for the rows of the words the
  fine-tune sees (the base table has 400,000 GloVe rows; Adam over all of them cost most of a step).
* **Elastic weight consolidation** (Kirkpatrick et al. 2017): ``fisher_information`` measures, once,
  on the base corpus, how much each weight matters to the base model's likelihood (the diagonal of
  the empirical Fisher, per-sentence gradients squared and averaged). ``save_fisher`` writes it into
  the model folder as ``fisher.safetensors``: numbers only, no text, so a folder can ship it where the
  corpus (CoNLL-2003's license forbids redistribution) cannot go. The fine-tune then adds
  ``lambda/2 * sum F (theta - theta_base)^2``, with ``lambda = strength * N_base / N_new``: the
  weighting under which the penalty stands in for the base corpus's own loss term, so a small set of
  corrections moves the weights little and a large one more, as a training on the union would.
* The word table's Fisher is stored per row (mean over the dimensions): ``(words, 1)``.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ml.data import Example
from ml.data.tensorize import tensorize
from ml.labels import spans_to_tags
from ml.model import Tagger
from ml.vocab import PAD_ID, UNK_ID, Vocabularies, word_key

FISHER_FILE = "fisher.safetensors"
MAX_FISHER_BYTES = 1 << 30
WORDS = "word_embedding.weight"


class RowCorrection(nn.Module):
    """``base`` frozen; a trainable correction (len(rows), dim) added to the ids in ``rows``."""

    rows: Tensor  # (R,) the corrected ids, sorted
    slot: Tensor  # (words,) each id's row of the correction, -1 for none

    def __init__(self, base: nn.Embedding, rows: Sequence[int], word_dropout: float = 0.0):
        super().__init__()
        self.word_dropout = word_dropout  # in training, this share of the words is read as <unk>: context and characters must carry the tag
        ids = torch.tensor(sorted(set(rows)), dtype=torch.long)
        if ids.numel() and (int(ids.min()) <= PAD_ID or int(ids.max()) >= base.num_embeddings):
            raise ValueError(f"trainable rows must lie in {PAD_ID + 1}..{base.num_embeddings - 1}")
        base.weight.requires_grad_(False)
        self.base = base
        self.embedding_dim = base.embedding_dim
        slot = torch.full((base.num_embeddings,), -1, dtype=torch.long)
        slot[ids] = torch.arange(ids.numel())
        self.register_buffer("rows", ids, persistent=False)
        self.register_buffer("slot", slot, persistent=False)
        self.correction = nn.Parameter(torch.zeros(ids.numel(), base.embedding_dim, dtype=base.weight.dtype))

    def forward(self, words: Tensor) -> Tensor:
        if self.training and self.word_dropout > 0:
            dropped = (torch.rand(words.shape, device=words.device) < self.word_dropout) & (words != PAD_ID)
            words = torch.where(dropped, torch.full_like(words, UNK_ID), words)
        slots = self.slot[words]
        inside = slots >= 0
        delta = F.embedding(torch.where(inside, slots, torch.zeros_like(slots)), self.correction)
        return self.base(words) + delta * inside.unsqueeze(-1).to(delta.dtype)

    def merged(self) -> nn.Embedding:
        out = nn.Embedding(self.base.num_embeddings, self.embedding_dim, padding_idx=self.base.padding_idx)
        with torch.no_grad():
            out.weight.copy_(self.base.weight)
            out.weight[self.rows] += self.correction
        return out


def attach_rows(model: nn.Module, rows: Sequence[int], word_dropout: float = 0.0) -> RowCorrection:
    base = model.word_embedding
    if not isinstance(base, nn.Embedding):
        raise TypeError(f"model.word_embedding is a {type(base).__name__}, not an nn.Embedding")
    module = RowCorrection(base, rows, word_dropout)
    model.word_embedding = module
    return module


def merge_rows(model: nn.Module) -> None:
    """Undo ``attach_rows``: one plain embedding with the correction added (no-op if not attached)."""
    if isinstance(model.word_embedding, RowCorrection):
        model.word_embedding = model.word_embedding.merged()


def word_rows(vocab: Vocabularies, sentences: Sequence[Example]) -> list[int]:
    """The word-table rows of the tokens of ``sentences`` (never the padding row)."""
    stoi = vocab.words.stoi
    return sorted({stoi.get(word_key(t), 1) for s in sentences for t in s.tokens} - {PAD_ID})


# --- the Fisher diagonal ----------------------------------------------------------------------


@dataclass
class Fisher:
    values: dict[str, Tensor]  # parameter name (named_parameters) -> F, same shape (the word table: (words, 1))
    sentences: int  # the base corpus's size in sentences (N_base in lambda = strength * N_base / N_new)
    sample: int = 0  # how many of them the mean was measured on
    measured_on: str = ""  # SHA-256 of the weights file it was measured on (save_fisher fills it in)


def fisher_information(
    model: Tagger, vocab: Vocabularies, sentences: Sequence[Example], max_word_length: int, scheme: str,
    max_sentences: int = 0, seed: int = 1, progress: Callable[[int, int], None] = lambda done, total: None,
) -> Fisher:
    """The empirical Fisher diagonal of ``model`` on gold ``sentences`` (one backward pass per
    sentence, dropout off): the mean per sentence. ``max_sentences`` > 0 measures on a seeded
    sample of that many (the mean is estimated; N_base stays the corpus's size)."""
    chosen = list(sentences)
    if max_sentences and len(chosen) > max_sentences:
        chosen = random.Random(seed).sample(chosen, max_sentences)
    if not chosen:
        raise ValueError("the Fisher information needs at least one sentence")
    table = model.word_embedding
    if not isinstance(table, nn.Embedding):
        raise TypeError("fisher_information takes a model with a plain word embedding")
    rows = attach_rows(model, word_rows(vocab, chosen))
    try:
        model.eval()
        named = {k: p for k, p in model.named_parameters() if p.requires_grad}
        sums = {k: torch.zeros_like(p) for k, p in named.items()}
        for done, s in enumerate(chosen, 1):
            batch = tensorize([s.tokens], vocab, max_word_length, [spans_to_tags(s.spans, len(s.tokens), scheme)])
            assert batch.tags is not None
            model.zero_grad(set_to_none=True)
            model.loss(*batch.inputs, batch.tags).backward()
            with torch.no_grad():
                for k, p in named.items():
                    if p.grad is not None:
                        sums[k] += p.grad.pow(2)
            if done % 500 == 0 or done == len(chosen):
                progress(done, len(chosen))
        values = {k: (v / len(chosen)).detach() for k, v in sums.items() if k != "word_embedding.correction"}
        per_row = torch.zeros(table.num_embeddings, 1)
        per_row[rows.rows] = (sums["word_embedding.correction"] / len(chosen)).mean(1, keepdim=True)
        values[WORDS] = per_row
    finally:
        merge_rows(model)
        model.zero_grad(set_to_none=True)
    return Fisher(values, len(sentences), len(chosen))


def weights_digest(folder: str | Path) -> str:
    """SHA-256 of a model folder's weights: which weights a Fisher file was measured on."""
    h = hashlib.sha256()
    with open(Path(folder) / "weights.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_fisher(folder: str | Path, fisher: Fisher) -> Path:
    """Write ``fisher.safetensors`` into the model folder it was measured on (stamped with its weights' digest)."""
    from safetensors.torch import save_file

    path = Path(folder) / FISHER_FILE
    fisher.measured_on = fisher.measured_on or weights_digest(folder)
    state = {k: v.detach().float().contiguous() for k, v in fisher.values.items()}
    save_file(state, str(path), metadata={"sentences": str(fisher.sentences), "sample": str(fisher.sample), "measured_on": fisher.measured_on})
    path.chmod(0o644)
    return path


def load_fisher(folder: str | Path) -> Fisher | None:
    """The folder's Fisher diagonal, or None when it has none."""
    from safetensors import SafetensorError, safe_open

    path = Path(folder) / FISHER_FILE
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_FISHER_BYTES:
        raise ValueError(f"{path} is {path.stat().st_size} bytes, more than the {MAX_FISHER_BYTES} allowed")
    try:
        with safe_open(str(path), framework="pt") as f:
            values = {k: f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118 (a safe_open handle is not a dict)
            metadata = f.metadata() or {}
            sentences, sample, measured_on = int(metadata.get("sentences", "0")), int(metadata.get("sample", "0")), metadata.get("measured_on", "")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable Fisher file: {e}") from None
    if sentences <= 0:
        raise ValueError(f"{path} does not say how many sentences it was measured on (metadata 'sentences')")
    return Fisher(values, sentences, sample, measured_on)


# --- the penalty ------------------------------------------------------------------------------


@dataclass
class Anchor:
    """One trainable tensor held toward the base: ``parameter[:base.shape] ~ base`` with weights ``fisher``."""

    parameter: nn.Parameter
    base: Tensor
    fisher: Tensor  # broadcastable to base

    def block(self) -> Tensor:
        return self.parameter[tuple(slice(0, n) for n in self.base.shape)]


def anchors(model: Tagger, base: dict[str, Tensor], fisher: Fisher | None) -> list[Anchor]:
    """An ``Anchor`` per trainable parameter of ``model`` that the base has, with the Fisher weights
    (all ones without a Fisher: a plain L2 pull). The word table's correction is anchored at zero
    (its base rows are the frozen table) with the per-row Fisher of the rows it corrects."""
    out: list[Anchor] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name == "word_embedding.correction":
            module: nn.Module = model.word_embedding
            assert isinstance(module, RowCorrection)
            rows = module.rows
            old = rows < base[WORDS].size(0)
            weight = torch.ones(rows.numel(), 1)
            if fisher is not None and WORDS in fisher.values:
                table = fisher.values[WORDS]
                weight = torch.where(rows.unsqueeze(1) < table.size(0), table[rows.clamp(max=table.size(0) - 1)], torch.zeros(()))
            # new words (rows past the base's table) are free: nothing of the base to keep
            out.append(Anchor(p, torch.zeros_like(p), weight * old.unsqueeze(1).to(weight.dtype)))
            continue
        if name not in base:
            continue
        weight = torch.ones(())
        if fisher is not None:
            if name not in fisher.values:
                raise ValueError(f"the base model's {FISHER_FILE} has no entry for parameter {name}; recompute it (ner fisher)")
            weight = _fit(fisher.values[name], base[name].shape, name)
        out.append(Anchor(p, base[name], weight))
    return out


def _fit(values: Tensor, shape: torch.Size, name: str) -> Tensor:
    """A Fisher tensor measured on a smaller model (an earlier version, before growth) padded with
    zeros to the base's shape; a larger or differently shaped one is an error."""
    if values.shape == shape:
        return values
    if values.dim() != len(shape) or any(a > b for a, b in zip(values.shape, shape, strict=True)):
        raise ValueError(f"{FISHER_FILE}: {name} has shape {list(values.shape)}, the base model's is {list(shape)}; recompute it (ner fisher)")
    out = torch.zeros(shape)
    out[tuple(slice(0, n) for n in values.shape)] = values
    return out


def penalty(pairs: Sequence[Anchor]) -> Tensor:
    """sum F * (theta - theta_base)^2 over the base's block of every anchored tensor."""
    total = torch.zeros(())
    for a in pairs:
        total = total + (a.fisher * (a.block() - a.base).pow(2)).sum()
    return total


@torch.no_grad()
def pull(pairs: Sequence[Anchor], fraction: float) -> None:
    """theta <- theta - fraction * (theta - theta_base) on the base's block (decoupled from Adam's
    rescaling, like AdamW's weight decay but toward the base)."""
    for a in pairs:
        block = a.block()
        block -= fraction * (block - a.base)
