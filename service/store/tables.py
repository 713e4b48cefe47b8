"""ORM tables. The schema itself is owned by Alembic (migrations/); a test checks both agree."""
from __future__ import annotations

import datetime as dt
import os
import time
import uuid
from typing import Any, ClassVar

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, Uuid, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_ids(n: int) -> list[uuid.UUID]:
    """``n`` UUIDv7s (RFC 9562): 48 bits of Unix time in milliseconds, then the version, the
    variant and 74 random bits. Rows stored together get ids that sort together, so their inserts
    append to the primary-key and document_id B-trees instead of dirtying a random page each
    (UUIDv4): on SQLite 23 instead of 50 KB written and 0.08 instead of 0.12 ms of CPU per stored
    prediction (docs/benchmarks/history.md, Speed). An id reveals when its row was made, which is stored beside
    it anyway."""
    stamp = (time.time_ns() // 1_000_000).to_bytes(6, "big")
    noise = os.urandom(10 * n)
    ids = []
    for i in range(n):
        b = noise[10 * i : 10 * i + 10]
        ids.append(uuid.UUID(bytes=stamp + bytes((0x70 | (b[0] & 0x0F), b[1], 0x80 | (b[2] & 0x3F))) + b[3:]))
    return ids


def new_id() -> uuid.UUID:
    return new_ids(1)[0]


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class Document(Base):
    """A text the service tagged or was corrected on; ``text`` is NULL when STORE_TEXT is off."""

    __tablename__ = "documents"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=new_id)
    text: Mapped[str | None] = mapped_column(Text, nullable=True)
    text_sha256: Mapped[str] = mapped_column(String(64), index=True)
    length: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Prediction(Base):
    __tablename__ = "predictions"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=new_id)
    document_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"), index=True)
    model_name: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str] = mapped_column(String(100))
    entities: Mapped[list[Any]] = mapped_column(JSON)
    # the least confident token marginal: the active-learning queue sorts by it
    min_score: Mapped[float] = mapped_column(Float, index=True)
    latency_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    document: Mapped[Document] = relationship(lazy="joined")


class Annotation(Base):
    """A correction: the full list of entities a person says the text has."""

    __tablename__ = "annotations"
    __table_args__ = (
        Index("ix_annotations_status_created", "status", "created_at"),
        # at most one accepted correction per text (so per document): the database enforces it
        Index("uq_annotations_accepted_text", "text_sha256", unique=True, postgresql_where=text("status = 'accepted'"), sqlite_where=text("status = 'accepted'")),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    document_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"), index=True)
    prediction_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("predictions.id", ondelete="SET NULL"), nullable=True, index=True)
    entities: Mapped[list[Any]] = mapped_column(JSON)
    text_sha256: Mapped[str] = mapped_column(String(64))  # of the corrected text
    author: Mapped[str | None] = mapped_column(String(200), nullable=True)
    source: Mapped[str] = mapped_column(String(20))  # "prediction" (correcting one) or "text" (new text)
    status: Mapped[str] = mapped_column(String(20), default="accepted")  # accepted | superseded
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True, unique=True)
    request_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    document: Mapped[Document] = relationship(lazy="joined")


class ModelVersion(Base):
    """A model folder the service has served or may serve; at most one is active."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_models_name_version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(100))
    path: Mapped[str] = mapped_column(Text)
    active: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    lineage: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    activated_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # what the promotion gate said about a version a training job produced (None: registered by hand)
    promotion: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class TrainingJob(Base):
    """A retraining request and its run: queued -> running -> succeeded | failed. A running job
    whose heartbeat is older than JOB_STALE_S belongs to a dead worker and is taken again."""

    __tablename__ = "training_jobs"
    __table_args__ = (Index("ix_training_jobs_status_created", "status", "created_at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    status: Mapped[str] = mapped_column(String(20), default="queued")
    trigger: Mapped[str] = mapped_column(String(20))  # "api" (POST /admin/retrain) or "schedule" (every N corrections)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    base_model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"), nullable=True)
    result_model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"), nullable=True)
    corrections: Mapped[int] = mapped_column(Integer, default=0)  # accepted corrections when it was queued
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    log: Mapped[str] = mapped_column(Text, default="")  # the last lines only (see service.training.retrain.LOG_TAIL)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    decision: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class RuleSetVersion(Base):
    """A version of the entity rules (ml.rules); every change makes a new one, and the newest is the
    one served. ``parent`` is the version it was made from (0 for the first): unique, so two changes
    made from the same version at once cannot both be stored (the second is told to retry)."""

    __tablename__ = "rule_sets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # the version number
    parent: Mapped[int] = mapped_column(Integer, unique=True)
    mode: Mapped[str] = mapped_column(String(10))  # override | fill
    action: Mapped[str] = mapped_column(String(20))  # add | remove | replace | import | mode | rollback
    rule_count: Mapped[int] = mapped_column(Integer)
    author: Mapped[str | None] = mapped_column(String(200), nullable=True)
    note: Mapped[str | None] = mapped_column(String(500), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class EntityRule(Base):
    """One rule; never changed once stored. A version holds its rules through ``rule_set_rules``, so
    a rule keeps its id in every version that has it."""

    __tablename__ = "rules"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    label: Mapped[str] = mapped_column(String(50))
    phrase: Mapped[str | None] = mapped_column(Text, nullable=True)
    pattern: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    case_sensitive: Mapped[bool] = mapped_column(Boolean, default=False)
    note: Mapped[str | None] = mapped_column(String(500), nullable=True)
    author: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # the version that added it: its members are found by this column right after the insert
    added_in: Mapped[int] = mapped_column(ForeignKey("rule_sets.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RuleSetMember(Base):
    __tablename__ = "rule_set_rules"
    rule_set_id: Mapped[int] = mapped_column(ForeignKey("rule_sets.id", ondelete="CASCADE"), primary_key=True)
    rule_id: Mapped[int] = mapped_column(ForeignKey("rules.id", ondelete="CASCADE"), primary_key=True, index=True)
