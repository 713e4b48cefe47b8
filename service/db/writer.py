"""The prediction writer: stored /tag results of concurrent requests go to the database in one
transaction (group commit). It runs in its own thread, so it keeps its own session factory."""
from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from service import metrics
from service.batching import MicroBatcher
from service.config import Settings
from service.db import repositories
from service.db.repositories import PredictionRecord


def prediction_writer(sessions: sessionmaker[Session], settings: Settings) -> MicroBatcher[PredictionRecord, bool]:
    def write(records: list[PredictionRecord]) -> list[bool]:
        with sessions() as session:
            repositories.store_predictions(session, records=records, store_text=settings.store_text)
        metrics.PREDICTIONS_STORED.inc(len(records))
        return [True] * len(records)

    # always through the writer thread, never inline in the request's: a commit can wait for
    # another worker's SQLite lock, and that wait must not stop the event loop
    return MicroBatcher(write, settings.db_write_batch, 0.0, 16 * settings.db_write_batch, name="prediction-writer")
