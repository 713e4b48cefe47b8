"""Entity rules in the service: the rule set every worker applies after the model (ml.rules), the
changes an administrator makes (each stored as a new version), following the newest version (every
worker and replica picks it up within MODEL_POLL_S, between two batches), and the dry run. No
FastAPI here."""
from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ml.pipeline import apply_rules
from ml.rules import EntityFilter, PhraseTokenizer, Rule, RuleError, RuleLimits, RuleSet, parse_rules
from service import metrics
from service.config import Settings
from service.errors import ApiError
from service.serving.engine import TaggingEngine
from service.serving.model import ServedModel
from service.store import rules as store
from service.store.tables import Document, RuleSetVersion

log = logging.getLogger("service.serving.rules")

DEFAULT_MODE = "override"  # before the first version is stored
FREEZE_AT = 1000  # rules from which a compiled set is moved out of the garbage collector's reach (compile_rules)


def limits(settings: Settings) -> RuleLimits:
    return RuleLimits(max_rules=settings.rules_max, max_chars=settings.rule_max_chars, max_patterns=settings.rules_max_patterns)


def rule_labels(model: ServedModel, settings: Settings) -> list[str]:
    """The labels a rule may give, and a request may filter on: the model's, then EXTRA_LABELS."""
    return list(model.labels) + [x for x in settings.extra_labels if x not in model.labels]


def compile_rules(rules: Sequence[Rule], mode: str, version: int | None, language: str) -> RuleSet:
    started = time.perf_counter()
    compiled = RuleSet(rules, mode, version, PhraseTokenizer.for_language(language))
    if len(compiled) >= FREEZE_AT:
        # A large rule set is hundreds of thousands of long-lived objects; left in the collector's
        # generations, every full collection walks them again while requests allocate (measured:
        # 100,000 phrase rules cost /tag batches about twice as much with them as without).
        # Frozen, the collector skips them; they are still freed by reference counting when a newer
        # version replaces this one (a rule set holds no reference cycles).
        gc.collect()
        gc.freeze()
    metrics.RULES_LOAD_SECONDS.observe(time.perf_counter() - started)
    return compiled


def empty_rules() -> RuleSet:
    return RuleSet([], DEFAULT_MODE, None, tokenize=str.split)


def load_newest(session: Session, language: str) -> RuleSet:
    """The newest stored version, compiled (an empty rule set when none is stored)."""
    row = store.newest_version(session)
    if row is None:
        return empty_rules()
    return compile_rules(store.rules_of(session, version=row.id), row.mode, row.id, language)


def initial_rules(settings: Settings, session: Session, model: ServedModel) -> RuleSet:
    """The newest rule set, compiled for the model's language; TAG_MIN_SCORE and TAG_LABELS are
    checked against the model here (a start-up error naming the bad value)."""
    try:
        EntityFilter.of(settings.tag_min_score, settings.tag_labels or None, rule_labels(model, settings))
    except ValueError as e:
        raise ValueError(f"TAG_LABELS / TAG_MIN_SCORE: {e}") from None
    return load_newest(session, model.language)


def _newest(sessions: sessionmaker[Session], language: str, known: int | None) -> RuleSet | None:
    # the poller runs outside any request, so it opens its own session; None when nothing changed
    with sessions() as session:
        if store.newest_version_id(session) == known:
            return None
        return load_newest(session, language)


async def follow_rules(engine: TaggingEngine, sessions: sessionmaker[Session], interval_s: float) -> None:
    """Poll for a newer rule set version; load, compile and serve it (between two batches). The
    database being down, or a version failing to load, leaves the current rules serving."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            fresh = await asyncio.to_thread(_newest, sessions, engine.model.language, engine.rules.version)
        except SQLAlchemyError:
            continue
        except Exception:  # logged; the rules in service keep serving
            log.exception("cannot load the newest rule set; still applying version %s", engine.rules.version)
            continue
        if fresh is not None:
            engine.set_rules(fresh)


# ----------------------------------------------------------------------------- changes


@dataclass
class RuleChange:
    """One change of the rule set, as the admin API asks for it."""

    action: str  # add | remove | replace | import | mode | rollback
    add: list[dict[str, Any]] = field(default_factory=list)  # rules as given (checked here)
    lines: list[int] | None = None  # the add rules' line numbers (a file import); else their positions from 1
    remove: list[int] = field(default_factory=list)
    replace: bool = False
    mode: str | None = None
    rollback_to: int | None = None
    author: str | None = None
    note: str | None = None


@dataclass
class Plan:
    parent: RuleSetVersion | None
    mode: str
    keep_from: int | None
    drop: set[int]
    new: list[Rule]
    rules: list[Rule]  # the whole rule set after the change


def _place(n: int, by_line: bool) -> str:
    return f"line {n}" if by_line else f"rules[{n - 1}]"


def refuse(problems: list[tuple[int, str]], by_line: bool) -> ApiError:
    """The 422 for bad rules: each one in ``details`` (its line, or its index in the request's list)."""
    details: list[dict[str, Any]] = [{"line": n, "error": m} if by_line else {"index": n - 1, "error": m} for n, m in problems]
    n, m = problems[0]
    place = _place(n, by_line) if n > 0 else "the rule set"
    return ApiError(422, "invalid_rules", f"{len(problems)} bad rule(s), nothing stored; first: {place}: {m}", details=details)


def plan_change(session: Session, change: RuleChange, labels: list[str], limits_: RuleLimits) -> Plan:
    """What the change makes of the newest version; raises ApiError naming each bad rule (with its
    line or index), an unknown rule id or version, or a rule set over the limits."""
    parent = store.newest_version(session)
    current = store.rules_of(session, version=parent.id) if parent is not None else []
    mode = change.mode or (parent.mode if parent is not None else DEFAULT_MODE)
    if change.rollback_to is not None:
        target = store.get_version(session, version=change.rollback_to)
        if target is None:
            raise ApiError(404, "rule_set_not_found", f"no rule set version {change.rollback_to}")
        return Plan(parent, change.mode or target.mode, target.id, set(), [], store.rules_of(session, version=target.id))
    missing = sorted(set(change.remove) - {r.id for r in current})
    if missing:
        raise ApiError(404, "rule_not_found", f"no rule with id {', '.join(map(str, missing[:10]))} in the current rule set (version {parent.id if parent else 0})")
    by_line = change.lines is not None
    numbers = change.lines if change.lines is not None else list(range(1, len(change.add) + 1))
    try:
        new = parse_rules(zip(numbers, change.add, strict=True), labels, limits_)
    except RuleError as e:
        raise refuse(e.problems, by_line) from None
    base = [] if change.replace else [r for r in current if r.id not in set(change.remove)]
    # the new rules against the ones kept (duplicates, the limits): the kept ones count as line 0
    try:
        parse_rules([(0, r.to_dict()) for r in base] + [(n, r.to_dict()) for n, r in zip(numbers, new, strict=True)], None, limits_)
    except RuleError as e:
        problems = [(n, m.replace("the rule on line 0", "a rule already in the set")) for n, m in e.problems]
        raise refuse(problems, by_line) from None
    keep_from = None if change.replace or parent is None else parent.id
    return Plan(parent, mode, keep_from, set(change.remove), new, base + new)


def store_change(session: Session, change: RuleChange, model: ServedModel, settings: Settings) -> RuleSetVersion:
    """Check and store the change as a new version (nothing is stored when any rule is bad)."""
    plan = plan_change(session, change, rule_labels(model, settings), limits(settings))
    try:
        return store.create_version(
            session, parent=plan.parent.id if plan.parent is not None else 0, mode=plan.mode, action=change.action,
            author=change.author, note=change.note, keep_from=plan.keep_from, drop=plan.drop, new=plan.new,
        )
    except store.RuleSetConflict as e:
        raise ApiError(409, "rule_set_changed", str(e)) from None


async def change_rules(session: Session, engine: TaggingEngine, change: RuleChange) -> RuleSetVersion:
    """Store the change and serve the new version in this worker at once (the others follow within
    MODEL_POLL_S)."""
    row = await asyncio.to_thread(store_change, session, change, engine.model, engine.settings)
    fresh = await asyncio.to_thread(load_newest, session, engine.model.language)
    engine.set_rules(fresh)
    return row


def current_rules(session: Session) -> tuple[RuleSetVersion | None, list[Rule]]:
    """The newest version (None before the first) and its rules."""
    row = store.newest_version(session)
    return row, store.rules_of(session, version=row.id) if row is not None else []


def version_rules(session: Session, version: int | None) -> tuple[int | None, list[Rule]]:
    """The rules of a version (None: the newest); 404 for a version that does not exist."""
    if version is None:
        version = store.newest_version_id(session)
    elif store.get_version(session, version=version) is None:
        raise ApiError(404, "rule_set_not_found", f"no rule set version {version}")
    return version, store.rules_of(session, version=version) if version is not None else []


def list_versions(session: Session, limit: int) -> list[RuleSetVersion]:
    return store.list_versions(session, limit=limit)


# ----------------------------------------------------------------------------- dry run


def sample_texts(session: Session, limit: int) -> list[str]:
    """The most recently stored texts (documents kept with their text; STORE_TEXT off keeps none)."""
    rows = session.scalars(select(Document.text).where(Document.text.is_not(None)).order_by(Document.created_at.desc()).limit(limit))
    return [t for t in rows if t]


def _key(e: Any) -> tuple:
    return (e.start, e.end, e.label, e.source, e.rule_id)


def _entity(e: Any) -> dict[str, Any]:
    return {"start": e.start, "end": e.end, "label": e.label, "text": e.text, "source": e.source, "rule_id": e.rule_id}


def diff_texts(texts: Sequence[str], model: ServedModel, before: RuleSet, after: RuleSet) -> list[dict[str, Any]]:
    """Each text tagged by the model once, the two rule sets applied to it: what would appear and
    what would disappear."""
    out = []
    for text, result in zip(texts, model.tagger.tag(list(texts)), strict=True):
        old = apply_rules(text, result, before).entities if len(before) else result.entities
        new = apply_rules(text, result, after).entities if len(after) else result.entities
        old_keys, new_keys = {_key(e) for e in old}, {_key(e) for e in new}
        added = [_entity(e) for e in new if _key(e) not in old_keys]
        removed = [_entity(e) for e in old if _key(e) not in new_keys]
        out.append({"text": text, "added": added, "removed": removed})
    return out


async def dry_run(session: Session, engine: TaggingEngine, change: RuleChange, sample: int) -> dict[str, Any]:
    """Tag up to ``sample`` stored texts and show what the change would change; stores nothing."""
    model = engine.model
    plan = await asyncio.to_thread(plan_change, session, change, rule_labels(model, engine.settings), limits(engine.settings))
    texts = await asyncio.to_thread(sample_texts, session, sample)
    after = await asyncio.to_thread(compile_rules, plan.rules, plan.mode, None, model.language)
    diffs = await asyncio.to_thread(diff_texts, texts, model, engine.rules, after)
    changed = [d for d in diffs if d["added"] or d["removed"]]
    return {
        "current_version": engine.rules.version, "rules_after": len(plan.rules), "mode_after": plan.mode,
        "sampled": len(texts), "changed": len(changed), "texts": changed,
    }
