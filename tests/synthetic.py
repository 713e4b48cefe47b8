"""A tiny synthetic corpus that a small tagger can learn completely in seconds."""
from __future__ import annotations

import random

from ml.data import Sentence
from ml.labels import Span

PEOPLE = [["Anna", "Berg"], ["Tom"], ["Maria", "Lopez"], ["Chen", "Wei"], ["Olga"], ["Pierre", "Dubois"]]
PLACES = [["Paris"], ["New", "York"], ["Lagos"], ["Oslo"], ["Buenos", "Aires"], ["Kyoto"]]
ORGS = [["Acme", "Corp"], ["Globex"], ["United", "Nations"], ["Initech"], ["Red", "Cross"]]
TEMPLATES = [
    ["PER", "visited", "LOC", "."],
    ["PER", "works", "for", "ORG", "in", "LOC", "."],
    ["ORG", "hired", "PER", "yesterday", "."],
    ["the", "office", "of", "ORG", "is", "in", "LOC", "."],
    ["PER", "and", "PER", "met", "."],
    ["nothing", "happened", "today", "."],
]


def synthetic_corpus(n: int = 80, seed: int = 0) -> list[Sentence]:
    rng = random.Random(seed)
    pools = {"PER": PEOPLE, "LOC": PLACES, "ORG": ORGS}
    out = []
    for _ in range(n):
        tokens: list[str] = []
        spans = []
        for slot in rng.choice(TEMPLATES):
            if slot in pools:
                name = rng.choice(pools[slot])
                spans.append(Span(len(tokens), len(tokens) + len(name), slot))
                tokens.extend(name)
            else:
                tokens.append(slot)
        out.append(Sentence(tokens, spans))
    return out
