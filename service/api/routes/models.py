"""GET /model (the served model) and the admin endpoints that register, activate and roll back
model versions without a restart."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from ml.artifact import ModelLoadError
from service import metrics
from service.api.deps import RuntimeDep, SessionDep, require_admin_key, require_api_key
from service.db import repositories
from service.errors import ApiError
from service.registry import register
from service.schemas import ModelInfo, ModelVersionOut, RegisterModel
from service.tagging import ServedModel

router = APIRouter(tags=["models"])


@router.get("/model", response_model=ModelInfo, dependencies=[Depends(require_api_key)])
async def model(runtime: RuntimeDep):
    m = runtime.tagging.model
    return ModelInfo(name=m.name, version=m.version, labels=m.labels, language=m.language, metrics=_summary(m.metrics), lineage=m.lineage)


def _summary(metrics_: dict) -> dict:
    # the training history is long; /model reports the scores
    return {k: v for k, v in metrics_.items() if k != "history"}


def _out(row) -> ModelVersionOut:
    return ModelVersionOut(id=row.id, name=row.name, version=row.version, path=row.path, active=row.active, metrics=_summary(row.metrics or {}), lineage=row.lineage or {}, promotion=row.promotion)


admin = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin_key)])


@admin.get("/models", response_model=list[ModelVersionOut])
def list_models(session: SessionDep):
    return [_out(r) for r in repositories.list_models(session)]


async def _load(path: str) -> ServedModel:
    try:
        return await run_in_threadpool(ServedModel.load, Path(path))
    except ModelLoadError as e:
        metrics.MODEL_SWITCHES.labels(result="refused").inc()
        raise ApiError(422, "bad_model", f"model refused, still serving the previous one: {e}") from None
    except Exception as e:
        metrics.MODEL_SWITCHES.labels(result="refused").inc()
        raise ApiError(422, "bad_model", f"model refused, still serving the previous one: {type(e).__name__}: {e}") from None


@admin.post("/models", response_model=ModelVersionOut, status_code=201)
async def add_model(body: RegisterModel, runtime: RuntimeDep):
    """Load a model folder (refused with the reason if it does not load or predict), record it as a
    version, and with ``activate`` serve it from now on (other workers follow within MODEL_POLL_S)."""
    model = await _load(body.path)
    row = await run_in_threadpool(register, runtime.sessions, model, body.activate)
    if body.activate:
        runtime.tagging.switch(model)
    return _out(row)


@admin.post("/models/{model_id}/activate", response_model=ModelVersionOut)
async def activate(model_id: int, runtime: RuntimeDep):
    """Serve a registered version again: this is also how to roll back."""
    def find():
        with runtime.sessions() as session:
            return repositories.get_model(session, model_id=model_id)

    row = await run_in_threadpool(find)
    if row is None:
        raise ApiError(404, "model_not_found", f"no model version with id {model_id}")
    model = await _load(row.path)

    def mark():
        with runtime.sessions() as session:
            return repositories.activate_model(session, model_id=model_id)

    row = await run_in_threadpool(mark)
    runtime.tagging.switch(model)
    return _out(row)
