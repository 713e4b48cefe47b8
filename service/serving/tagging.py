"""The rules of a /tag request: which texts are accepted, tagging them in the shared batch, and
storing the results through the prediction writer (best effort). No FastAPI here; the wire shape
of a result is ``service.schemas.text_result_json``."""
from __future__ import annotations

import logging
import time

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from ml.pipeline import min_token_score
from ml.rules import EntityFilter
from ml.texts import text_problem
from service import metrics, schemas
from service.config import Settings
from service.errors import ApiError
from service.logthrottle import ThrottledLog
from service.serving.batching import BatcherClosed, MicroBatcher, QueueFull
from service.serving.engine import TaggingEngine
from service.serving.model import ServedResult
from service.serving.rules import rule_labels
from service.store.repositories import PredictionRecord
from service.store.tables import new_ids
from service.store.writer import batch_writer

log = logging.getLogger("service.serving.tagging")
# during a database outage: the first failure, then a count at most every 5 s (not one line per request)
_unstored = ThrottledLog(log, "predictions not stored", interval_s=5.0)

# the /tag results waiting for the database, written by one thread in batches (group commit)
PredictionWriter = MicroBatcher[PredictionRecord, bool]


def prediction_writer(engine: Engine, settings: Settings) -> PredictionWriter:
    """The prediction writer: stored /tag results of concurrent requests go to the database in one
    transaction. It runs in its own thread, on its own engine (see service.main)."""
    write = batch_writer(engine, store_text=settings.store_text, on_stored=metrics.PREDICTIONS_STORED.inc)
    # always through the writer thread, never inline in the request's: a commit can wait for
    # another worker's SQLite lock, and that wait must not stop the event loop
    return MicroBatcher(write, settings.db_write_batch, 0.0, 16 * settings.db_write_batch, name="prediction-writer")


def check_text(text: str, where: str, settings: Settings) -> None:
    """Reject what cannot be tagged or stored (``ml.texts.text_problem``, the rules ``ner bulk`` applies
    too): empty text, over-long text (413), control characters (NUL cannot even be stored in Postgres)
    and lone surrogates (not encodable as UTF-8)."""
    problem = text_problem(text, settings.max_text_chars)
    if problem is not None:
        code, reason = problem
        raise ApiError(413 if code == "text_too_long" else 422, code, f"{where} {reason}")


async def tag_texts(
    texts: list[str],
    *,
    one_text: bool,
    store: bool,
    include_tokens: bool,
    engine: TaggingEngine,
    writer: PredictionWriter,
    settings: Settings,
    min_score: float | None = None,
    labels: list[str] | None = None,
) -> list[dict]:
    """The /tag flow: check the texts, tag them in the shared batch, store them (best effort: when
    the database fails the results still go out, marked not stored). Returns one result per text in
    the wire shape (``schemas.text_result_json``); ``one_text`` names errors after ``text``, not ``texts[i]``.
    ``min_score`` and ``labels`` (default: TAG_MIN_SCORE, TAG_LABELS) filter the answer; every
    entity is stored."""
    if len(texts) > settings.max_batch_texts:
        raise ApiError(422, "too_many_texts", f"{len(texts)} texts in one request; the limit is {settings.max_batch_texts}")
    for index, text in enumerate(texts):
        check_text(text, "text" if one_text else f"texts[{index}]", settings)
    keep = entity_filter(min_score, labels, engine, settings)

    started = time.perf_counter()
    try:
        served = await engine.tag(texts)
    except QueueFull as e:
        metrics.QUEUE_REJECTED.inc(len(texts))
        retry = str(max(1, round(e.retry_after_s)))
        raise ApiError(503, "overloaded", "the tagging queue is full; retry later", {"Retry-After": retry}) from None
    except BatcherClosed:
        raise ApiError(503, "shutting_down", "the service is shutting down", {"Retry-After": "5"}) from None
    latency_ms = (time.perf_counter() - started) * 1000

    ids = new_ids(len(texts))
    entities = [schemas.entities_json(s.result) for s in served]
    stored = store and await _store(writer, ids, texts, served, entities, latency_ms)
    if keep.active:
        entities = [[e for e in ents if keep.keep(e["label"], e["score"])] for ents in entities]
    return [
        schemas.text_result_json(prediction_id if stored else None, s.model.name, s.model.version, ents,
                                 s.result if include_tokens else None)
        for prediction_id, s, ents in zip(ids, served, entities, strict=True)
    ]


def entity_filter(min_score: float | None, labels: list[str] | None, engine: TaggingEngine, settings: Settings) -> EntityFilter:
    """The request's filter over the deployment's defaults; a label neither the model nor
    EXTRA_LABELS has is a 422 naming it (the score's range is checked by the request schema)."""
    score = settings.tag_min_score if min_score is None else min_score
    chosen = labels if labels is not None else (settings.tag_labels or None)
    try:
        return EntityFilter.of(score, chosen, rule_labels(engine.model, settings))
    except ValueError as e:
        raise ApiError(422, "unknown_label", f"labels: {e}") from None


async def _store(writer: PredictionWriter, ids: list, texts: list[str], served: list[ServedResult], entities: list[list[dict]], latency_ms: float) -> bool:
    """Hand the results to the prediction writer; False (counted and logged, throttled) when the
    database or the writer's queue failed: the answer still goes out, marked as not stored."""
    records = [
        PredictionRecord(prediction_id, text, s.model.name, s.model.version, ents, min_token_score(s.result), latency_ms)
        for prediction_id, text, s, ents in zip(ids, texts, served, entities, strict=True)
    ]
    try:
        await writer.submit(records)
    except (SQLAlchemyError, QueueFull, BatcherClosed) as e:
        metrics.DB_ERRORS.labels(operation="store_prediction").inc()
        metrics.PREDICTIONS_NOT_STORED.inc(len(records))
        _unstored.failure(e, len(records))
        return False
    _unstored.success()
    return True
