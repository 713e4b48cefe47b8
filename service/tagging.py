"""Text -> entities for the service: the served model (swappable without a restart), the
micro-batcher in front of it, and the rules of a /tag request (which texts are accepted, what is
stored, what each result holds). No FastAPI here."""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sqlalchemy.exc import SQLAlchemyError

from ml.pipeline import TextResult, TextTagger
from ml.predictor import Predictor
from service import metrics
from service.batching import BatcherClosed, MicroBatcher, QueueFull
from service.config import Settings
from service.db.models import new_ids
from service.db.repositories import PredictionRecord
from service.errors import ApiError
from service.logthrottle import ThrottledLog

log = logging.getLogger("service.tagging")
# during a database outage: the first failure, then a count at most every 5 s (not one line per request)
_unstored = ThrottledLog(log, "predictions not stored", interval_s=5.0)

# C0/C1 controls except tab, newline and carriage return; UTF-16 surrogates
_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    path: Path
    labels: list[str]
    language: str
    metrics: dict
    lineage: dict
    tagger: TextTagger = field(repr=False, compare=False)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> ServedModel:
        """Load and smoke-test a model folder; raises ModelLoadError, DeviceError (or another error)
        if unusable. On a CPU the predictor takes the fast path (ml.fast); on a GPU the scripted model."""
        predictor = Predictor.load(path, device)
        loaded = predictor.loaded
        assert loaded is not None
        tagger = TextTagger(predictor)
        tagger.tag(["Smoke test, please ignore."])  # fails here, not on a user's request
        return cls(loaded.meta.name, loaded.meta.version, Path(path).resolve(), predictor.labels, loaded.meta.language,
                   loaded.metrics, loaded.meta.lineage, tagger)

    def info(self) -> dict:
        return {"name": self.name, "version": self.version}


@dataclass
class ServedResult:
    """A TextResult and the model version that produced it."""

    result: TextResult
    model: ServedModel


def set_thread_torch_threads(n: int) -> None:
    """TORCH_THREADS for the calling thread. OpenMP keeps its thread count per thread: a thread
    started after ``torch.set_num_threads`` in the main thread still runs OpenMP regions (the LSTM's
    matrix products) on as many threads as there are cores. Two workers' inference threads then ran
    four spinning OpenMP threads on two cores, and two workers on one machine collapsed now and
    then (README, Performance)."""
    torch.set_num_threads(n)


class TaggingEngine:
    """Owns the served model and the inference batchers. ``switch`` replaces the model between two
    batches: a batch always runs on one model, and a request in flight is never failed by it.

    Two lanes, each a batcher with its own thread: requests of at most SMALL_REQUEST_CHARS
    characters in all, and the others. A one-sentence request then never waits behind a batch of
    100,000-character texts (torch and the chunked tokenizer let the two threads share the CPU);
    both queues are bounded by characters (QUEUE_MAX_CHARS) as well as texts."""

    def __init__(self, model: ServedModel, settings: Settings):
        self.model = model
        self.settings = settings

        def lane(name: str) -> MicroBatcher[str, ServedResult]:
            return MicroBatcher(
                self._process, settings.batch_max_texts, settings.batch_max_wait_ms, settings.queue_max_texts,
                name=name, on_depth=self._depth, weight=len, max_weight=settings.queue_max_chars,
                inline=lambda texts: sum(len(t) for t in texts) <= settings.inline_max_chars,
                on_thread_start=lambda: set_thread_torch_threads(settings.torch_threads),
            )

        self.small = lane("inference-small")
        self.batcher = lane("inference")  # the lane of large requests
        metrics.QUEUE_CAPACITY.set(settings.queue_max_texts)
        metrics.set_model_info(model.name, model.version)

    def _depth(self, _depth: int) -> None:
        metrics.QUEUE_DEPTH.set(self.small.depth + self.batcher.depth)

    def start(self) -> TaggingEngine:
        self.small.start()
        self.batcher.start()
        return self

    def close(self) -> None:
        self.small.close()
        self.batcher.close()

    def switch(self, model: ServedModel) -> ServedModel:
        old, self.model = self.model, model  # one reference assignment: atomic for the worker thread
        metrics.set_model_info(model.name, model.version)
        metrics.MODEL_SWITCHES.labels(result="ok").inc()
        log.info("now serving %s %s (was %s %s)", model.name, model.version, old.name, old.version)
        return old

    def _process(self, texts: list[str]) -> list[ServedResult]:
        model = self.model
        started = time.perf_counter()
        results = model.tagger.tag(texts)
        seconds = time.perf_counter() - started
        metrics.BATCH_SIZE.observe(len(texts))
        metrics.INFERENCE_LATENCY.observe(seconds)
        metrics.BATCH_SENTENCES.observe(sum(r.sentences for r in results))
        metrics.TOKENS.inc(sum(len(r.tokens) for r in results))
        for r in results:
            for e in r.entities:
                metrics.ENTITIES.labels(label=e.label).inc()
        return [ServedResult(r, model) for r in results]

    async def tag(self, texts: Sequence[str]) -> list[ServedResult]:
        small = sum(len(t) for t in texts) <= self.settings.small_request_chars
        return await (self.small if small else self.batcher).submit(list(texts))


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


def min_token_score(result: TextResult) -> float:
    return min((t.score for t in result.tokens), default=1.0)


def entity_dicts(result: TextResult) -> list[dict]:
    return [{"start": e.start, "end": e.end, "label": e.label, "text": e.text, "score": round(e.score, 6)} for e in result.entities]


async def tag_texts(
    texts: list[str],
    *,
    one_text: bool,
    store: bool,
    include_tokens: bool,
    engine: TaggingEngine,
    writer: MicroBatcher[PredictionRecord, bool],
    settings: Settings,
) -> list[dict]:
    """The /tag flow: check the texts, tag them in the shared batch, store them (best effort: when
    the database fails the results still go out, marked not stored). Returns one result per text in
    the wire shape (``schemas.TextResultOut``); ``one_text`` names errors after ``text``, not ``texts[i]``."""
    if len(texts) > settings.max_batch_texts:
        raise ApiError(422, "too_many_texts", f"{len(texts)} texts in one request; the limit is {settings.max_batch_texts}")
    for index, text in enumerate(texts):
        check_text(text, "text" if one_text else f"texts[{index}]", settings)

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
    entities = [entity_dicts(s.result) for s in served]
    stored = False
    if store:
        records = [
            PredictionRecord(prediction_id, text, s.model.name, s.model.version, ents, min_token_score(s.result), latency_ms)
            for prediction_id, text, s, ents in zip(ids, texts, served, entities, strict=True)
        ]
        try:
            await writer.submit(records)
            stored = True
            _unstored.success()
        except (SQLAlchemyError, QueueFull, BatcherClosed) as e:  # the answer still goes out, marked as not stored
            metrics.DB_ERRORS.labels(operation="store_prediction").inc()
            metrics.PREDICTIONS_NOT_STORED.inc(len(records))
            _unstored.failure(e, len(records))

    results = []
    for prediction_id, s, ents in zip(ids, served, entities, strict=True):
        result = {"id": str(prediction_id) if stored else None, "stored": stored, "model": s.model.info(), "entities": ents}
        if include_tokens:
            result["tokens"] = [{"text": k.text, "start": k.start, "end": k.end, "tag": k.tag, "score": round(k.score, 6)} for k in s.result.tokens]
        results.append(result)
    return results
