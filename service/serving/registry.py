"""Model versions: which folder a worker serves at start, loading (or refusing) a folder, adding and
activating versions without a restart, and following the version the database says is active (so
every worker and replica converges). No FastAPI here."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ml.artifact import ModelLoadError, default_model_path
from service import metrics
from service.config import Settings
from service.errors import ApiError
from service.serving.engine import TaggingEngine
from service.serving.model import ServedModel
from service.store import repositories
from service.store.tables import ModelVersion

log = logging.getLogger("service.serving.registry")


class ModelRefused(Exception):
    """A model folder that does not load or does not pass the smoke test; the message says why."""


def load_model(path: str | Path, device: str) -> ServedModel:
    try:
        return ServedModel.load(Path(path), device)
    except ModelLoadError as e:
        raise ModelRefused(str(e)) from e
    except Exception as e:  # a folder from outside may fail in any library it reaches: refused with the reason
        raise ModelRefused(f"{type(e).__name__}: {e}") from e


def register(session: Session, model: ServedModel, activate: bool) -> ModelVersion:
    """Record a loaded model in the models table (once per name and version), optionally active."""
    try:
        row = repositories.register_model(session, name=model.name, version=model.version, path=str(model.path), metrics=model.metrics, lineage=model.lineage)
    except IntegrityError:  # another worker registered it at the same moment
        session.rollback()
        found = repositories.find_model(session, name=model.name, version=model.version)
        if found is None:  # the conflict was not about this name and version
            raise
        row = found
    if activate and not row.active:
        row = repositories.activate_model(session, model_id=row.id)
    return row


def initial_model(settings: Settings, session: Session) -> ServedModel:
    """NER_MODEL if set (and it becomes the active version); else the database's active version;
    else the bundled model."""
    if settings.ner_model is not None:
        model = ServedModel.load(settings.ner_model, settings.device)
        register(session, model, activate=True)
        return model
    active = repositories.active_model(session)
    if active is not None:
        try:
            return load_model(active.path, settings.device)
        except ModelRefused as e:
            log.error("the active model %s %s at %s cannot be loaded (%s); serving the bundled model", active.name, active.version, active.path, e)
            return ServedModel.load(default_model_path(), settings.device)
    model = ServedModel.load(default_model_path(), settings.device)
    register(session, model, activate=True)
    return model


async def _admit(path: str, device: str) -> ServedModel:
    """Load a folder an administrator named; a refusal is an answer (422), not a failure."""
    try:
        return await asyncio.to_thread(load_model, path, device)
    except ModelRefused as e:
        metrics.MODEL_SWITCHES.labels(result="refused").inc()
        raise ApiError(422, "bad_model", f"model refused, still serving the previous one: {e}") from None


async def add_version(session: Session, engine: TaggingEngine, *, path: str, activate: bool) -> ModelVersion:
    """Load a folder (refused with the reason if it does not load or predict), record it as a
    version, and with ``activate`` serve it from now on (other workers follow within MODEL_POLL_S)."""
    model = await _admit(path, engine.settings.device)
    row = await asyncio.to_thread(register, session, model, activate)
    if activate:
        engine.switch(model)
    return row


async def activate_version(session: Session, engine: TaggingEngine, *, model_id: int) -> ModelVersion:
    """Serve a registered version again: this is also how to roll back."""
    row = await asyncio.to_thread(repositories.get_model, session, model_id=model_id)
    if row is None:
        raise ApiError(404, "model_not_found", f"no model version with id {model_id}")
    model = await _admit(row.path, engine.settings.device)
    row = await asyncio.to_thread(repositories.activate_model, session, model_id=model_id)
    engine.switch(model)
    return row


async def follow_active(engine: TaggingEngine, sessions: sessionmaker[Session], interval_s: float) -> None:
    """Poll the models table; when another worker or replica activated a version, load and serve it.
    A version that fails to load is logged once and skipped; the current model keeps serving."""
    failed: tuple | None = None
    while True:
        await asyncio.sleep(interval_s)
        try:
            active = await asyncio.to_thread(_active, sessions)
        except SQLAlchemyError:
            continue  # the database being down must not stop tagging
        if active is None:
            continue
        key = (active.name, active.version, active.path)
        served = engine.model
        if (active.name, active.version) == (served.name, served.version) or key == failed:
            continue
        try:
            model = await asyncio.to_thread(load_model, active.path, engine.settings.device)
        except ModelRefused as e:
            failed = key
            metrics.MODEL_SWITCHES.labels(result="failed").inc()
            log.error("cannot switch to %s %s at %s: %s", active.name, active.version, active.path, e)
            continue
        engine.switch(model)


def list_versions(session: Session) -> list[ModelVersion]:
    """Every registered model version (GET /admin/models)."""
    return repositories.list_models(session)


def _active(sessions: sessionmaker[Session]) -> ModelVersion | None:
    # the poller runs outside any request, so it opens its own session; only here
    with sessions() as session:
        return repositories.active_model(session)
