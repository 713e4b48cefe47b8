"""GET /model (the served model) and the admin endpoints that register, activate and roll back
model versions without a restart."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path

from service.api.deps import RuntimeDep, SessionDep, require_admin_key, require_api_key
from service.schemas import ModelInfo, ModelVersionOut, RegisterModel
from service.security import default_models_dir, model_folder
from service.serving import registry
from service.store.tables import ModelVersion

router = APIRouter(tags=["models"])


@router.get("/model", response_model=ModelInfo, dependencies=[Depends(require_api_key)])
async def model(runtime: RuntimeDep):
    m = runtime.tagging.model
    return ModelInfo(name=m.name, version=m.version, labels=m.labels, language=m.language, metrics=_summary(m.metrics), lineage=m.lineage)


def _summary(metrics_: dict) -> dict:
    # the training history is long; /model reports the scores
    return {k: v for k, v in metrics_.items() if k != "history"}


def _out(row: ModelVersion) -> ModelVersionOut:
    return ModelVersionOut(id=row.id, name=row.name, version=row.version, path=row.path, active=row.active, metrics=_summary(row.metrics or {}), lineage=row.lineage or {}, promotion=row.promotion)


# ids are 32-bit on PostgreSQL and 64-bit on SQLite: beyond 2^31 - 1 the database would raise (a 500)
ModelId = Annotated[int, Path(ge=1, le=2**31 - 1, description="a model version id from GET /admin/models")]

admin = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin_key)])


@admin.get("/models", response_model=list[ModelVersionOut])
def list_models(session: SessionDep):
    return [_out(r) for r in registry.list_versions(session)]


@admin.post("/models", response_model=ModelVersionOut, status_code=201)
async def add_model(body: RegisterModel, runtime: RuntimeDep, session: SessionDep):
    """Load a model folder (refused with the reason if it does not load or predict), record it as a
    version, and with ``activate`` serve it from now on (other workers follow within MODEL_POLL_S)."""
    path = model_folder(body.path, runtime.settings.models_dir or default_models_dir())
    return _out(await registry.add_version(session, runtime.tagging, path=path, activate=body.activate))


@admin.post("/models/{model_id}/activate", response_model=ModelVersionOut)
async def activate(model_id: ModelId, runtime: RuntimeDep, session: SessionDep):
    """Serve a registered version again: this is also how to roll back."""
    return _out(await registry.activate_version(session, runtime.tagging, model_id=model_id))
