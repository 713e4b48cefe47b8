"""GET /annotations: the stored corrections as training data (JSONL or CoNLL), and
GET /annotations/queue: the stored texts the model was least sure about, for annotators."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import SQLAlchemyError

from service.api.deps import RuntimeDep, SessionDep, require_annotate_key, require_read_key
from service.errors import ApiError, database_unavailable
from service.schemas import QueueItem
from service.training.exports import export_lines
from service.training.feedback import review_queue

router = APIRouter(tags=["annotations"])


def _parse_since(value: str | None) -> dt.datetime | None:
    # ISO 8601 only: pydantic would also take a number as a Unix time, which the schema does not say
    if value is None:
        return None
    try:
        return dt.datetime.fromisoformat(value)
    except ValueError:
        raise ApiError(422, "invalid_request", f"since: {value!r} is not an ISO 8601 date-time (e.g. 2026-11-27T10:00:00Z)") from None


@router.get("/annotations", dependencies=[Depends(require_read_key)])
def export_annotations(
    runtime: RuntimeDep,
    session: SessionDep,
    format: Literal["jsonl", "conll"] = "jsonl",
    since_text: str | None = Query(None, alias="since", description="only corrections stored at or after this time (ISO 8601)", json_schema_extra={"format": "date-time"}),
):
    lines = export_lines(session, format, _parse_since(since_text), language=runtime.tagging.model.language)
    try:
        first = next(lines, "")  # touch the database before the 200 goes out
    except SQLAlchemyError as e:
        raise database_unavailable(e, operation="export") from None

    def body() -> Iterator[str]:
        yield first
        yield from lines

    media = "application/x-ndjson" if format == "jsonl" else "text/plain; charset=utf-8"
    filename = f"annotations.{'jsonl' if format == 'jsonl' else 'conll'}"
    return StreamingResponse(body(), media_type=media, headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.get("/annotations/queue", response_model=list[QueueItem], dependencies=[Depends(require_annotate_key)])
def queue(session: SessionDep, limit: int = Query(20, ge=1, le=500)):
    """Uncorrected stored texts whose weakest token marginal is lowest: correct these first."""
    rows = review_queue(session, limit=limit)
    return [
        QueueItem(prediction_id=p.id, text=p.document.text or "", entities=p.entities, min_score=p.min_score, model={"name": p.model_name, "version": p.model_version})
        for p in rows
    ]
