"""Training-time casing augmentation: text as people type it is not always cased like newswire.

Each epoch, each training sequence is shown as it is or recased as a whole (every token
lower-cased, upper-cased or title-cased) with the probabilities of ``train.case_lower``,
``train.case_upper`` and ``train.case_title``. The word vocabulary is keyed on lower-cased words
(``ml.vocab.word_key``), so recasing changes what the character encoder and the casing feature see,
never which word vector a token gets: the model learns not to lean on casing alone (Mayhew et al.
2019 train on cased + lower-cased text; here one model sees every variant in proportions set in
the config, without doubling the epoch)."""
from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ml.labels import Span
from ml.vocab import UNK_ID

CASINGS = ("as_is", "lower", "upper", "title")


def title_token(token: str) -> str:
    """First character upper-cased, the rest lower-cased (``"mcDONALD" -> "Mcdonald"``, ``"o'neil" -> "O'neil"``)."""
    return token[:1].upper() + token[1:].lower()


def recase(tokens: Sequence[str], casing: str) -> list[str]:
    """The tokens in one casing: ``as_is``, ``lower``, ``upper`` or ``title`` (each token title-cased)."""
    if casing == "as_is":
        return list(tokens)
    if casing == "lower":
        return [t.lower() for t in tokens]
    if casing == "upper":
        return [t.upper() for t in tokens]
    if casing == "title":
        return [title_token(t) for t in tokens]
    raise ValueError(f"unknown casing {casing!r}; expected one of {', '.join(CASINGS)}")


class CaseAugmenter:
    """Draws one casing per sequence: lower / upper / title with the given probabilities, else as is.
    Seeded, so a training run is repeatable."""

    def __init__(self, lower: float = 0.0, upper: float = 0.0, title: float = 0.0, seed: int = 0):
        for name, p in (("lower", lower), ("upper", upper), ("title", title)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"casing probability {name} must lie in [0, 1], got {p}")
        if lower + upper + title > 1.0 + 1e-9:
            raise ValueError(f"casing probabilities add up to {lower + upper + title:.3f}, more than 1")
        self.bounds = (lower, lower + upper, lower + upper + title)
        self.rng = random.Random(seed)

    @property
    def active(self) -> bool:
        return self.bounds[2] > 0.0

    def draw(self) -> str:
        r = self.rng.random()
        for casing, bound in zip(CASINGS[1:], self.bounds, strict=True):
            if r < bound:
                return casing
        return "as_is"

    def __call__(self, tokens: Sequence[str]) -> list[str]:
        return recase(tokens, self.draw()) if self.active else list(tokens)


def drop_words(words: Tensor, mask: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Word dropout: each real token's word id becomes ``<unk>`` with probability ``p``, so the tagger
    also learns to tag from the characters, the casing and the context, as it must for a name it has no
    vector for (Lample et al. 2016). A new tensor; padding stays padding."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"word dropout must lie in [0, 1), got {p}")
    drop = (torch.rand(words.shape, generator=generator) < p) & mask
    return words.masked_fill(drop, UNK_ID)


class MentionReplacer:
    """Entity-mention replacement (Dai & Adel 2020): each entity mention of a training sequence is
    replaced, with probability ``p``, by another mention of the same label drawn uniformly from the
    distinct mentions of the training data, so the tagger sees each context with many names and learns
    the context as well as the names (the case of a name it has never seen). The spans move with the
    new lengths; tokens outside mentions are unchanged. Seeded, so a training run is repeatable."""

    def __init__(self, examples: Iterable[tuple[Sequence[str], Sequence[Span]]], p: float, seed: int = 0):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"mention replacement probability must lie in [0, 1], got {p}")
        self.p = p
        self.rng = random.Random(seed)
        pool: dict[str, set[tuple[str, ...]]] = {}
        if p > 0:
            for tokens, spans in examples:
                for span in spans:
                    pool.setdefault(span.label, set()).add(tuple(tokens[span.start : span.end]))
        self.pool = {label: sorted(mentions) for label, mentions in pool.items()}

    @property
    def active(self) -> bool:
        return self.p > 0 and any(len(m) > 1 for m in self.pool.values())

    def __call__(self, tokens: Sequence[str], spans: Sequence[Span]) -> tuple[list[str], list[Span]]:
        out: list[str] = []
        new_spans: list[Span] = []
        at = 0
        for span in sorted(spans):
            out.extend(tokens[at : span.start])
            mention: Sequence[str] = tokens[span.start : span.end]
            choices = self.pool.get(span.label)
            if choices and self.rng.random() < self.p:
                mention = choices[self.rng.randrange(len(choices))]
            new_spans.append(Span(len(out), len(out) + len(mention), span.label))
            out.extend(mention)
            at = span.end
        out.extend(tokens[at:])
        return out, new_spans
