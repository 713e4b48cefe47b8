"""The prediction writer's store side: one batch of stored /tag results written in one transaction
(group commit). The thread and queue around it are the serving layer's
(``service.serving.tagging.prediction_writer``); what to count is passed in."""
from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine

from service.store.repositories import PredictionRecord, PredictionStore


def batch_writer(engine: Engine, *, store_text: bool, on_stored: Callable[[int], object]) -> Callable[[list[PredictionRecord]], list[bool]]:
    """A function that stores a batch of records in one commit, calls ``on_stored(n)`` after it, and
    answers True for each record (a failure raises, failing every request of the batch)."""
    store = PredictionStore(engine)

    def write(records: list[PredictionRecord]) -> list[bool]:
        store.store(records, store_text=store_text)
        on_stored(len(records))
        return [True] * len(records)

    return write
