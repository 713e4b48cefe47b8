"""The entity scorer against seqeval (conlleval semantics) on random tag sequences."""
from __future__ import annotations

import random

import pytest
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

from ml.evaluate import entity_scores
from ml.labels import lenient_spans


def random_tags(rng: random.Random, n: int):
    return [rng.choice(["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG"]) for _ in range(n)]


def test_scores_match_seqeval_on_random_sequences():
    rng = random.Random(7)
    gold = [random_tags(rng, rng.randint(1, 12)) for _ in range(400)]
    pred = [[t if rng.random() < 0.7 else rng.choice(["O", "B-PER", "I-LOC", "I-ORG"]) for t in seq] for seq in gold]
    ours = entity_scores([lenient_spans(g) for g in gold], [lenient_spans(p) for p in pred])
    assert ours.precision == pytest.approx(precision_score(gold, pred))
    assert ours.recall == pytest.approx(recall_score(gold, pred))
    assert ours.f1 == pytest.approx(f1_score(gold, pred))
    report = classification_report(gold, pred, output_dict=True)
    for label, s in ours.per_type.items():
        assert s["f1"] == pytest.approx(report[label]["f1-score"])
        assert s["support"] == report[label]["support"]


def test_perfect_and_empty():
    spans = [lenient_spans(["B-PER", "I-PER", "O"])]
    assert entity_scores(spans, spans).f1 == 1.0
    empty = entity_scores([[]], [[]])
    assert (empty.precision, empty.recall, empty.f1) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        entity_scores([[]], [])
