"""The rules of a correction (POST /feedback): which text it is about, which spans are accepted,
and storing it once per Idempotency-Key. No FastAPI here."""
from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from itertools import pairwise

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from ml.data.tokenizer import AlignmentError, char_spans_to_token_spans
from service import metrics
from service.config import Settings
from service.errors import ApiError, database_unavailable
from service.schemas import EntityIn, FeedbackRequest
from service.serving.model import ServedModel
from service.serving.tagging import check_text
from service.store import repositories
from service.store.tables import Prediction, utcnow


def accepted_labels(model: ServedModel, settings: Settings) -> list[str]:
    """The labels a correction may use: the model's, then EXTRA_LABELS (new entity types)."""
    return list(model.labels) + [x for x in settings.extra_labels if x not in model.labels]


def validate_entities(entities: list[EntityIn], text: str, *, allow_partial: bool, model: ServedModel, settings: Settings) -> list[dict]:
    """Spans inside the text, known labels, no overlaps, on token boundaries (or widened to them
    when both the server and the request allow it). Returns the spans to store, sorted."""
    if len(entities) > settings.max_entities:
        raise ApiError(422, "too_many_entities", f"{len(entities)} entities; the limit is {settings.max_entities}")
    known = set(accepted_labels(model, settings))
    spans = []
    for index, e in enumerate(entities):
        where = f"entities[{index}] [{e.start}, {e.end})"
        if not 0 <= e.start < e.end <= len(text):
            raise ApiError(422, "span_out_of_range", f"{where} is not a non-empty range inside the text of {len(text)} characters")
        if e.label not in known:
            raise ApiError(422, "unknown_label", f"{where} has label {e.label!r}; known labels: {', '.join(sorted(known))}")
        if e.text is not None and e.text != text[e.start : e.end]:
            raise ApiError(422, "span_text_mismatch", f"{where} says its text is {e.text!r} but the text there is {text[e.start:e.end]!r}")
        spans.append((e.start, e.end, e.label, index))
    spans.sort()
    for a, b in pairwise(spans):
        if b[0] < a[1]:
            raise ApiError(422, "overlapping_spans", f"entities[{a[3]}] [{a[0]}, {a[1]}) and entities[{b[3]}] [{b[0]}, {b[1]}) overlap")
    tokens = model.tagger.tokenizer.tokenize(text)
    partial = allow_partial and settings.allow_partial_spans
    if allow_partial and not settings.allow_partial_spans:
        raise ApiError(422, "partial_spans_disabled", "this server does not accept spans that split tokens (ALLOW_PARTIAL_SPANS is off)")
    accepted: list[dict] = []
    for start, end, label, index in spans:
        try:
            (token_span,) = char_spans_to_token_spans(tokens, [(start, end, label)], allow_partial=partial)
        except AlignmentError as e:
            raise ApiError(422, "span_splits_token", f"entities[{index}]: {e}") from None
        s, t = tokens[token_span.start].start, tokens[token_span.end - 1].end
        accepted.append({"start": s, "end": t, "label": label, "text": text[s:t]})
    for left, right in pairwise(accepted):
        if right["start"] < left["end"]:  # widening made two spans touch the same token
            raise ApiError(422, "overlapping_spans", f"spans [{left['start']}, {left['end']}) and [{right['start']}, {right['end']}) overlap once widened to whole tokens")
    return accepted


def _corrected_text(body: FeedbackRequest, prediction: Prediction | None) -> str:
    """The text the correction is about: the stored prediction's (which a resent text must match)
    or the new text of the request."""
    if prediction is None:
        return body.text or ""
    stored = prediction.document.text
    if stored is None:  # STORE_TEXT was off: the client must resend the text, and it must match
        if body.text is None:
            raise ApiError(422, "text_required", "this server keeps only text hashes: resend the 'text' of the prediction")
        if repositories.sha256(body.text) != prediction.document.text_sha256:
            raise ApiError(422, "text_mismatch", "'text' is not the text of this prediction")
        return body.text
    if body.text is not None and body.text != stored:
        raise ApiError(422, "text_mismatch", "'text' differs from the text of this prediction; omit it or send a new text without prediction_id")
    return stored


def store_feedback(session: Session, body: FeedbackRequest, *, idempotency_key: str | None, model: ServedModel, settings: Settings) -> repositories.StoredAnnotation:
    """Check a correction and store it; a repeated Idempotency-Key with the same body answers with
    the first annotation (``replayed``), with another body it is refused."""
    if idempotency_key is not None and not idempotency_key.strip():
        # an empty key would be one key shared by every client that sends it
        raise ApiError(422, "invalid_idempotency_key", "Idempotency-Key is empty; send a unique value per request (e.g. a UUID) or omit the header")
    request_sha = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    ttl = dt.timedelta(hours=settings.idempotency_ttl_hours)  # older keys have expired
    try:
        if idempotency_key is not None:
            found = repositories.find_by_idempotency_key(session, key=idempotency_key, request_sha256=request_sha, not_before=utcnow() - ttl)
            if found is not None:
                return repositories.StoredAnnotation(found, True)
        prediction = None
        if body.prediction_id is not None:
            prediction = repositories.get_prediction(session, prediction_id=body.prediction_id)
            if prediction is None:
                raise ApiError(404, "prediction_not_found", f"no stored prediction with id {body.prediction_id}")
        text = _corrected_text(body, prediction)
        check_text(text, "text", settings)
        entities = validate_entities(body.entities, text, allow_partial=body.allow_partial, model=model, settings=settings)
        result = repositories.create_annotation(
            session, text=text, entities=entities, author=body.author, source="prediction" if prediction is not None else "text",
            prediction=prediction, idempotency_key=idempotency_key, request_sha256=request_sha, idempotency_ttl=ttl,
        )
    except repositories.IdempotencyConflict:
        raise ApiError(422, "idempotency_key_reused", f"Idempotency-Key {idempotency_key!r} was already used with a different request body") from None
    except repositories.IntegrityConflict as e:  # refused by a constraint, not a replay: the request conflicts
        raise ApiError(409, "conflict", f"the correction was not stored: {e}") from None
    except SQLAlchemyError as e:
        metrics.FEEDBACK_FAILED.inc()
        raise database_unavailable(
            e, operation="store_feedback",
            message=f"the correction was not stored: the database is unavailable ({type(e).__name__}); retry with the same Idempotency-Key",
        ) from None
    if not result.replayed:
        metrics.FEEDBACK.labels(source=result.annotation.source).inc()
    return result


def annotation_progress(session: Session) -> tuple[int, int]:
    """(texts with an accepted correction, stored texts waiting in the annotation queue)."""
    try:
        return repositories.count_accepted_annotations(session), repositories.count_queue(session)
    except SQLAlchemyError as e:
        raise database_unavailable(e, operation="annotate_status") from None


def review_queue(session: Session, *, limit: int) -> list[Prediction]:
    """Uncorrected stored predictions whose weakest token marginal is lowest: to be corrected first."""
    return repositories.least_confident(session, limit=limit)


def erase_document(session: Session, *, document_id: uuid.UUID) -> repositories.Removed:
    """Delete every stored copy of the document's text, its predictions and its corrections."""
    removed = repositories.erase_document(session, document_id=document_id)
    if removed is None:
        raise ApiError(404, "document_not_found", f"no stored document with id {document_id}")
    return removed


def erase_text(session: Session, *, sha256: str) -> repositories.Removed:
    """Delete every stored copy of the text with this SHA-256 (hex, either case), their predictions
    and its corrections; nothing stored is not an error (the answer must not tell whether it was)."""
    return repositories.erase_text(session, digest=sha256.lower())


def erase_prediction(session: Session, *, prediction_id: uuid.UUID) -> repositories.Removed:
    """Delete a prediction and its stored text unless a correction (or another prediction) refers to it."""
    removed = repositories.erase_prediction(session, prediction_id=prediction_id)
    if removed is None:
        raise ApiError(404, "prediction_not_found", f"no stored prediction with id {prediction_id}")
    return removed
