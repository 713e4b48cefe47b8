"""Which tokens go through the network together: the windows shared by training and serving.

A text (a CoNLL document, or the sentences of one request) is a list of sentences. ``plan`` cuts
it into windows of at most ``max_tokens`` tokens, so no forward pass exceeds a fixed size:

* with ``document=True`` consecutive whole sentences are packed into one window while they fit,
  so the recurrence reads the neighbouring sentences of the same text (a name written in full in
  one sentence and alone in the next is tagged with both in view);
* with ``document=False`` each sentence is its own window (the sentence-level tagger);
* a sentence longer than ``max_tokens`` is split into overlapping windows. Each window *owns* a
  chunk of ``max_tokens - 2 * margin`` tokens and reads up to ``margin`` more on either side;
  ``stitch`` takes an entity from the window that owns its first token, so an entity that crosses
  a chunk boundary is decoded whole by a window that sees context on both sides of it.

Pure Python on token counts and tags: no torch, no vocabulary.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ml.labels import Span, lenient_spans


@dataclass(frozen=True)
class Piece:
    """Tokens ``[start, end)`` of sentence ``sentence`` (an index into the flattened input), placed
    at ``offset`` in the window; the piece's predictions count for tokens ``[keep_start, keep_end)``
    of the sentence (the whole piece unless the sentence was split)."""

    sentence: int
    start: int
    end: int
    offset: int
    keep_start: int
    keep_end: int


@dataclass(frozen=True)
class Window:
    pieces: tuple[Piece, ...]

    @property
    def length(self) -> int:
        last = self.pieces[-1]
        return last.offset + last.end - last.start


def default_margin(max_tokens: int) -> int:
    """Context read past each side of an owned chunk: a quarter of the window."""
    return max_tokens // 4


def _split(sentence: int, length: int, max_tokens: int, margin: int) -> list[Window]:
    chunk = max_tokens - 2 * margin
    windows = []
    for lo in range(0, length, chunk):
        hi = min(length, lo + chunk)
        start, end = max(0, lo - margin), min(length, hi + margin)
        windows.append(Window((Piece(sentence, start, end, 0, lo, hi),)))
    return windows


def plan(texts: Sequence[Sequence[int]], max_tokens: int, document: bool, margin: int | None = None) -> list[Window]:
    """Windows for texts given as lists of sentence lengths. Sentences are numbered across texts in
    order (the flattened input); a window never mixes two texts."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    margin = default_margin(max_tokens) if margin is None else margin
    if max_tokens > 1 and not 0 <= margin < max_tokens / 2:
        raise ValueError(f"margin must lie in [0, {max_tokens / 2}), got {margin}")
    if max_tokens == 1:
        margin = 0
    windows: list[Window] = []
    index = 0
    for lengths in texts:
        current: list[Piece] = []
        used = 0
        for length in lengths:
            if length < 1:
                raise ValueError(f"sentence {index} has no tokens")
            if length > max_tokens:
                if current:
                    windows.append(Window(tuple(current)))
                    current, used = [], 0
                windows.extend(_split(index, length, max_tokens, margin))
            else:
                if current and (not document or used + length > max_tokens):
                    windows.append(Window(tuple(current)))
                    current, used = [], 0
                current.append(Piece(index, 0, length, used, 0, length))
                used += length
            index += 1
        if current:
            windows.append(Window(tuple(current)))
    return windows


def window_tokens(window: Window, sentences: Sequence[Sequence[str]]) -> list[str]:
    """The tokens of a window, from the flattened sentences its pieces index."""
    return [tok for p in window.pieces for tok in sentences[p.sentence][p.start : p.end]]


@dataclass
class PieceResult:
    piece: Piece
    tags: list[str]  # the piece's tokens' tags (any B/I/E/S/O scheme)
    scores: list[float]


def stitch(length: int, parts: Sequence[PieceResult]) -> tuple[list[Span], list[float], list[str] | None]:
    """One sentence's entities and per-token scores from the pieces that cover it (in order).

    Returns (spans, scores, tags): ``tags`` is the piece's own tag list when one piece covers the
    whole sentence (nothing to stitch), else None (the caller re-encodes the spans). An entity is
    taken from the piece that owns its first token; one that overlaps an entity already taken is
    dropped. A token's score comes from the piece that supplied its entity, else from its owner."""
    if len(parts) == 1 and parts[0].piece.start == 0 and parts[0].piece.end == length:
        part = parts[0]
        return [Span(s.start, s.end, s.label) for s in lenient_spans(part.tags)], list(part.scores), list(part.tags)
    scores: list[float | None] = [None] * length
    spans: list[Span] = []
    taken = [False] * length
    for part in parts:
        p = part.piece
        for t in range(p.keep_start, p.keep_end):
            scores[t] = part.scores[t - p.start]
    for part in parts:
        p = part.piece
        for s in lenient_spans(part.tags):
            start, end = s.start + p.start, s.end + p.start
            if not p.keep_start <= start < p.keep_end or any(taken[start:end]):
                continue
            spans.append(Span(start, end, s.label))
            for t in range(start, end):
                taken[t] = True
                scores[t] = part.scores[t - p.start]
    missing = [t for t, s in enumerate(scores) if s is None]
    if missing:
        raise ValueError(f"tokens {missing[:5]} of a sentence of {length} are owned by no piece")
    return sorted(spans), [float(s) for s in scores if s is not None], None


def group_texts(doc_ids: Sequence[int | None]) -> list[list[int]]:
    """Indices of consecutive sentences with the same (not None) document id; None stands alone."""
    groups: list[list[int]] = []
    previous: int | None = None
    for i, doc in enumerate(doc_ids):
        if groups and doc is not None and doc == previous:
            groups[-1].append(i)
        else:
            groups.append([i])
        previous = doc
    return groups


def training_windows(sentences: Sequence, max_tokens: int, document: bool) -> list:
    """The training sequences: the windows ``plan`` makes for the documents of ``sentences``
    (``ml.data.Sentence`` objects, grouped by ``doc_id``), each as a Sentence with its entities
    shifted into the window (an entity cut by a sentence split is clipped to the window)."""
    from ml.data import Sentence

    groups = group_texts([getattr(s, "doc_id", None) for s in sentences])
    flat = [sentences[i] for g in groups for i in g]
    out = []
    for w in plan([[len(sentences[i].tokens) for i in g] for g in groups], max_tokens, document):
        tokens: list[str] = []
        spans: list[Span] = []
        for p in w.pieces:
            s = flat[p.sentence]
            tokens.extend(s.tokens[p.start : p.end])
            for e in s.spans:
                start, end = max(e.start, p.start), min(e.end, p.end)
                if start < end:
                    spans.append(Span(start - p.start + p.offset, end - p.start + p.offset, e.label))
        out.append(Sentence(tokens, spans, doc_id=getattr(flat[w.pieces[0].sentence], "doc_id", None)))
    return out


def with_dev(train: Sequence, dev: Sequence) -> list:
    """Training sentences followed by the dev sentences, the dev documents numbered after the
    training ones (so no window joins a training document and a dev document)."""
    import dataclasses

    offset = 1 + max((s.doc_id for s in train if getattr(s, "doc_id", None) is not None), default=-1)
    return list(train) + [s if getattr(s, "doc_id", None) is None else dataclasses.replace(s, doc_id=s.doc_id + offset) for s in dev]
