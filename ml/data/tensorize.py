"""The one text-to-tensor path, used by training, evaluation, the predictor and the service."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ml.vocab import PAD_ID, UNK_ID, Vocabularies, casing, word_key


@dataclass
class Batch:
    words: Tensor  # (B, T) word ids, PAD_ID past each sentence's end
    chars: Tensor  # (B, T, C) char ids
    cases: Tensor  # (B, T) casing classes
    mask: Tensor  # (B, T) bool, True at real tokens
    tags: Tensor | None = None  # (B, T) gold tag ids
    lm_targets: Tensor | None = None  # (B, T) ids for the auxiliary language model
    truecase: Tensor | None = None  # (B, T) casing classes of the tokens before training-time recasing
    soft: Tensor | None = None  # (B, T, K) teachers' tag marginals to distil (ml.distill)

    def to(self, device: str | torch.device) -> Batch:
        def move(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=True)

        return Batch(
            move(self.words), move(self.chars), move(self.cases), move(self.mask),
            move(self.tags) if self.tags is not None else None,
            move(self.lm_targets) if self.lm_targets is not None else None,
            move(self.truecase) if self.truecase is not None else None,
            move(self.soft) if self.soft is not None else None,
        )

    @property
    def inputs(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.words, self.chars, self.cases, self.mask


def tensorize(
    token_lists: Sequence[Sequence[str]],
    vocab: Vocabularies,
    max_word_length: int,
    tags: Sequence[Sequence[str]] | None = None,
    lm_vocab_size: int = 0,
) -> Batch:
    if not token_lists:
        raise ValueError("cannot tensorize an empty batch")
    batch = len(token_lists)
    steps = max(len(t) for t in token_lists)
    if steps == 0:
        raise ValueError("cannot tensorize sentences without tokens")
    width = min(max_word_length, max(len(tok) for toks in token_lists for tok in toks))
    words = [[PAD_ID] * steps for _ in range(batch)]
    cases = [[0] * steps for _ in range(batch)]
    chars = [[[PAD_ID] * width for _ in range(steps)] for _ in range(batch)]
    stoi_w, stoi_c = vocab.words.stoi, vocab.chars.stoi
    for b, tokens in enumerate(token_lists):
        for t, tok in enumerate(tokens):
            if not tok:
                raise ValueError(f"sentence {b} has an empty token at position {t}")
            words[b][t] = stoi_w.get(word_key(tok), UNK_ID)
            cases[b][t] = casing(tok)
            row = chars[b][t]
            for c, ch in enumerate(tok[:width]):
                row[c] = stoi_c.get(ch, UNK_ID)
    lengths = torch.tensor([len(t) for t in token_lists])
    out = Batch(
        torch.tensor(words),
        torch.tensor(chars),
        torch.tensor(cases),
        torch.arange(steps).unsqueeze(0) < lengths.unsqueeze(1),
    )
    if tags is not None:
        ids = [[0] * steps for _ in range(batch)]
        for b, seq in enumerate(tags):
            if len(seq) != len(token_lists[b]):
                raise ValueError(f"sentence {b} has {len(token_lists[b])} tokens but {len(seq)} tags")
            for t, tag in enumerate(seq):
                ids[b][t] = vocab.tags.index(tag)
        out.tags = torch.tensor(ids)
    if lm_vocab_size:
        # word ids are ordered by training frequency, so the LM's vocabulary is a prefix of them
        out.lm_targets = torch.where(out.words < lm_vocab_size, out.words, torch.full_like(out.words, UNK_ID))
    return out
