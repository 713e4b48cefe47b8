"""The promotion gate on constructed measures: it promotes a candidate that gains on new names and
keeps the base, and refuses one that forgets, only memorises, or loses on the newest corrections,
with a reason that says so."""
from __future__ import annotations

import pytest

from ml.gate import GatePolicy, promotion_decision


def _scores(f1, per=None):
    return {"f1": f1, "per_type": {k: {"f1": v, "support": s} for k, (v, s) in (per or {}).items()}}


def test_promotion_gate_on_the_held_out_gain_and_labels():
    before = _scores(0.70, {"PER": (0.9, 50), "LOC": (0.8, 40), "MISC": (0.5, 3)})

    def decide(after, min_gain=0.01, support=1):
        return promotion_decision({"heldout": {"before": before, "after": after}}, GatePolicy(min_gain=min_gain, max_label_drop=0.02, min_label_support=support))

    assert decide(_scores(0.80, {"PER": (0.9, 50), "LOC": (0.85, 40), "MISC": (0.0, 3)}), support=10).promote
    low = decide(_scores(0.705, {"PER": (0.9, 50), "LOC": (0.8, 40)}))
    assert not low.promote and "below the required 1.00" in low.reason
    drop = decide(_scores(0.80, {"PER": (0.85, 50), "LOC": (0.95, 40), "MISC": (0.5, 3)}))
    assert not drop.promote and drop.worst_label == "PER" and "label PER loses 5.00" in drop.reason
    assert not promotion_decision({"heldout": None}, GatePolicy()).promote


def _measures(held_gain=0.10, unseen_gain=0.05, unseen_mentions=40, probe=0.97, time_gain=0.02, dev_drop=None):
    metrics = {
        "heldout": {"before": _scores(0.60), "after": _scores(0.60 + held_gain),
                    "unseen": {"mentions": unseen_mentions, "before": _scores(0.50), "after": _scores(0.50 + unseen_gain)}},
        "time": {"documents": 12, "before": _scores(0.55), "after": _scores(0.55 + time_gain)},
        "probe": {"texts": 300, "confident_spans": 800, "kept": round(800 * probe), "agreement": probe},
    }
    if dev_drop is not None:
        metrics.update(dev_before=_scores(0.95), dev=_scores(0.95 - dev_drop))
    return metrics


def test_gate_promotes_a_candidate_that_gains_on_new_names_and_keeps_the_base():
    decision = promotion_decision(_measures(), GatePolicy())
    assert decision.promote, decision.reason
    assert decision.checks["unseen_gain"] == pytest.approx(0.05) and decision.checks["probe_agreement"] == 0.97
    assert "(+10.00); on the 12 newest documents +2.00;" in decision.reason  # the measure closest to new texts is said too
    without_time = {k: v for k, v in _measures().items() if k != "time"}
    assert "newest" not in promotion_decision(without_time, GatePolicy()).reason


def test_gate_refuses_a_candidate_that_forgets_the_base_domain():
    forgets = promotion_decision(_measures(probe=0.7), GatePolicy())
    assert not forgets.promote and forgets.reason.startswith("forgets:") and "70.0% of the base model's 800 confident predictions" in forgets.reason
    dev = promotion_decision(_measures(dev_drop=0.02), GatePolicy(max_dev_drop=0.005))
    assert not dev.promote and "forgets the base domain" in dev.reason


def test_gate_refuses_a_candidate_whose_gain_is_only_memorised_names():
    memorises = promotion_decision(_measures(held_gain=0.14, unseen_gain=-0.01), GatePolicy())
    assert not memorises.promote and "only memorises" in memorises.reason and "40 held-out mentions" in memorises.reason
    # too few unseen mentions to judge: the rule does not apply
    assert promotion_decision(_measures(unseen_gain=-0.01, unseen_mentions=5), GatePolicy()).promote


def test_gate_refuses_a_candidate_that_loses_on_the_newest_corrections_and_gives_every_reason():
    decision = promotion_decision(_measures(time_gain=-0.03, probe=0.5), GatePolicy())
    assert not decision.promote and "newest corrections" in decision.reason and "forgets" in decision.reason
