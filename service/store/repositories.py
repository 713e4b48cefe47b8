"""The only code that writes (and commits) to the database. Keyword-only functions over a Session,
and the prediction writer's store (bulk INSERTs through the DB-API: it is on every stored /tag's path)."""
from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

from sqlalchemy import ColumnElement, Dialect, Engine, Table, and_, delete, distinct, func, insert, or_, select, tuple_, update
from sqlalchemy import text as sql_text
from sqlalchemy.engine import CursorResult, Result
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, aliased

from service.store.tables import Annotation, Document, ModelVersion, Prediction, new_id, new_ids, utcnow


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class PredictionRecord:
    id: uuid.UUID
    text: str
    model_name: str
    model_version: str
    entities: list[dict]
    min_score: float
    latency_ms: float


class BulkInsert:
    """``INSERT INTO table (columns)`` for many rows, straight through the DB-API cursor.

    The statement is compiled once for the dialect and each value goes through the column type's
    own bind processor (``TypeEngine.bind_processor``: UUIDs, datetimes and JSON are stored exactly
    as SQLAlchemy stores them, and read back by the ORM alike). What it skips is the per-execution
    work of a Session and of ``Connection.execute`` (cache lookup, parameter routing, result
    objects): on SQLite a one-prediction commit took 0.25 ms of CPU through a Session, 0.17 through
    ``Connection.execute`` and 0.09-0.12 this way; at concurrency 1 that commit is on every stored
    /tag's path (docs/benchmarks/history.md, Speed)."""

    def __init__(self, dialect: Dialect, table: Table, columns: Sequence[str]):
        compiled = insert(table).compile(dialect=dialect, column_keys=list(columns))
        self.sql = str(compiled)
        # positional paramstyles (qmark: sqlite3) list the binds in order; named ones (pyformat:
        # psycopg) take a dict keyed by column
        self.positional = compiled.positiontup is not None
        self.names = list(compiled.positiontup) if compiled.positiontup is not None else list(columns)
        self.processors = [table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in self.names]

    def parameters(self, rows: Sequence[dict[str, Any]]) -> list[Any]:
        out: list[Any] = []
        for row in rows:
            values = [row[name] if p is None or row[name] is None else p(row[name]) for name, p in zip(self.names, self.processors, strict=True)]
            out.append(tuple(values) if self.positional else dict(zip(self.names, values, strict=True)))
        return out


class PredictionStore:
    """Writes predictions for the group writer: one transaction and two bulk INSERTs per batch of
    concurrent requests, on a pooled connection of ``engine``. Errors come out as SQLAlchemy's
    (``DBAPIError`` subclasses, parameters hidden: they hold users' texts), and a connection the
    database dropped is discarded from the pool."""

    def __init__(self, engine: Engine):
        self.engine = engine
        dialect = engine.dialect
        self._documents = BulkInsert(dialect, _table(Document), ["id", "text", "text_sha256", "length", "created_at"])
        self._predictions = BulkInsert(dialect, _table(Prediction), [
            "id", "document_id", "model_name", "model_version", "entities", "min_score", "latency_ms", "created_at"])

    def store(self, records: Sequence[PredictionRecord], *, store_text: bool) -> None:
        """Commits all of ``records`` or none (the error is raised)."""
        now = utcnow()
        documents, predictions = [], []
        for r, doc_id in zip(records, new_ids(len(records)), strict=True):
            documents.append({"id": doc_id, "text": r.text if store_text else None, "text_sha256": sha256(r.text), "length": len(r.text), "created_at": now})
            predictions.append({
                "id": r.id, "document_id": doc_id, "model_name": r.model_name, "model_version": r.model_version, "entities": r.entities,
                "min_score": r.min_score, "latency_ms": r.latency_ms, "created_at": now,
            })
        dialect = self.engine.dialect
        try:  # a pooled connection: the engine's connect-time settings apply
            connection = self.engine.raw_connection()
        except dialect.loaded_dbapi.Error as e:  # the pool passes a failed connect through unwrapped
            raise DBAPIError.instance(None, None, e, dialect.loaded_dbapi.Error, hide_parameters=True, dialect=dialect) from e
        statement = self._documents.sql
        cursor = None
        try:
            cursor = connection.cursor()
            cursor.executemany(statement, self._documents.parameters(documents))
            statement = self._predictions.sql
            cursor.executemany(statement, self._predictions.parameters(predictions))
            cursor.close()
            connection.commit()
        except dialect.loaded_dbapi.Error as e:
            invalidated = dialect.is_disconnect(e, connection, cursor)
            if invalidated:
                connection.invalidate(e)
            else:
                connection.rollback()
            raise DBAPIError.instance(statement, None, e, dialect.loaded_dbapi.Error, hide_parameters=True,
                                      connection_invalidated=invalidated, dialect=dialect) from e
        finally:
            connection.close()  # back to the pool


def _table(model: type) -> Table:
    table = model.__table__  # type: ignore[attr-defined]
    assert isinstance(table, Table)
    return table


def get_prediction(session: Session, *, prediction_id: uuid.UUID) -> Prediction | None:
    return session.get(Prediction, prediction_id)


class IdempotencyConflict(Exception):
    """The key was used before with a different request body."""


class IntegrityConflict(Exception):
    """A write refused by a constraint that is not an idempotency replay; the message says why."""


@dataclass
class StoredAnnotation:
    annotation: Annotation
    replayed: bool  # True when an earlier request with the same key and body created it


def find_by_idempotency_key(session: Session, *, key: str, request_sha256: str, not_before: dt.datetime | None = None) -> Annotation | None:
    """The correction stored under ``key`` (keys older than ``not_before`` have expired: None)."""
    query = select(Annotation).where(Annotation.idempotency_key == key)
    if not_before is not None:
        query = query.where(Annotation.created_at >= not_before)
    found = session.scalars(query).first()
    if found is not None and found.request_sha256 != request_sha256:
        raise IdempotencyConflict(key)
    return found


def _advisory_lock(session: Session, key: int) -> None:
    """On PostgreSQL, wait for and hold a transaction-scoped advisory lock on ``key`` (until commit or
    rollback); elsewhere nothing (SQLite runs one writing transaction at a time anyway)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(sql_text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def _lock_text(session: Session, digest: str) -> None:
    """Serialise the writes that concern one text (corrections, erasures) by its SHA-256."""
    _advisory_lock(session, int(digest[:15], 16))


def _document_for_text(session: Session, digest: str) -> Document | None:
    """The document a new text's correction belongs to: the one its accepted correction is on, else
    the newest stored copy of the text (so the same text twice is one document)."""
    accepted = select(Annotation.document_id).where(Annotation.text_sha256 == digest, Annotation.status == "accepted")
    found = session.scalars(select(Document).where(Document.id.in_(accepted))).first()
    if found is None:
        found = session.scalars(select(Document).where(Document.text_sha256 == digest).order_by(Document.created_at.desc())).first()
    return found


def _is_accepted_race(error: IntegrityError) -> bool:
    message = str(error.orig)
    return "uq_annotations_accepted_text" in message or "annotations.text_sha256" in message


def _conflict_reason(error: IntegrityError) -> str:
    # a fixed description per constraint: the driver's message may quote stored values
    message = str(error.orig).lower()
    if "foreign key" in message:
        return "the prediction or document this correction refers to was deleted meanwhile"
    if "idempotency_key" in message:
        return "the Idempotency-Key is in use by a concurrent request with another body"
    if "text_sha256" in message or "uq_annotations_accepted_text" in message:
        return "concurrent corrections of the same text kept conflicting; retry"
    return "the correction conflicts with stored data"


def create_annotation(
    session: Session,
    *,
    text: str,
    entities: list[dict],
    author: str | None,
    source: str,
    prediction: Prediction | None = None,
    idempotency_key: str | None = None,
    request_sha256: str | None = None,
    idempotency_ttl: dt.timedelta | None = None,
    attempts: int = 4,
) -> StoredAnnotation:
    """Store a correction as the one accepted correction of its text: the text's earlier accepted
    correction (on any document) is superseded in the same transaction, and a new text joins the
    document of an earlier copy. A partial unique index allows one accepted correction per text;
    a concurrent correction of the same text makes the commit fail, and the write is retried (the
    later one supersedes). A repeated idempotency key with the same body returns the first
    annotation, unchanged; keys expire after ``idempotency_ttl``. Raises IntegrityConflict when a
    constraint refuses the write for another reason.

    The corrected text is always kept, also when STORE_TEXT keeps only hashes of tagged texts:
    a correction is training data, and training needs the text."""
    digest = sha256(text)
    prediction_id = prediction.id if prediction is not None else None
    not_before = utcnow() - idempotency_ttl if idempotency_ttl is not None else None
    for attempt in range(attempts):
        # corrections of one text queue up behind each other (until commit): the later one finds
        # the earlier's document and supersedes its correction, instead of failing on the index
        _lock_text(session, digest)
        if idempotency_key is not None:
            found = find_by_idempotency_key(session, key=idempotency_key, request_sha256=request_sha256 or "", not_before=not_before)
            if found is not None:
                return StoredAnnotation(found, True)
            if not_before is not None:  # an expired key may be used again
                session.execute(update(Annotation).where(Annotation.idempotency_key == idempotency_key, Annotation.created_at < not_before).values(idempotency_key=None))
        if prediction_id is not None:
            prediction = session.get(Prediction, prediction_id)
            if prediction is None:
                raise IntegrityConflict("the prediction was deleted meanwhile")
            document = prediction.document
            if document.text is None:
                document.text = text
        else:
            existing = _document_for_text(session, digest)
            if existing is None:
                document = Document(id=new_id(), text=text, text_sha256=digest, length=len(text))
                session.add(document)
                session.flush()
            else:
                document = existing
                if document.text is None:
                    document.text = text
        session.execute(update(Annotation).where(Annotation.text_sha256 == digest, Annotation.status == "accepted").values(status="superseded"))
        annotation = Annotation(
            document_id=document.id, prediction_id=prediction_id, entities=entities, text_sha256=digest, author=author,
            source=source, status="accepted", idempotency_key=idempotency_key, request_sha256=request_sha256, created_at=utcnow(),
        )
        session.add(annotation)
        try:
            session.commit()
        except IntegrityError as e:
            session.rollback()
            if idempotency_key is not None:
                # a concurrent request with the same idempotency key won the race: answer as a replay
                found = find_by_idempotency_key(session, key=idempotency_key, request_sha256=request_sha256 or "", not_before=not_before)
                if found is not None:
                    return StoredAnnotation(found, True)
            if _is_accepted_race(e) and attempt < attempts - 1:
                continue  # another correction of this text committed first: supersede it
            raise IntegrityConflict(_conflict_reason(e)) from None
        return StoredAnnotation(annotation, False)
    raise AssertionError("unreachable")


def iter_annotations(session: Session, *, since: dt.datetime | None = None, batch: int = 500) -> Iterator[Annotation]:
    """Accepted corrections with their text, oldest first, read in pages with an id cursor. Each
    page is read in a transaction of its own that ends before its rows are handed out: a slow
    reader of /annotations holds no connection between pages (the rows, their documents joined,
    stay loaded: the session does not expire them)."""
    query = select(Annotation).where(Annotation.status == "accepted")
    if since is not None:
        query = query.where(Annotation.created_at >= since)
    last_id = 0
    while True:
        rows = session.scalars(query.where(Annotation.id > last_id).order_by(Annotation.id).limit(batch)).all()
        session.commit()  # read-only: ends the transaction, the connection goes back to the pool
        if not rows:
            return
        yield from rows
        last_id = rows[-1].id


def _uncorrected_text() -> ColumnElement[bool]:
    """A stored copy of a text (with its text) that no accepted correction covers."""
    accepted = select(Annotation.id).where(Annotation.text_sha256 == Document.text_sha256, Annotation.status == "accepted")
    return and_(Document.text.is_not(None), ~accepted.exists())


def least_confident(session: Session, *, limit: int) -> list[Prediction]:
    """Stored predictions whose weakest token marginal is lowest, on texts nobody corrected yet: one
    per text (the least confident of its stored copies), none of a text with an accepted correction
    (on any copy). Both conditions are NOT EXISTS probes of indexed columns, so the database can walk
    the min_score index and stop after ``limit`` rows."""
    other, copy = aliased(Prediction), aliased(Document)
    ranks_before = tuple_(other.min_score, other.created_at, other.id) < tuple_(Prediction.min_score, Prediction.created_at, Prediction.id)
    better_copy = select(other.id).join(copy, other.document_id == copy.id).where(copy.text_sha256 == Document.text_sha256, copy.text.is_not(None), ranks_before)
    query = (
        select(Prediction)
        .join(Document)
        .where(_uncorrected_text(), ~better_copy.exists())
        .order_by(Prediction.min_score.asc(), Prediction.created_at.asc(), Prediction.id.asc())
        .limit(limit)
    )
    return list(session.scalars(query).all())


def register_model(session: Session, *, name: str, version: str, path: str, metrics: dict, lineage: dict) -> ModelVersion:
    """The models row of ``name`` and ``version``, inserted or updated. Workers starting together on
    PostgreSQL take turns (an advisory lock until commit): the later ones find the row instead of
    inserting it again, which failed on uq_models_name_version (an ERROR in the server's log and a
    sequence value lost). On SQLite a concurrent insert still fails; the caller looks the row up."""
    _advisory_lock(session, int(sha256(f"models\0{name}\0{version}")[:15], 16))
    row = session.scalars(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)).first()
    if row is None:
        row = ModelVersion(name=name, version=version, path=path, metrics=metrics, lineage=lineage, active=False)
        session.add(row)
    else:
        row.path, row.metrics, row.lineage = path, metrics, lineage
    session.commit()
    return row


def activate_model(session: Session, *, model_id: int) -> ModelVersion:
    row = session.get(ModelVersion, model_id)
    if row is None:
        raise LookupError(f"no model with id {model_id}")
    session.execute(update(ModelVersion).where(ModelVersion.active.is_(True)).values(active=False))
    row.active = True
    row.activated_at = utcnow()
    session.commit()
    return row


def active_model(session: Session) -> ModelVersion | None:
    return session.scalars(select(ModelVersion).where(ModelVersion.active.is_(True))).first()


def list_models(session: Session) -> list[ModelVersion]:
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.id)).all())


def get_model(session: Session, *, model_id: int) -> ModelVersion | None:
    return session.get(ModelVersion, model_id)


def find_model(session: Session, *, name: str, version: str) -> ModelVersion | None:
    return session.scalars(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)).first()


def annotation_entities(annotation: Annotation) -> list[dict[str, Any]]:
    return [{"start": e["start"], "end": e["end"], "label": e["label"]} for e in annotation.entities]


def count_accepted_annotations(session: Session) -> int:
    """Texts with an accepted correction (superseded ones are not counted again)."""
    return session.scalar(select(func.count()).select_from(Annotation).where(Annotation.status == "accepted")) or 0


def count_queue(session: Session) -> int:
    """How many texts ``least_confident`` could still hand out (one per text)."""
    query = select(func.count(distinct(Document.text_sha256))).select_from(Prediction).join(Document).where(_uncorrected_text())
    return session.scalar(query) or 0


# retention and erasure: what `ner db purge`, DELETE /documents and DELETE /predictions/{id} remove


def _rowcount(result: Result[Any]) -> int:
    return cast("CursorResult[Any]", result).rowcount


@dataclass
class Removed:
    documents: int = 0
    predictions: int = 0
    annotations: int = 0
    idempotency_keys: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def purge(session: Session, *, retention_days: float | None, idempotency_ttl: dt.timedelta, now: dt.datetime | None = None) -> Removed:
    """Delete predictions older than ``retention_days`` and the texts (documents) of that age that
    no correction refers to; corrections and their texts stay (they are the training data; erase
    one with ``erase_document``). Clear idempotency keys older than ``idempotency_ttl``."""
    now = now or utcnow()
    removed = Removed()
    if retention_days is not None:
        cutoff = now - dt.timedelta(days=retention_days)
        removed.predictions = _rowcount(session.execute(delete(Prediction).where(Prediction.created_at < cutoff)))
        corrected = select(Annotation.document_id)
        uncorrected_old = delete(Document).where(Document.created_at < cutoff, Document.id.not_in(corrected))
        # their remaining (younger) predictions go with them (ON DELETE CASCADE)
        removed.documents = _rowcount(session.execute(uncorrected_old))
    expired = update(Annotation).where(Annotation.idempotency_key.is_not(None), Annotation.created_at < now - idempotency_ttl).values(idempotency_key=None)
    removed.idempotency_keys = _rowcount(session.execute(expired))
    session.commit()
    return removed


def erase_document(session: Session, *, document_id: uuid.UUID) -> Removed | None:
    """``erase_text`` for the text of a stored document. None if the document does not exist."""
    document = session.get(Document, document_id)
    if document is None:
        return None
    return erase_text(session, digest=document.text_sha256)


def erase_text(session: Session, *, digest: str) -> Removed:
    """Erase a text and everything derived from it: every stored copy of the text whose SHA-256 is
    ``digest`` (documents, also those that kept only the hash), their predictions and every
    correction of it."""
    _lock_text(session, digest)
    copies = select(Document.id).where(Document.text_sha256 == digest)
    of_text = or_(Annotation.document_id.in_(copies), Annotation.text_sha256 == digest)
    # explicit deletes rather than relying on ON DELETE CASCADE alone (a SQLite connection without
    # PRAGMA foreign_keys would silently keep the children)
    removed = Removed(annotations=_rowcount(session.execute(delete(Annotation).where(of_text))))
    removed.predictions = _rowcount(session.execute(delete(Prediction).where(Prediction.document_id.in_(copies))))
    removed.documents = _rowcount(session.execute(delete(Document).where(Document.text_sha256 == digest)))
    session.commit()
    return removed


def erase_prediction(session: Session, *, prediction_id: uuid.UUID) -> Removed | None:
    """Delete a prediction, and its stored text (its document) when nothing else refers to it: no
    other prediction and no correction (a correction keeps its text: it is the training data; a
    correction of this prediction stays, without the link). None if the prediction does not exist."""
    prediction = session.get(Prediction, prediction_id)
    if prediction is None:
        return None
    document_id, digest = prediction.document_id, prediction.document.text_sha256
    _lock_text(session, digest)  # a correction of the same text cannot join the document meanwhile
    session.execute(update(Annotation).where(Annotation.prediction_id == prediction_id).values(prediction_id=None))
    removed = Removed(predictions=_rowcount(session.execute(delete(Prediction).where(Prediction.id == prediction_id))))
    referred = or_(
        select(Prediction.id).where(Prediction.document_id == document_id).exists(),
        select(Annotation.id).where(Annotation.document_id == document_id).exists(),
    )
    removed.documents = _rowcount(session.execute(delete(Document).where(Document.id == document_id, ~referred)))
    session.commit()
    return removed
