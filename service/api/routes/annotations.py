"""GET /annotations: the stored corrections as training data (JSONL or CoNLL), and
GET /annotations/queue: the stored texts the model was least sure about, for annotators."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import SQLAlchemyError

from service.api.deps import RuntimeDep, SessionDep, require_api_key
from service.db import repositories
from service.errors import database_unavailable
from service.exports import export_lines
from service.schemas import QueueItem

router = APIRouter(tags=["annotations"], dependencies=[Depends(require_api_key)])


@router.get("/annotations")
def export_annotations(
    runtime: RuntimeDep,
    session: SessionDep,
    format: Literal["jsonl", "conll"] = "jsonl",
    since: dt.datetime | None = Query(None, description="only corrections stored at or after this time (ISO 8601)"),
):
    lines = export_lines(session, format, since, language=runtime.tagging.model.language)
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


@router.get("/annotations/queue", response_model=list[QueueItem])
def queue(session: SessionDep, limit: int = Query(20, ge=1, le=500)):
    """Uncorrected stored texts whose weakest token marginal is lowest: correct these first."""
    rows = repositories.least_confident(session, limit=limit)
    return [
        QueueItem(prediction_id=p.id, text=p.document.text or "", entities=p.entities, min_score=p.min_score, model={"name": p.model_name, "version": p.model_version})
        for p in rows
    ]
