"""The only code that writes (and commits) to the database. Keyword-only functions over a Session."""
from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db.models import Annotation, Document, ModelVersion, Prediction, utcnow


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


def store_predictions(session: Session, *, records: Sequence[PredictionRecord], store_text: bool) -> None:
    """One transaction and two bulk INSERTs for many predictions (the group writer batches
    concurrent requests): this is on the request path of every stored /tag."""
    now = utcnow()
    documents, predictions = [], []
    for r in records:
        doc_id = uuid.uuid4()
        documents.append({"id": doc_id, "text": r.text if store_text else None, "text_sha256": sha256(r.text), "length": len(r.text), "created_at": now})
        predictions.append({
            "id": r.id, "document_id": doc_id, "model_name": r.model_name, "model_version": r.model_version, "entities": r.entities,
            "min_score": r.min_score, "latency_ms": r.latency_ms, "created_at": now,
        })
    session.execute(insert(Document), documents)
    session.execute(insert(Prediction), predictions)
    session.commit()


def get_prediction(session: Session, *, prediction_id: uuid.UUID) -> Prediction | None:
    return session.get(Prediction, prediction_id)


class IdempotencyConflict(Exception):
    """The key was used before with a different request body."""


@dataclass
class StoredAnnotation:
    annotation: Annotation
    replayed: bool  # True when an earlier request with the same key and body created it


def find_by_idempotency_key(session: Session, *, key: str, request_sha256: str) -> Annotation | None:
    found = session.scalars(select(Annotation).where(Annotation.idempotency_key == key)).first()
    if found is not None and found.request_sha256 != request_sha256:
        raise IdempotencyConflict(key)
    return found


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
) -> StoredAnnotation:
    """Store a correction; earlier accepted corrections of the same document are superseded.
    A repeated idempotency key with the same body returns the first annotation, unchanged.
    The corrected text is always kept, also when STORE_TEXT keeps only hashes of tagged texts:
    a correction is training data, and training needs the text."""
    if idempotency_key is not None:
        found = find_by_idempotency_key(session, key=idempotency_key, request_sha256=request_sha256 or "")
        if found is not None:
            return StoredAnnotation(found, True)
    if prediction is not None:
        document = prediction.document
        if document.text is None:
            document.text = text
    else:
        document = Document(id=uuid.uuid4(), text=text, text_sha256=sha256(text), length=len(text))
        session.add(document)
        session.flush()
    session.execute(
        update(Annotation).where(Annotation.document_id == document.id, Annotation.status == "accepted").values(status="superseded")
    )
    annotation = Annotation(
        document_id=document.id, prediction_id=prediction.id if prediction is not None else None, entities=entities, author=author,
        source=source, status="accepted", idempotency_key=idempotency_key, request_sha256=request_sha256, created_at=utcnow(),
    )
    session.add(annotation)
    try:
        session.commit()
    except IntegrityError:
        # a concurrent request with the same idempotency key won the race: answer as a replay
        session.rollback()
        if idempotency_key is None:
            raise
        found = find_by_idempotency_key(session, key=idempotency_key, request_sha256=request_sha256 or "")
        if found is None:
            raise
        return StoredAnnotation(found, True)
    return StoredAnnotation(annotation, False)


def iter_annotations(session: Session, *, since: dt.datetime | None = None, batch: int = 500) -> Iterator[Annotation]:
    """Accepted corrections with their text, oldest first, read in pages."""
    query = select(Annotation).where(Annotation.status == "accepted")
    if since is not None:
        query = query.where(Annotation.created_at >= since)
    last_id = 0
    while True:
        rows = session.scalars(query.where(Annotation.id > last_id).order_by(Annotation.id).limit(batch)).all()
        if not rows:
            return
        yield from rows
        last_id = rows[-1].id


def least_confident(session: Session, *, limit: int) -> list[Prediction]:
    """Stored predictions whose weakest token marginal is lowest, on texts nobody corrected yet."""
    corrected = select(Annotation.document_id)
    query = (
        select(Prediction)
        .join(Document)
        .where(Document.text.is_not(None), Prediction.document_id.not_in(corrected))
        .order_by(Prediction.min_score.asc(), Prediction.created_at.asc())
        .limit(limit)
    )
    return list(session.scalars(query).all())


def register_model(session: Session, *, name: str, version: str, path: str, metrics: dict, lineage: dict) -> ModelVersion:
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
    """How many stored predictions ``least_confident`` could still hand out."""
    corrected = select(Annotation.document_id)
    query = select(func.count()).select_from(Prediction).join(Document).where(Document.text.is_not(None), Prediction.document_id.not_in(corrected))
    return session.scalar(query) or 0
