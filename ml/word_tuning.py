"""Training-time view of the word embedding: the pretrained table frozen, plus a trainable
correction for the rows of the words seen in the training data.

Only training words ever receive a gradient, so this is the same optimisation problem as
fine-tuning the whole table (Adam leaves a row that never had a gradient where it is), but the
optimiser, the gradient clipping and the backward pass touch ``rows x dim`` numbers instead of the
whole table: with all 400,000 GloVe words that is 20 times less work per step. Pretrained-only
words (the unseen names of the test sets) keep their GloVe vectors. ``merge`` folds the correction
back into one ``nn.Embedding``, so a saved model has the usual ``word_embedding.weight``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CorrectedEmbedding(nn.Module):
    """``base`` frozen; ``correction`` (rows, dim) added to ids below ``rows``."""

    def __init__(self, base: nn.Embedding, rows: int):
        super().__init__()
        if not 0 < rows <= base.num_embeddings:
            raise ValueError(f"trainable rows must lie in 1..{base.num_embeddings}, got {rows}")
        base.weight.requires_grad_(False)
        self.base = base
        self.rows = rows
        self.embedding_dim = base.embedding_dim
        self.padding_idx = base.padding_idx
        self.correction = nn.Parameter(torch.zeros(rows, base.embedding_dim, dtype=base.weight.dtype, device=base.weight.device))

    def forward(self, words: Tensor) -> Tensor:
        inside = words < self.rows
        delta = F.embedding(torch.where(inside, words, torch.zeros_like(words)), self.correction, padding_idx=self.padding_idx)
        return self.base(words) + delta * inside.unsqueeze(-1).to(delta.dtype)

    def merged(self) -> nn.Embedding:
        out = nn.Embedding(self.base.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx)
        with torch.no_grad():
            out.weight.copy_(self.base.weight)
            out.weight[: self.rows] += self.correction
        return out.to(self.base.weight.device)


def attach(model: nn.Module, rows: int) -> None:
    """Replace ``model.word_embedding`` by a frozen base plus a correction of its first ``rows``."""
    base = model.word_embedding
    if not isinstance(base, nn.Embedding):
        raise TypeError(f"model.word_embedding is a {type(base).__name__}, not an nn.Embedding")
    model.word_embedding = CorrectedEmbedding(base, rows)


def merge(model: nn.Module) -> None:
    """Undo ``attach``: one plain embedding with the correction added (no-op if not attached)."""
    if isinstance(model.word_embedding, CorrectedEmbedding):
        model.word_embedding = model.word_embedding.merged()
