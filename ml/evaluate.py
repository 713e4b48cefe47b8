"""Entity-level precision, recall and F1, micro-averaged and per type, as conlleval counts them:
an entity is right only if its type and both boundaries match."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ml.labels import Span


@dataclass
class Scores:
    precision: float
    recall: float
    f1: float
    true_positives: int
    predicted: int
    gold: int
    per_type: dict[str, dict[str, float]] = field(default_factory=dict)
    tokens: int = 0
    sentences: int = 0
    token_accuracy: float = 0.0

    def to_dict(self) -> dict:
        return {
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "true_positives": self.true_positives,
            "predicted": self.predicted,
            "gold": self.gold,
            "per_type": self.per_type,
            "tokens": self.tokens,
            "sentences": self.sentences,
            "token_accuracy": self.token_accuracy,
        }


def _prf(tp: int, pred: int, gold: int) -> tuple[float, float, float]:
    p = tp / pred if pred else 0.0
    r = tp / gold if gold else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def entity_scores(gold: Iterable[Sequence[Span]], predicted: Iterable[Sequence[Span]]) -> Scores:
    """``gold`` and ``predicted`` hold one span list per sentence, in the same order."""
    tp: Counter = Counter()
    n_pred: Counter = Counter()
    n_gold: Counter = Counter()
    sentences = 0
    for gold_spans, predicted_spans in zip(gold, predicted, strict=True):
        sentences += 1
        gs: set[Span] = set(gold_spans)
        ps: set[Span] = set(predicted_spans)
        for s in gs:
            n_gold[s.label] += 1
        for s in ps:
            n_pred[s.label] += 1
            if s in gs:
                tp[s.label] += 1
    per_type: dict[str, dict[str, float]] = {}
    for label in sorted(set(n_gold) | set(n_pred)):
        p, r, f = _prf(tp[label], n_pred[label], n_gold[label])
        per_type[label] = {"precision": p, "recall": r, "f1": f, "support": n_gold[label]}
    p, r, f = _prf(sum(tp.values()), sum(n_pred.values()), sum(n_gold.values()))
    return Scores(p, r, f, sum(tp.values()), sum(n_pred.values()), sum(n_gold.values()), per_type, sentences=sentences)
