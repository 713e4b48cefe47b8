"""Tag schemes: conversions round-trip, strict decoding names the bad token, transitions agree."""
from __future__ import annotations

import itertools
import random

import pytest

from ml.labels import (
    Span,
    TagError,
    allowed_transitions,
    convert_tags,
    detect_scheme,
    lenient_spans,
    spans_to_tags,
    tag_set,
    tags_to_spans,
)


def random_spans(rng: random.Random, n: int):
    spans, i = [], 0
    while i < n:
        if rng.random() < 0.4:
            length = rng.randint(1, min(3, n - i))
            spans.append(Span(i, i + length, rng.choice(["PER", "LOC"])))
            i += length
        else:
            i += rng.randint(1, 2)
    return spans


@pytest.mark.parametrize("scheme", ["iob1", "iob2", "bioes"])
def test_spans_round_trip_through_every_scheme(scheme):
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 9)
        spans = random_spans(rng, n)
        tags = spans_to_tags(spans, n, scheme)
        assert tags_to_spans(tags, scheme) == spans
        assert lenient_spans(tags) == spans or scheme == "iob1"
        for other in ("iob1", "iob2", "bioes"):
            assert convert_tags(convert_tags(tags, scheme, other), other, scheme) == tags


def test_conll2003_iob1_example():
    # IOB1: I- starts an entity; B- only separates two adjacent entities of one type
    tags = ["I-ORG", "O", "I-MISC", "O", "I-PER", "I-PER", "B-PER"]
    assert tags_to_spans(tags, "iob1") == [Span(0, 1, "ORG"), Span(2, 3, "MISC"), Span(4, 6, "PER"), Span(6, 7, "PER")]
    assert detect_scheme([tags]) == "iob1"
    assert convert_tags(tags, "iob1", "bioes") == ["S-ORG", "O", "S-MISC", "O", "B-PER", "E-PER", "S-PER"]


@pytest.mark.parametrize(
    "tags, scheme, position, reason",
    [
        (["O", "I-PER"], "iob2", 1, "does not continue"),
        (["B-PER", "I-LOC"], "iob2", 1, "does not continue"),
        (["B-PER", "O"], "bioes", 1, "without E-PER"),
        (["E-PER"], "bioes", 0, "does not continue"),
        (["B-PER"], "bioes", 1, "ends inside"),
        (["S-PER"], "iob2", 0, "not a IOB2 tag"),
        (["O", "X-PER"], "iob2", 1, "malformed tag"),
        (["PER"], "iob2", 0, "malformed tag"),
    ],
)
def test_strict_decoding_names_the_token_and_reason(tags, scheme, position, reason):
    with pytest.raises(TagError) as e:
        tags_to_spans(tags, scheme)
    assert e.value.position == position and reason in e.value.reason


def test_detect_scheme():
    assert detect_scheme([["B-PER", "I-PER", "O"]]) == "iob2"
    assert detect_scheme([["S-PER", "O"]]) == "bioes"
    assert detect_scheme([["O", "I-PER"]]) == "iob1"


@pytest.mark.parametrize("scheme", ["iob2", "bioes"])
def test_allowed_transitions_accept_exactly_the_valid_sequences(scheme):
    tags = tag_set(["PER", "LOC"], scheme)
    pair_list, start_list, end_list = allowed_transitions(tags, scheme)
    allowed, starts, ends = set(pair_list), set(start_list), set(end_list)
    for n in (1, 2, 3):
        for seq in itertools.product(range(len(tags)), repeat=n):
            by_constraints = seq[0] in starts and seq[-1] in ends and all((a, b) in allowed for a, b in itertools.pairwise(seq))
            try:
                tags_to_spans([tags[k] for k in seq], scheme)
                valid = True
            except TagError:
                valid = False
            assert by_constraints == valid, [tags[k] for k in seq]


def test_lenient_decoding_follows_conlleval():
    assert lenient_spans(["O", "I-PER", "I-PER", "E-LOC", "S-LOC", "B-ORG"]) == [
        Span(1, 3, "PER"), Span(3, 4, "LOC"), Span(4, 5, "LOC"), Span(5, 6, "ORG"),
    ]


def test_bad_spans_are_rejected():
    with pytest.raises(ValueError, match="overlap"):
        spans_to_tags([Span(0, 2, "PER"), Span(1, 3, "LOC")], 4, "iob2")
    with pytest.raises(ValueError, match="outside"):
        spans_to_tags([Span(2, 5, "PER")], 4, "iob2")
    with pytest.raises(ValueError, match="unknown tag scheme"):
        spans_to_tags([], 1, "bilou")
