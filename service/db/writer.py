"""The prediction writer: stored /tag results of concurrent requests go to the database in one
transaction (group commit). It runs in its own thread, on its own engine (see service.main)."""
from __future__ import annotations

from sqlalchemy import Engine

from service import metrics
from service.batching import MicroBatcher
from service.config import Settings
from service.db.repositories import PredictionRecord, PredictionStore


def prediction_writer(engine: Engine, settings: Settings) -> MicroBatcher[PredictionRecord, bool]:
    store = PredictionStore(engine)

    def write(records: list[PredictionRecord]) -> list[bool]:
        store.store(records, store_text=settings.store_text)
        metrics.PREDICTIONS_STORED.inc(len(records))
        return [True] * len(records)

    # always through the writer thread, never inline in the request's: a commit can wait for
    # another worker's SQLite lock, and that wait must not stop the event loop
    return MicroBatcher(write, settings.db_write_batch, 0.0, 16 * settings.db_write_batch, name="prediction-writer")
