"""Entity rule sets in the database: versions (the newest is the one served), the rules each holds,
and the one way to write them, ``create_version``. A rule row never changes; a version lists its
rules in ``rule_set_rules``, so a rule keeps its id from version to version."""
from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy import func, insert, literal, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ml.rules import Rule
from service.store.tables import EntityRule, RuleSetMember, RuleSetVersion


class RuleSetConflict(Exception):
    """Another change was stored from the same version first; the caller should re-read and retry."""


def newest_version(session: Session) -> RuleSetVersion | None:
    return session.scalars(select(RuleSetVersion).order_by(RuleSetVersion.id.desc()).limit(1)).first()


def newest_version_id(session: Session) -> int | None:
    """The served version's number, in one cheap query (what every worker polls)."""
    return session.scalar(select(func.max(RuleSetVersion.id)))


def get_version(session: Session, *, version: int) -> RuleSetVersion | None:
    return session.get(RuleSetVersion, version)


def list_versions(session: Session, *, limit: int = 100) -> list[RuleSetVersion]:
    return list(session.scalars(select(RuleSetVersion).order_by(RuleSetVersion.id.desc()).limit(limit)))


def rules_of(session: Session, *, version: int) -> list[Rule]:
    """The rules of a version, oldest first (in that order a duplicate phrase keeps the older rule)."""
    rows = session.execute(
        select(EntityRule.id, EntityRule.label, EntityRule.phrase, EntityRule.pattern, EntityRule.case_sensitive, EntityRule.note, EntityRule.author)
        .join(RuleSetMember, RuleSetMember.rule_id == EntityRule.id)
        .where(RuleSetMember.rule_set_id == version)
        .order_by(EntityRule.id)
    )
    return [
        Rule(label, phrase, tuple(pattern) if pattern is not None else None, bool(case), rule_id, note, author)
        for rule_id, label, phrase, pattern, case, note, author in rows
    ]


def _rule_row(rule: Rule, version: int) -> dict[str, Any]:
    pattern = [dict(e) for e in rule.pattern] if rule.pattern is not None else None
    return {"label": rule.label, "phrase": rule.phrase, "pattern": pattern, "case_sensitive": rule.case_sensitive, "note": rule.note, "author": rule.author, "added_in": version}


def create_version(
    session: Session,
    *,
    parent: int,
    mode: str,
    action: str,
    author: str | None,
    note: str | None,
    keep_from: int | None = None,
    drop: Collection[int] = (),
    new: Sequence[Rule] = (),
) -> RuleSetVersion:
    """Store a new version made from version ``parent`` (0: none yet) and commit: the rules of
    ``keep_from`` except ``drop``, plus ``new`` (stored as new rules). Raises RuleSetConflict when
    another version was already made from ``parent``."""
    row = RuleSetVersion(parent=parent, mode=mode, action=action, rule_count=0, author=author, note=note)
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise RuleSetConflict(f"the rule set changed while this change was made (version {parent} already has a successor)") from None
    if keep_from is not None:
        kept = select(literal(row.id), RuleSetMember.rule_id).where(RuleSetMember.rule_set_id == keep_from)
        if drop:
            kept = kept.where(RuleSetMember.rule_id.not_in(list(drop)))
        session.execute(insert(RuleSetMember).from_select(["rule_set_id", "rule_id"], kept))
    if new:
        session.execute(insert(EntityRule), [_rule_row(r, row.id) for r in new])
        added = select(literal(row.id), EntityRule.id).where(EntityRule.added_in == row.id)
        session.execute(insert(RuleSetMember).from_select(["rule_set_id", "rule_id"], added))
    row.rule_count = session.scalar(select(func.count()).select_from(RuleSetMember).where(RuleSetMember.rule_set_id == row.id)) or 0
    session.commit()
    return row
