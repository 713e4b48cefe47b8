"""Tag schemes (IOB1, IOB2, BIOES), tags <-> spans, and the transitions a scheme allows.

Pure Python: no torch, no strings inside the CRF. A span is ``(start, end, label)`` over
token indices with ``end`` exclusive, as spaCy's ``Span`` does.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

SCHEMES = ("iob1", "iob2", "bioes")
OUTSIDE = "O"


class Span(NamedTuple):
    start: int  # first token
    end: int  # one past the last token
    label: str


class TagError(ValueError):
    """A tag sequence that the scheme does not allow; ``position`` is the token index."""

    def __init__(self, position: int, reason: str):
        super().__init__(f"token {position}: {reason}")
        self.position = position
        self.reason = reason


def split_tag(tag: str, position: int = 0) -> tuple[str, str]:
    """``"B-PER" -> ("B", "PER")``, ``"O" -> ("O", "")``; anything else is a TagError."""
    if tag == OUTSIDE:
        return OUTSIDE, ""
    prefix, sep, label = tag.partition("-")
    if not sep or prefix not in ("B", "I", "E", "S") or not label:
        raise TagError(position, f"malformed tag {tag!r} (expected 'O' or B-/I-/E-/S- followed by a type)")
    return prefix, label


def check_scheme(scheme: str) -> str:
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"unknown tag scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    return scheme


def tags_to_spans(tags: Sequence[str], scheme: str) -> list[Span]:
    """Decode a tag sequence, raising TagError where it breaks the scheme.

    IOB1: ``I-X`` may start an entity; ``B-X`` only separates two adjacent entities of one type.
    IOB2: every entity starts with ``B-X``; ``I-X`` must continue an entity of type X.
    BIOES: ``S-X`` is a single-token entity, ``B-X I-X* E-X`` a longer one.
    """
    scheme = check_scheme(scheme)
    spans: list[Span] = []
    start: int | None = None
    label = ""
    for i, tag in enumerate(tags):
        prefix, typ = split_tag(tag, i)
        if scheme == "bioes":
            if prefix in ("I", "E"):
                if start is None or typ != label:
                    raise TagError(i, f"{tag} does not continue an entity of type {typ}")
                if prefix == "E":
                    spans.append(Span(start, i + 1, label))
                    start = None
                continue
            if start is not None:
                raise TagError(i, f"{tag} follows B-{label} without E-{label}")
            if prefix == "S":
                spans.append(Span(i, i + 1, typ))
            elif prefix == "B":
                start, label = i, typ
            continue
        if prefix in ("E", "S"):
            raise TagError(i, f"{tag} is not a {scheme.upper()} tag")
        continues = prefix == "I" and start is not None and typ == label
        if prefix == "I" and not continues and scheme == "iob2":
            raise TagError(i, f"{tag} does not continue an entity of type {typ} (IOB2 starts every entity with B-)")
        if continues:
            continue
        if start is not None:
            spans.append(Span(start, i, label))
            start = None
        if prefix in ("B", "I"):
            start, label = i, typ
    if start is not None:
        if scheme == "bioes":
            raise TagError(len(tags), f"the sequence ends inside B-{label} without E-{label}")
        spans.append(Span(start, len(tags), label))
    return spans


def spans_to_tags(spans: Iterable[Span], length: int, scheme: str) -> list[str]:
    """Encode non-overlapping spans as ``length`` tags of ``scheme``."""
    scheme = check_scheme(scheme)
    tags = [OUTSIDE] * length
    previous: Span | None = None
    for span in sorted(spans):
        if not 0 <= span.start < span.end <= length:
            raise ValueError(f"span {tuple(span)} lies outside a sequence of {length} tokens")
        if previous is not None and span.start < previous.end:
            raise ValueError(f"spans {tuple(previous)} and {tuple(span)} overlap")
        for i in range(span.start, span.end):
            tags[i] = f"I-{span.label}"
        if scheme == "iob2":
            tags[span.start] = f"B-{span.label}"
        elif scheme == "iob1":
            if previous is not None and previous.end == span.start and previous.label == span.label:
                tags[span.start] = f"B-{span.label}"
        elif span.end - span.start == 1:
            tags[span.start] = f"S-{span.label}"
        else:
            tags[span.start] = f"B-{span.label}"
            tags[span.end - 1] = f"E-{span.label}"
        previous = span
    return tags


def convert_tags(tags: Sequence[str], source: str, target: str) -> list[str]:
    return spans_to_tags(tags_to_spans(tags, source), len(tags), target)


def detect_scheme(sequences: Iterable[Sequence[str]]) -> str:
    """Guess the scheme of a corpus: BIOES if any E-/S- tag, IOB1 if any I- tag starts an entity, else IOB2.

    IOB1 and IOB2 decode every sequence without such an I- start to the same spans, so the guess
    only matters when it is unambiguous.
    """
    iob1 = False
    for tags in sequences:
        previous = OUTSIDE
        for i, tag in enumerate(tags):
            prefix, typ = split_tag(tag, i)
            if prefix in ("E", "S"):
                return "bioes"
            if prefix == "I" and (previous == OUTSIDE or previous[2:] != typ):
                iob1 = True
            previous = tag
    return "iob1" if iob1 else "iob2"


def tag_set(entity_types: Iterable[str], scheme: str) -> list[str]:
    """All tags of a scheme for the given entity types: ``O`` first, then per type in sorted order."""
    scheme = check_scheme(scheme)
    prefixes = ("B", "I", "E", "S") if scheme == "bioes" else ("B", "I")
    return [OUTSIDE] + [f"{p}-{t}" for t in sorted(set(entity_types)) for p in prefixes]


def allowed_transitions(tags: Sequence[str], scheme: str) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Which tag indices may follow which, and which may start or end a sequence.

    Returns ``(pairs, starts, ends)``; ``pairs`` holds ``(from_index, to_index)``, the index order
    of the CRF's transition matrix ``transitions[from, to]``.
    """
    scheme = check_scheme(scheme)
    parsed = [split_tag(t, i) for i, t in enumerate(tags)]

    def may_follow(a: tuple[str, str], b: tuple[str, str]) -> bool:
        (pa, ta), (pb, tb) = a, b
        if scheme == "bioes":
            inside = pa in ("B", "I")
            if pb in ("I", "E"):
                return inside and ta == tb
            return not inside
        if scheme == "iob2" and pb == "I":
            return pa in ("B", "I") and ta == tb
        if scheme == "iob1" and pb == "B":
            return pa in ("B", "I") and ta == tb
        return True

    pairs = [(i, j) for i, a in enumerate(parsed) for j, b in enumerate(parsed) if may_follow(a, b)]
    start_ok = {"iob1": ("O", "I"), "iob2": ("O", "B"), "bioes": ("O", "B", "S")}[scheme]
    end_ok = ("O", "E", "S") if scheme == "bioes" else ("O", "B", "I")
    starts = [i for i, (p, _) in enumerate(parsed) if p in start_ok]
    ends = [i for i, (p, _) in enumerate(parsed) if p in end_ok]
    return pairs, starts, ends


def lenient_spans(tags: Sequence[str]) -> list[Span]:
    """Decode any B/I/E/S/O sequence the way conlleval does, never raising: a chunk starts at B-/S-,
    at I-/E- after O, E-, S- or another type, and ends before the next start or after E-/S-.
    Used for predictions, which a softmax head does not keep inside the scheme."""
    spans: list[Span] = []
    start: int | None = None
    prev_prefix, prev_type = OUTSIDE, ""
    for i, tag in enumerate([*tags, OUTSIDE]):
        prefix, typ = split_tag(tag, i)
        starts = prefix in ("B", "S") or (
            prefix in ("I", "E") and (prev_prefix in (OUTSIDE, "E", "S") or typ != prev_type)
        )
        if start is not None and (starts or prefix == OUTSIDE or prev_prefix in ("E", "S")):
            spans.append(Span(start, i, prev_type))
            start = None
        if starts:
            start = i
        prev_prefix, prev_type = prefix, typ
    return spans
