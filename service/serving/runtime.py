"""What a worker process's lifespan builds (service.main), as the routes see it."""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.serving.engine import TaggingEngine
from service.serving.tagging import PredictionWriter
from service.store.session import ping


@dataclass
class Runtime:
    """Everything the lifespan builds; one per worker process."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    tagging: TaggingEngine
    writer: PredictionWriter
    writer_engine: Engine  # the prediction writer's (engine itself when PREDICTIONS_FSYNC)

    def ping_database(self) -> None:
        """One round trip to the database (readiness); raises SQLAlchemyError when it fails."""
        ping(self.engine)
