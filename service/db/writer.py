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

    # when nothing else is being written, a request commits its own rows in its own thread
    # (INLINE_MAX_CHARS=0 turns that off too)
    inline = settings.inline_max_chars > 0
    return MicroBatcher(write, settings.db_write_batch, 0.0, 16 * settings.db_write_batch, name="prediction-writer", inline=lambda records: inline)
