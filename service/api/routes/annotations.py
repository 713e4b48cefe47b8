"""GET /annotations: the stored corrections as training data (JSONL or CoNLL), and
GET /annotations/queue: the stored texts the model was least sure about, for annotators."""
from __future__ import annotations

import datetime as dt
import io
import json
from typing import Iterator, Literal, Optional

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import SQLAlchemyError

from ml.data.conll import write_conll
from ml.data.jsonl import text_to_sentences
from service import metrics
from service.api.deps import RuntimeDep, SessionDep, require_api_key
from service.db import repositories
from service.errors import ApiError
from service.schemas import QueueItem

router = APIRouter(tags=["annotations"], dependencies=[Depends(require_api_key)])


def export_lines(sessions, language: str, fmt: str, since: Optional[dt.datetime]) -> Iterator[str]:
    """One JSONL record, or one CoNLL document (IOB2, two columns), per accepted correction."""
    with sessions() as session:
        for a in repositories.iter_annotations(session, since=since):
            text = a.document.text  # always kept for corrected texts (see repositories.create_annotation)
            entities = repositories.annotation_entities(a)
            if fmt == "jsonl":
                meta = {"author": a.author, "source": a.source, "created_at": a.created_at.isoformat(), "prediction_id": str(a.prediction_id) if a.prediction_id else None}
                yield json.dumps({"id": a.id, "text": text, "entities": entities, "meta": meta}, ensure_ascii=False) + "\n"
            else:
                spans = [(e["start"], e["end"], e["label"]) for e in entities]
                # spans were token-aligned when accepted; only another tokenizer (a model of another
                # language since) could split them, and then they are widened to whole tokens
                sentences = text_to_sentences(text, spans, language, doc_id=a.id, allow_partial=True)
                out = io.StringIO()
                write_conll(sentences, out, scheme="iob2")
                yield out.getvalue()


@router.get("/annotations")
def annotations(
    runtime: RuntimeDep,
    format: Literal["jsonl", "conll"] = "jsonl",
    since: Optional[dt.datetime] = Query(None, description="only corrections stored at or after this time (ISO 8601)"),
):
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=dt.timezone.utc)
    lines = export_lines(runtime.sessions, runtime.tagging.model.language, format, since)
    try:
        first = next(lines, "")  # touch the database before the 200 goes out
    except SQLAlchemyError as e:
        metrics.DB_ERRORS.labels(operation="export").inc()
        raise ApiError(503, "database_unavailable", f"the database is unavailable: {type(e).__name__}", {"Retry-After": "5"}) from None

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
