"""Probes and metrics: /healthz (alive), /readyz (model loaded, database reachable), /metrics."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from service import metrics
from service.api.deps import RuntimeDep, require_probe_key

router = APIRouter(tags=["operations"], dependencies=[Depends(require_probe_key)])


@router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(runtime: RuntimeDep):
    checks = {"model": f"{runtime.tagging.model.name} {runtime.tagging.model.version}"}
    ready = True
    try:
        await asyncio.wait_for(run_in_threadpool(runtime.ping_database), timeout=runtime.settings.db_timeout_s + 1)
        checks["database"] = "ok"
    except (SQLAlchemyError, TimeoutError) as e:  # the ping failed, or took longer than DB_TIMEOUT_S + 1
        metrics.DB_ERRORS.labels(operation="readyz").inc()
        checks["database"] = f"unavailable: {type(e).__name__}"
        ready = False
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics_endpoint():
    payload, content_type = metrics.render()
    return Response(payload, media_type=content_type)
