"""The promotion gate: whether a candidate version replaces the served one, decided on the measures
``ml.finetune.measure`` writes (held-out F1 and per label, unseen names, the newest corrections,
the forgetting probe, base-corpus dev). Pure Python over dicts: the trainer calls it, tests build
the cases by hand."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class GatePolicy:
    min_gain: float = 0.0  # held-out (hash) F1 gain required
    max_label_drop: float = 0.02  # F1 a label with enough support may lose on the held-out part
    min_label_support: int = 1
    min_unseen_gain: float = 0.0  # F1 gain required on unseen mentions (when there are min_unseen_mentions)
    min_unseen_mentions: int = 20
    max_time_drop: float = 0.0  # F1 the newest corrections may lose
    min_probe_agreement: float = 0.9  # share of the base's confident spans on stored texts to keep
    max_dev_drop: float = 0.005  # base-corpus dev F1 to lose, when measured


@dataclass
class Decision:
    promote: bool
    reason: str
    gain: float | None = None  # held-out F1 after - before
    worst_label: str | None = None
    worst_drop: float | None = None
    checks: dict[str, Any] = field(default_factory=dict)  # the measure behind each rule that could be applied

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _worst_label(before: dict, after: dict, min_support: int) -> tuple[str | None, float]:
    worst, worst_drop = None, 0.0
    for label, s in before.get("per_type", {}).items():
        if s.get("support", s.get("gold", 0)) < min_support:
            continue
        drop = s["f1"] - after.get("per_type", {}).get(label, {}).get("f1", 0.0)
        if drop > worst_drop:
            worst, worst_drop = label, drop
    return worst, worst_drop


def _refusals(metrics: dict[str, Any], policy: GatePolicy, checks: dict[str, Any]) -> list[str]:
    """The reasons to refuse beyond the held-out gain: forgetting, memorising, the newest texts."""
    reasons = []
    probe = metrics.get("probe")
    if probe:
        checks["probe_agreement"] = probe["agreement"]
        if probe["agreement"] < policy.min_probe_agreement:
            reasons.append(f"forgets: keeps {100 * probe['agreement']:.1f}% of the base model's {probe['confident_spans']} confident predictions on "
                           f"{probe['texts']} stored texts nobody corrected (at least {100 * policy.min_probe_agreement:.0f}% required)")
    if metrics.get("dev") and metrics.get("dev_before"):
        drop = metrics["dev_before"]["f1"] - metrics["dev"]["f1"]
        checks["dev_drop"] = drop
        if drop > policy.max_dev_drop:
            reasons.append(f"forgets the base domain: base-corpus dev F1 {100 * metrics['dev']['f1']:.2f} vs {100 * metrics['dev_before']['f1']:.2f} "
                           f"(at most {100 * policy.max_dev_drop:.2f} may be lost)")
    unseen = (metrics.get("heldout") or {}).get("unseen")
    if unseen and unseen["mentions"] >= policy.min_unseen_mentions:
        gain = unseen["after"]["f1"] - unseen["before"]["f1"]
        checks["unseen_gain"] = gain
        if gain < policy.min_unseen_gain:
            reasons.append(f"only memorises: on the {unseen['mentions']} held-out mentions whose text never occurs in the training corrections F1 "
                           f"{100 * unseen['after']['f1']:.2f} vs {100 * unseen['before']['f1']:.2f} ({100 * gain:+.2f}; at least {100 * policy.min_unseen_gain:+.2f} required)")
    newest = metrics.get("time")
    if newest:
        drop = newest["before"]["f1"] - newest["after"]["f1"]
        checks["time_gain"] = -drop
        if drop > policy.max_time_drop:
            reasons.append(f"loses on the newest corrections: F1 {100 * newest['after']['f1']:.2f} vs {100 * newest['before']['f1']:.2f} on "
                           f"the {newest['documents']} newest documents")
    return reasons


def promotion_decision(metrics: dict[str, Any], policy: GatePolicy) -> Decision:
    """Promote only when the hash held-out F1 beats the reference's by ``min_gain``, no label with
    enough support loses more than ``max_label_drop``, and none of the other measures (present in
    ``metrics`` as ``measure`` writes them) says the candidate forgets, memorises, or loses on the
    newest corrections. Every reason that applies is given."""
    held = metrics.get("heldout") or {}
    before, after = held.get("before"), held.get("after")
    if before is None or after is None:
        return Decision(False, "no held-out corrections to compare on: kept as a candidate")
    gain = after["f1"] - before["f1"]
    worst, worst_drop = _worst_label(before, after, policy.min_label_support)
    checks: dict[str, Any] = {"heldout_gain": gain}
    reasons = []
    if gain < policy.min_gain:
        reasons.append(f"held-out F1 {100 * after['f1']:.2f} vs {100 * before['f1']:.2f} of the active model: gain {100 * gain:+.2f} is below the required {100 * policy.min_gain:.2f}")
    if worst is not None and worst_drop > policy.max_label_drop:
        reasons.append(f"label {worst} loses {100 * worst_drop:.2f} F1 on the held-out corrections (at most {100 * policy.max_label_drop:.2f} allowed)")
    reasons += _refusals(metrics, policy, checks)
    if reasons:
        return Decision(False, "; ".join(reasons), gain, worst, worst_drop, checks)
    newest = metrics.get("time")
    # with corrections sent in related batches (one source, one day) the hash part shares its texts'
    # context with the training part and promises more than new texts get; the newest part comes closest
    on_newest = f"; on the {newest['documents']} newest documents {100 * checks['time_gain']:+.2f}" if newest else ""
    return Decision(True, f"held-out F1 {100 * after['f1']:.2f} vs {100 * before['f1']:.2f} ({100 * gain:+.2f}){on_newest}; no label loses more than "
                          f"{100 * policy.max_label_drop:.2f}; no sign of forgetting or memorising", gain, worst, worst_drop, checks)
