"""POST /tag: texts in, entities with character offsets out."""
from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Union

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from service import metrics
from service.api.deps import RuntimeDep, require_api_key
from service.batching import BatcherClosed, QueueFull
from service.config import Settings
from service.db.repositories import PredictionRecord
from service.errors import ApiError
from service.logthrottle import ThrottledLog
from service.schemas import TagRequest, TagResult, TagResults
from service.tagging import entity_dicts, min_token_score

router = APIRouter(tags=["tagging"], dependencies=[Depends(require_api_key)])
log = logging.getLogger("service.tag")
# during a database outage: the first failure, then a count at most every 5 s (not one line per request)
_unstored = ThrottledLog(log, "predictions not stored", interval_s=5.0)

# C0/C1 controls except tab, newline and carriage return; UTF-16 surrogates
_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def check_text(text: str, where: str, settings: Settings) -> None:
    """Reject what cannot be tagged or stored: empty text, over-long text, control characters
    (NUL cannot even be stored in Postgres), and lone surrogates (not encodable as UTF-8)."""
    if len(text) > settings.max_text_chars:
        raise ApiError(413, "text_too_long", f"{where} has {len(text)} characters; the limit is {settings.max_text_chars}")
    if not text.strip():
        raise ApiError(422, "empty_text", f"{where} is empty or only whitespace")
    bad = _FORBIDDEN.search(text)
    if bad is not None:
        ch = bad.group()
        kind = "a lone surrogate" if 0xD800 <= ord(ch) < 0xE000 else "the control character"
        raise ApiError(422, "invalid_character", f"{where} contains {kind} U+{ord(ch):04X} at offset {bad.start()}")


@router.post("/tag", response_class=JSONResponse, responses={200: {"model": Union[TagResult, TagResults], "description": "one result for 'text', {results} for 'texts'"}})
async def tag(body: TagRequest, runtime: RuntimeDep) -> JSONResponse:
    settings = runtime.settings
    texts: list[str] = [body.text] if body.text is not None else list(body.texts or [])
    if len(texts) > settings.max_batch_texts:
        raise ApiError(422, "too_many_texts", f"{len(texts)} texts in one request; the limit is {settings.max_batch_texts}")
    for i, text in enumerate(texts):
        check_text(text, "text" if body.text is not None else f"texts[{i}]", settings)

    started = time.perf_counter()
    try:
        tagged = await runtime.tagging.tag(texts)
    except QueueFull as e:
        metrics.QUEUE_REJECTED.inc(len(texts))
        retry = str(max(1, round(e.retry_after_s)))
        raise ApiError(503, "overloaded", "the tagging queue is full; retry later", {"Retry-After": retry}) from None
    except BatcherClosed:
        raise ApiError(503, "shutting_down", "the service is shutting down", {"Retry-After": "5"}) from None
    latency_ms = (time.perf_counter() - started) * 1000

    ids = [uuid.uuid4() for _ in texts]
    entities = [entity_dicts(t.result) for t in tagged]
    stored = False
    if body.store:
        records = [
            PredictionRecord(i, text, t.model.name, t.model.version, ents, min_token_score(t.result), latency_ms)
            for i, text, t, ents in zip(ids, texts, tagged, entities)
        ]
        try:
            await runtime.writer.submit(records)
            stored = True
            _unstored.success()
        except Exception as e:  # the answer still goes out, marked as not stored
            metrics.DB_ERRORS.labels(operation="store_prediction").inc()
            metrics.PREDICTIONS_NOT_STORED.inc(len(records))
            _unstored.failure(e, len(records))

    results = []
    for i, t, ents in zip(ids, tagged, entities):
        result = {"id": str(i) if stored else None, "stored": stored, "model": t.model.info(), "entities": ents}
        if body.include_tokens:
            result["tokens"] = [{"text": k.text, "start": k.start, "end": k.end, "tag": k.tag, "score": round(k.score, 6)} for k in t.result.tokens]
        results.append(result)
    return JSONResponse(results[0] if body.text is not None else {"results": results})
