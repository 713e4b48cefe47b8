"""CoNLL column files: one token a line, the tag in the last column, blank lines between sentences,
``-DOCSTART-`` lines between documents. Two columns (token, tag) or four (token, POS, chunk, tag)."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from ml.data import DataFormatError, Sentence
from ml.labels import TagError, check_scheme, detect_scheme, spans_to_tags, split_tag, tags_to_spans


def _blocks(path: Path) -> Iterable[tuple[int, list[tuple[int, list[str]]], int]]:
    """Yield (first line number, [(line number, columns)], document index) per sentence."""
    block: list[tuple[int, list[str]]] = []
    width = None
    doc = 0
    seen_tokens = False
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                if block:
                    yield block[0][0], block, doc
                    block = []
                continue
            columns = line.split()
            if columns[0] == "-DOCSTART-":
                if block:
                    yield block[0][0], block, doc
                    block = []
                if seen_tokens:
                    doc += 1
                    seen_tokens = False
                continue
            if len(columns) not in (2, 4):
                raise DataFormatError(path, number, f"expected 2 columns (token tag) or 4 (token POS chunk tag), found {len(columns)}")
            if width is None:
                width = len(columns)
            elif len(columns) != width:
                raise DataFormatError(path, number, f"found {len(columns)} columns where earlier lines have {width}")
            try:
                split_tag(columns[-1])
            except TagError as e:
                raise DataFormatError(path, number, e.reason) from None
            block.append((number, columns))
            seen_tokens = True
    if block:
        yield block[0][0], block, doc


def read_conll(path: str | Path, scheme: str = "auto") -> list[Sentence]:
    """Read a CoNLL file whose tags are IOB1, IOB2 or BIOES (``auto`` detects which)."""
    path = Path(path)
    blocks = list(_blocks(path))
    if not blocks:
        raise DataFormatError(path, 1, "no sentences found")
    if scheme == "auto":
        scheme = detect_scheme([cols[-1] for _, cols in block] for _, block, _ in blocks)
    scheme = check_scheme(scheme)
    sentences = []
    for _, block, doc in blocks:
        tags = [cols[-1] for _, cols in block]
        try:
            spans = tags_to_spans(tags, scheme)
        except TagError as e:
            line = block[min(e.position, len(block) - 1)][0]
            raise DataFormatError(path, line, f"{e.reason} ({scheme.upper()})") from None
        sentences.append(Sentence([cols[0] for _, cols in block], spans, doc_id=doc))
    return sentences


def write_conll(sentences: Iterable[Sentence], out: TextIO, scheme: str = "iob2", docstart: bool = True) -> None:
    """Two-column CoNLL (token tag), ``-DOCSTART-`` between documents when ``docstart``."""
    previous_doc = object()
    for s in sentences:
        if docstart and s.doc_id is not None and s.doc_id != previous_doc:
            out.write("-DOCSTART- O\n\n")
            previous_doc = s.doc_id
        for token, tag in zip(s.tokens, spans_to_tags(s.spans, len(s.tokens), scheme), strict=True):
            if any(ch.isspace() for ch in token):
                raise ValueError(f"token {token!r} contains whitespace and cannot be written as a CoNLL column")
            out.write(f"{token} {tag}\n")
        out.write("\n")
