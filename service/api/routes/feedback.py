"""POST /feedback: corrected entities for a stored prediction or for a new text."""
from __future__ import annotations

import datetime as dt
import hashlib
from typing import Annotated

from fastapi import APIRouter, Depends, Header
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from ml.data.tokenizer import AlignmentError, char_spans_to_token_spans
from service import metrics
from service.api.deps import RuntimeDep, SessionDep, require_annotate_key
from service.api.routes.tag import check_text
from service.db import repositories
from service.db.models import utcnow
from service.errors import ApiError
from service.schemas import FeedbackRequest, FeedbackResponse

router = APIRouter(tags=["feedback"], dependencies=[Depends(require_annotate_key)])


def validate_entities(body: FeedbackRequest, text: str, runtime) -> list[dict]:
    """Spans inside the text, known labels, no overlaps, on token boundaries (or widened to them
    when both the server and the request allow it). Returns the spans to store, sorted."""
    settings = runtime.settings
    model = runtime.tagging.model
    if len(body.entities) > settings.max_entities:
        raise ApiError(422, "too_many_entities", f"{len(body.entities)} entities; the limit is {settings.max_entities}")
    known = set(model.labels) | set(settings.extra_labels)
    spans = []
    for i, e in enumerate(body.entities):
        where = f"entities[{i}] [{e.start}, {e.end})"
        if not 0 <= e.start < e.end <= len(text):
            raise ApiError(422, "span_out_of_range", f"{where} is not a non-empty range inside the text of {len(text)} characters")
        if e.label not in known:
            raise ApiError(422, "unknown_label", f"{where} has label {e.label!r}; known labels: {', '.join(sorted(known))}")
        if e.text is not None and e.text != text[e.start : e.end]:
            raise ApiError(422, "span_text_mismatch", f"{where} says its text is {e.text!r} but the text there is {text[e.start:e.end]!r}")
        spans.append((e.start, e.end, e.label, i))
    spans.sort()
    for a, b in zip(spans, spans[1:]):
        if b[0] < a[1]:
            raise ApiError(422, "overlapping_spans", f"entities[{a[3]}] [{a[0]}, {a[1]}) and entities[{b[3]}] [{b[0]}, {b[1]}) overlap")
    tokens = model.tagger.tokenizer.tokenize(text)
    partial = body.allow_partial and settings.allow_partial_spans
    if body.allow_partial and not settings.allow_partial_spans:
        raise ApiError(422, "partial_spans_disabled", "this server does not accept spans that split tokens (ALLOW_PARTIAL_SPANS is off)")
    out = []
    for start, end, label, i in spans:
        try:
            (token_span,) = char_spans_to_token_spans(tokens, [(start, end, label)], allow_partial=partial)
        except AlignmentError as e:
            raise ApiError(422, "span_splits_token", f"entities[{i}]: {e}") from None
        s, t = tokens[token_span.start].start, tokens[token_span.end - 1].end
        out.append({"start": s, "end": t, "label": label, "text": text[s:t]})
    for a, b in zip(out, out[1:]):
        if b["start"] < a["end"]:  # widening made two spans touch the same token
            raise ApiError(422, "overlapping_spans", f"spans [{a['start']}, {a['end']}) and [{b['start']}, {b['end']}) overlap once widened to whole tokens")
    return out


@router.post("/feedback", status_code=201, response_model=FeedbackResponse, responses={200: {"model": FeedbackResponse, "description": "a replay of an earlier request with the same Idempotency-Key"}})
def feedback(
    body: FeedbackRequest,
    runtime: RuntimeDep,
    session: SessionDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
):
    settings = runtime.settings
    if idempotency_key is not None and not idempotency_key.strip():
        # an empty key would be one key shared by every client that sends it
        raise ApiError(422, "invalid_idempotency_key", "Idempotency-Key is empty; send a unique value per request (e.g. a UUID) or omit the header")
    request_sha = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    ttl = dt.timedelta(hours=settings.idempotency_ttl_hours)
    try:
        if idempotency_key is not None:
            found = repositories.find_by_idempotency_key(session, key=idempotency_key, request_sha256=request_sha, not_before=utcnow() - ttl)
            if found is not None:
                return JSONResponse(_describe(found, True), status_code=200)
        prediction = None
        if body.prediction_id is not None:
            prediction = repositories.get_prediction(session, prediction_id=body.prediction_id)
            if prediction is None:
                raise ApiError(404, "prediction_not_found", f"no stored prediction with id {body.prediction_id}")
            stored = prediction.document.text
            if stored is None:  # STORE_TEXT was off: the client must resend the text, and it must match
                if body.text is None:
                    raise ApiError(422, "text_required", "this server keeps only text hashes: resend the 'text' of the prediction")
                if repositories.sha256(body.text) != prediction.document.text_sha256:
                    raise ApiError(422, "text_mismatch", "'text' is not the text of this prediction")
                text = body.text
            else:
                if body.text is not None and body.text != stored:
                    raise ApiError(422, "text_mismatch", "'text' differs from the text of this prediction; omit it or send a new text without prediction_id")
                text = stored
        else:
            text = body.text or ""
        check_text(text, "text", settings)
        entities = validate_entities(body, text, runtime)
        result = repositories.create_annotation(
            session, text=text, entities=entities, author=body.author, source="prediction" if prediction is not None else "text",
            prediction=prediction, idempotency_key=idempotency_key, request_sha256=request_sha, idempotency_ttl=ttl,
        )
    except repositories.IdempotencyConflict:
        raise ApiError(422, "idempotency_key_reused", f"Idempotency-Key {idempotency_key!r} was already used with a different request body") from None
    except repositories.IntegrityConflict as e:
        raise ApiError(409, "conflict", f"the correction was not stored: {e}") from None
    except SQLAlchemyError as e:
        metrics.DB_ERRORS.labels(operation="store_feedback").inc()
        metrics.FEEDBACK_FAILED.inc()
        raise ApiError(503, "database_unavailable", f"the correction was not stored: the database is unavailable ({type(e).__name__}); retry with the same Idempotency-Key", {"Retry-After": "5"}) from None
    if not result.replayed:
        metrics.FEEDBACK.labels(source=result.annotation.source).inc()
    return JSONResponse(_describe(result.annotation, result.replayed), status_code=200 if result.replayed else 201)


def _describe(annotation, replayed: bool) -> dict:
    return FeedbackResponse(
        id=annotation.id, prediction_id=annotation.prediction_id, document_id=annotation.document_id,
        entities=annotation.entities, replayed=replayed,
    ).model_dump(mode="json")
