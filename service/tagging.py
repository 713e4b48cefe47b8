"""Text -> entities for the service: the served model (swappable without a restart), the
micro-batcher in front of it, and the group writer that stores predictions. No FastAPI here."""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ml.pipeline import TextResult, TextTagger
from ml.predictor import Predictor
from service import metrics
from service.batching import MicroBatcher
from service.config import Settings

log = logging.getLogger("service.tagging")


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
    def load(cls, path: str | Path) -> ServedModel:
        """Load and smoke-test a model folder; raises ModelLoadError (or another error) if unusable."""
        predictor = Predictor.load(path)
        loaded = predictor.loaded
        assert loaded is not None
        tagger = TextTagger(predictor)
        tagger.tag(["Smoke test, please ignore."])  # fails here, not on a user's request
        return cls(loaded.meta.name, loaded.meta.version, Path(path).resolve(), predictor.labels, loaded.meta.language,
                   loaded.metrics, loaded.meta.lineage, tagger)

    def info(self) -> dict:
        return {"name": self.name, "version": self.version}


@dataclass
class Tagged:
    result: TextResult
    model: ServedModel  # the version that tagged it


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

        def lane(name: str) -> MicroBatcher[str, Tagged]:
            return MicroBatcher(
                self._process, settings.batch_max_texts, settings.batch_max_wait_ms, settings.queue_max_texts,
                name=name, on_depth=self._depth, weight=len, max_weight=settings.queue_max_chars,
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

    def _process(self, texts: list[str]) -> list[Tagged]:
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
        return [Tagged(r, model) for r in results]

    async def tag(self, texts: Sequence[str]) -> list[Tagged]:
        small = sum(len(t) for t in texts) <= self.settings.small_request_chars
        return await (self.small if small else self.batcher).submit(list(texts))


def min_token_score(result: TextResult) -> float:
    return min((t.score for t in result.tokens), default=1.0)


def entity_dicts(result: TextResult) -> list[dict]:
    return [{"start": e.start, "end": e.end, "label": e.label, "text": e.text, "score": round(e.score, 6)} for e in result.entities]


def prediction_writer(sessionmaker, settings: Settings) -> MicroBatcher:
    """Group commit: predictions of concurrent requests go to the database in one transaction."""
    from service.db import repositories

    def write(records: list[repositories.PredictionRecord]) -> list[bool]:
        with sessionmaker() as session:
            repositories.store_predictions(session, records=records, store_text=settings.store_text)
        metrics.PREDICTIONS_STORED.inc(len(records))
        return [True] * len(records)

    return MicroBatcher(write, settings.db_write_batch, 0.0, 16 * settings.db_write_batch, name="prediction-writer")
