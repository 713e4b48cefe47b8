"""Retention and erasure: what `ner db purge` and DELETE /documents/{id} remove. Keyword-only
functions over a Session that commit, like service.db.repositories."""
from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import asdict, dataclass

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from service.db.models import Annotation, Document, Prediction, utcnow


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
        removed.predictions = session.execute(delete(Prediction).where(Prediction.created_at < cutoff)).rowcount
        corrected = select(Annotation.document_id)
        uncorrected_old = delete(Document).where(Document.created_at < cutoff, Document.id.not_in(corrected))
        # their remaining (younger) predictions go with them (ON DELETE CASCADE)
        removed.documents = session.execute(uncorrected_old).rowcount
    expired = update(Annotation).where(Annotation.idempotency_key.is_not(None), Annotation.created_at < now - idempotency_ttl).values(idempotency_key=None)
    removed.idempotency_keys = session.execute(expired).rowcount
    session.commit()
    return removed


def erase_document(session: Session, *, document_id: uuid.UUID) -> Removed | None:
    """Erase a text and everything derived from it: every stored copy of the same text (documents
    with its hash), their predictions and their corrections. None if the document does not exist."""
    document = session.get(Document, document_id)
    if document is None:
        return None
    copies = select(Document.id).where(Document.text_sha256 == document.text_sha256)
    removed = Removed(
        predictions=session.scalar(select(func.count()).select_from(Prediction).where(Prediction.document_id.in_(copies))) or 0,
        annotations=session.scalar(select(func.count()).select_from(Annotation).where(Annotation.document_id.in_(copies))) or 0,
    )
    # explicit deletes rather than relying on ON DELETE CASCADE alone (a SQLite connection without
    # PRAGMA foreign_keys would silently keep the children)
    session.execute(delete(Annotation).where(Annotation.document_id.in_(copies)))
    session.execute(delete(Prediction).where(Prediction.document_id.in_(copies)))
    removed.documents = session.execute(delete(Document).where(Document.text_sha256 == document.text_sha256)).rowcount
    session.commit()
    return removed
