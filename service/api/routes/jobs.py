"""Retraining jobs: POST /admin/retrain records one (a trainer process, ``ner worker``, runs it;
the API never trains), GET /admin/jobs and /admin/jobs/{id} show status, progress, log and result."""
from __future__ import annotations

import datetime as dt
from typing import Annotated, overload

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import JSONResponse

from service.api.deps import RuntimeDep, SessionDep, require_admin_key
from service.schemas import JobOut, RetrainRequest
from service.store.tables import TrainingJob
from service.training import retrain as retraining

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin_key)])


def job_out(job: TrainingJob, curve: list[dict] | None = None) -> JobOut:
    return JobOut(
        id=job.id, status=job.status, trigger=job.trigger, params=job.params or {}, base_model_id=job.base_model_id,
        result_model_id=job.result_model_id, corrections=job.corrections, worker=job.worker, attempts=job.attempts,
        progress=job.progress, log_tail=(job.log or "").splitlines(), metrics=job.metrics or {}, decision=job.decision,
        error=job.error, created_at=_utc(job.created_at), started_at=_utc(job.started_at), heartbeat_at=_utc(job.heartbeat_at),
        finished_at=_utc(job.finished_at), curve=curve or [],
    )


@overload
def _utc(value: dt.datetime) -> dt.datetime: ...


@overload
def _utc(value: None) -> None: ...


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    # SQLite gives the stored UTC times back without their zone
    return value.replace(tzinfo=dt.UTC) if value is not None and value.tzinfo is None else value


@router.post("/retrain", response_model=JobOut, status_code=202, responses={200: {"model": JobOut, "description": "a job is already queued or running: that job"}})
def retrain(body: RetrainRequest, session: SessionDep, runtime: RuntimeDep):
    """Queue a fine-tuning job (or, with ``method: retrain`` and BASE_CORPUS, a full retrain) on the
    stored corrections. 202 with the job; a trainer takes it.
    While a job is queued or running, the same request answers 200 with that job instead."""
    job, created = retraining.request_retrain(session, settings=runtime.settings, base_model_id=body.base_model_id, finetune=body.finetune, method=body.method)
    if not created:
        return JSONResponse(job_out(job).model_dump(mode="json"), status_code=200)
    return job_out(job)


@router.get("/jobs", response_model=list[JobOut])
def list_jobs(session: SessionDep, limit: int = Query(50, ge=1, le=500)):
    return [job_out(j) for j in retraining.list_jobs(session, limit=limit)]


JobId = Annotated[int, Path(ge=1, le=2**31 - 1, description="a training job id from POST /admin/retrain or GET /admin/jobs")]


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_job(job_id: JobId, session: SessionDep):
    """One job, with its gain curve: the gain per number of corrections of every succeeded job up to it."""
    job = retraining.get_job(session, job_id=job_id)
    return job_out(job, retraining.gain_curve(session, job))
