"""The training-jobs repository: the only code that writes ``training_jobs`` (and a version's
promotion). Keyword-only functions over a Session, like ``repositories``.

Claiming is safe with several workers: on PostgreSQL the candidate row is read with
``FOR UPDATE SKIP LOCKED`` (a second worker skips it instead of waiting), and on every database the
claim is a conditional UPDATE that only one worker can win (SQLite, which has no row locks,
serialises the writes)."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import CursorResult, and_, func, or_, select, update
from sqlalchemy.orm import Session

from service.store.tables import Annotation, Document, ModelVersion, TrainingJob, utcnow

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
OPEN = (QUEUED, RUNNING)


def create_job(session: Session, *, trigger: str, params: dict[str, Any], base_model_id: int | None) -> TrainingJob:
    job = TrainingJob(
        status=QUEUED, trigger=trigger, params=params, base_model_id=base_model_id, corrections=count_corrections(session),
        attempts=0, progress=0.0, log="", metrics={}, created_at=utcnow(),
    )
    session.add(job)
    session.commit()
    return job


def get_job(session: Session, *, job_id: int) -> TrainingJob | None:
    return session.get(TrainingJob, job_id)


def list_jobs(session: Session, *, limit: int = 50) -> list[TrainingJob]:
    return list(session.scalars(select(TrainingJob).order_by(TrainingJob.id.desc()).limit(limit)).all())


def open_job(session: Session) -> TrainingJob | None:
    """The oldest queued or running job, if any."""
    return session.scalars(select(TrainingJob).where(TrainingJob.status.in_(OPEN)).order_by(TrainingJob.id).limit(1)).first()


def _rows(result) -> int:
    """Rows an UPDATE matched (an UPDATE's result is a CursorResult)."""
    assert isinstance(result, CursorResult)
    return result.rowcount


def _claimable(stale_before: dt.datetime):
    return or_(TrainingJob.status == QUEUED, and_(TrainingJob.status == RUNNING, TrainingJob.heartbeat_at < stale_before))


def claim_job(session: Session, *, worker: str, stale_before: dt.datetime, max_attempts: int) -> TrainingJob | None:
    """Take the oldest queued job, or a running one whose heartbeat is older than ``stale_before``
    (its worker died). A job already tried ``max_attempts`` times is failed instead of taken."""
    while True:
        query = select(TrainingJob.id, TrainingJob.attempts).where(_claimable(stale_before)).order_by(TrainingJob.id).limit(1)
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        row = session.execute(query).first()
        if row is None:
            session.rollback()
            return None
        job_id, attempts = row
        now = utcnow()
        if attempts >= max_attempts:
            session.execute(
                update(TrainingJob).where(TrainingJob.id == job_id).values(
                    status=FAILED, finished_at=now, error=f"given up after {attempts} attempt(s): each time its worker stopped heartbeating",
                )
            )
            session.commit()
            continue
        won = _rows(session.execute(
            update(TrainingJob)
            .where(TrainingJob.id == job_id, _claimable(stale_before))
            .values(status=RUNNING, worker=worker, attempts=TrainingJob.attempts + 1, heartbeat_at=now, progress=0.0,
                    started_at=func.coalesce(TrainingJob.started_at, now))
        ))
        session.commit()
        if won == 1:
            job = session.get(TrainingJob, job_id)
            assert job is not None
            session.refresh(job)
            return job


def heartbeat(session: Session, *, job_id: int, worker: str, progress: float, log: str) -> bool:
    """Record that ``worker`` is alive on the job; False when the job is no longer its own (it was
    taken over after a stale heartbeat): the worker must then stop."""
    mine = _rows(session.execute(
        update(TrainingJob)
        .where(TrainingJob.id == job_id, TrainingJob.worker == worker, TrainingJob.status == RUNNING)
        .values(heartbeat_at=utcnow(), progress=progress, log=log)
    ))
    session.commit()
    return mine == 1


def finish_job(
    session: Session, *, job_id: int, worker: str, status: str, log: str, metrics: dict[str, Any] | None = None,
    decision: dict[str, Any] | None = None, error: str | None = None, result_model_id: int | None = None,
) -> bool:
    values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "log": log, "error": error, "decision": decision, "result_model_id": result_model_id}
    if status == SUCCEEDED:
        values["progress"] = 1.0
    if metrics is not None:
        values["metrics"] = metrics
    done = _rows(session.execute(
        update(TrainingJob).where(TrainingJob.id == job_id, TrainingJob.worker == worker, TrainingJob.status == RUNNING).values(**values)
    ))
    session.commit()
    return done == 1


def requeue_job(session: Session, *, job_id: int, worker: str, log: str) -> bool:
    """Put a job this worker stops (shutdown) back in the queue; the attempt does not count."""
    done = _rows(session.execute(
        update(TrainingJob).where(TrainingJob.id == job_id, TrainingJob.worker == worker, TrainingJob.status == RUNNING)
        .values(status=QUEUED, worker=None, attempts=TrainingJob.attempts - 1, log=log, heartbeat_at=None)
    ))
    session.commit()
    return done == 1


def set_promotion(session: Session, *, model_id: int, promotion: dict[str, Any]) -> None:
    session.execute(update(ModelVersion).where(ModelVersion.id == model_id).values(promotion=promotion))
    session.commit()


def count_corrections(session: Session, *, since: dt.datetime | None = None) -> int:
    query = select(func.count()).select_from(Annotation).where(Annotation.status == "accepted")
    if since is not None:
        query = query.where(Annotation.created_at > since)
    return int(session.scalar(query) or 0)


def last_job_created(session: Session) -> dt.datetime | None:
    return session.scalar(select(func.max(TrainingJob.created_at)))


def last_success(session: Session) -> TrainingJob | None:
    return session.scalars(select(TrainingJob).where(TrainingJob.status == SUCCEEDED).order_by(TrainingJob.id.desc()).limit(1)).first()


def rehearsal_texts(session: Session, *, limit: int) -> list[str]:
    """Texts the service stored (from /tag) that nobody corrected, newest first: unlabelled text
    from the users' own domain, for the forgetting probe and for pseudo-rehearsal / distillation."""
    corrected = select(Annotation.document_id)
    query = select(Document.text).where(Document.text.is_not(None), Document.id.not_in(corrected)).order_by(Document.created_at.desc()).limit(limit)
    return [t for t in session.scalars(query).all() if t]


def succeeded_jobs(session: Session, *, up_to: int) -> list[TrainingJob]:
    """Succeeded jobs with an id up to ``up_to``, oldest first (a job's gain curve)."""
    query = select(TrainingJob).where(TrainingJob.status == SUCCEEDED, TrainingJob.id <= up_to).order_by(TrainingJob.id)
    return list(session.scalars(query).all())


@dataclass
class JobStats:
    started: int  # attempts, over all jobs
    succeeded: int
    failed: int
    queued: int
    running: int
    duration_sum: float  # seconds, over finished jobs
    duration_count: int
    last_success: float | None  # Unix time of the last successful job's end
    corrections_pending: int  # accepted corrections stored after the last successful job was queued


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)  # SQLite drops the zone


def job_stats(session: Session) -> JobStats:
    counts = dict(session.execute(select(TrainingJob.status, func.count()).group_by(TrainingJob.status)).all())
    started = int(session.scalar(select(func.coalesce(func.sum(TrainingJob.attempts), 0))) or 0)
    finished = session.execute(
        select(TrainingJob.started_at, TrainingJob.finished_at).where(TrainingJob.status.in_((SUCCEEDED, FAILED)), TrainingJob.started_at.is_not(None))
    ).all()
    durations = [(_aware(end) - _aware(start)).total_seconds() for start, end in finished if end is not None and start is not None]
    success = last_success(session)
    pending = count_corrections(session, since=success.created_at if success is not None else None)
    return JobStats(
        started, counts.get(SUCCEEDED, 0), counts.get(FAILED, 0), counts.get(QUEUED, 0), counts.get(RUNNING, 0),
        sum(durations), len(durations),
        _aware(success.finished_at).timestamp() if success is not None and success.finished_at is not None else None,
        pending,
    )


def heldout_f1_by_version(session: Session) -> list[tuple[str, str, float]]:
    """(name, version, held-out F1) of every registered version; NaN where none was measured (a
    version registered by hand): the series exists, and graphs show a gap, not a made-up number."""
    out = []
    for name, version, metrics in session.execute(select(ModelVersion.name, ModelVersion.version, ModelVersion.metrics)).all():
        heldout = (metrics or {}).get("heldout") or {}
        after = heldout.get("after") if isinstance(heldout, dict) else None
        f1 = after.get("f1") if isinstance(after, dict) else None
        out.append((name, version, float(f1) if isinstance(f1, (int, float)) else float("nan")))
    return out
