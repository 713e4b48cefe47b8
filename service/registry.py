"""Model versions: which folder a worker serves at start, switching to another without a restart,
and following the version the database says is active (so every worker and replica converges)."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from ml.artifact import default_model_path
from service import metrics
from service.db import repositories
from service.tagging import ServedModel

log = logging.getLogger("service.registry")


def register(sessions, model: ServedModel, activate: bool):
    """Record a loaded model in the models table (once per name and version), optionally active."""
    with sessions() as session:
        try:
            row = repositories.register_model(session, name=model.name, version=model.version, path=str(model.path), metrics=model.metrics, lineage=model.lineage)
        except IntegrityError:  # another worker registered it at the same moment
            session.rollback()
            row = repositories.find_model(session, name=model.name, version=model.version)
        if activate and not row.active:
            row = repositories.activate_model(session, model_id=row.id)
        return row


def initial_model(settings, sessions) -> ServedModel:
    """NER_MODEL if set (and it becomes the active version); else the database's active version;
    else the bundled model."""
    if settings.ner_model is not None:
        model = ServedModel.load(settings.ner_model)
        register(sessions, model, activate=True)
        return model
    with sessions() as session:
        active = repositories.active_model(session)
    if active is not None:
        try:
            return ServedModel.load(active.path)
        except Exception as e:
            log.error("the active model %s %s at %s cannot be loaded (%s); serving the bundled model", active.name, active.version, active.path, e)
            return ServedModel.load(default_model_path())
    model = ServedModel.load(default_model_path())
    register(sessions, model, activate=True)
    return model


async def follow_active(runtime, interval_s: float) -> None:
    """Poll the models table; when another worker or replica activated a version, load and serve it.
    A version that fails to load is logged once and skipped; the current model keeps serving."""
    failed: tuple | None = None
    while True:
        await asyncio.sleep(interval_s)
        try:
            active = await run_in_threadpool(_active, runtime.sessions)
        except SQLAlchemyError:
            continue  # the database being down must not stop tagging
        if active is None:
            continue
        key = (active.name, active.version, active.path)
        served = runtime.tagging.model
        if (active.name, active.version) == (served.name, served.version) or key == failed:
            continue
        try:
            model = await run_in_threadpool(ServedModel.load, Path(active.path))
        except Exception as e:
            failed = key
            metrics.MODEL_SWITCHES.labels(result="failed").inc()
            log.error("cannot switch to %s %s at %s: %s", active.name, active.version, active.path, e)
            continue
        runtime.tagging.switch(model)


def _active(sessions):
    with sessions() as session:
        return repositories.active_model(session)
