"""Corpora: sentences of tokens with entity spans, their readers and writers, and ``tensorize``."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ml.labels import Span


class DataFormatError(ValueError):
    """A malformed input file: names the file, the line (1-based) and what is wrong."""

    def __init__(self, path: str | Path, line: int, reason: str):
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = str(path), line, reason


class Example(Protocol):
    """What training and evaluation read from a sequence: its tokens and entity spans. A
    ``Sentence`` is one; so is a whole document's tokens with its spans (document context)."""

    @property
    def tokens(self) -> Sequence[str]: ...

    @property
    def spans(self) -> Sequence[Span]: ...


@dataclass
class Sentence:
    tokens: list[str]
    spans: list[Span] = field(default_factory=list)  # token-level entities, end exclusive
    # where the sentence came from, when it came from text: character offsets of each token
    text: str | None = None
    offsets: list[tuple[int, int]] | None = None
    doc_id: int | None = None  # index of the document (-DOCSTART- block or JSONL line)

    def __post_init__(self) -> None:
        if not self.tokens:
            raise ValueError("a sentence needs at least one token")
        for s in self.spans:
            if not 0 <= s.start < s.end <= len(self.tokens):
                raise ValueError(f"span {tuple(s)} lies outside {len(self.tokens)} tokens")


def read_corpus(path: str | Path, fmt: str = "auto", scheme: str = "auto", language: str = "en") -> list[Sentence]:
    """Read CoNLL (``.txt``, ``.conll``, ...) or JSONL (``.jsonl``) by extension unless ``fmt`` says."""
    from ml.data.conll import read_conll
    from ml.data.jsonl import read_jsonl

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    if fmt == "auto":
        fmt = "jsonl" if path.suffix in (".jsonl", ".json") else "conll"
    if fmt == "jsonl":
        return read_jsonl(path, language)
    if fmt == "conll":
        return read_conll(path, scheme)
    raise ValueError(f"unknown data format {fmt!r}; expected conll, jsonl or auto")
