"""``ner worker``: the trainer process. Takes one job at a time from ``training_jobs``, heartbeats
while it runs, and queues a job by itself every RETRAIN_EVERY_CORRECTIONS new corrections.

* A worker that dies (killed, out of memory, machine gone) stops heartbeating; after JOB_STALE_S
  another worker (or this one restarted) takes the job again, up to JOB_MAX_ATTEMPTS times.
* A worker whose job was taken over (it was too slow to heartbeat) notices at its next heartbeat
  and abandons the job without touching it again.
* SIGTERM/SIGINT stop the running job at the next batch and put it back in the queue at once.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import socket
import sys
import threading
import traceback
import uuid
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.store import training_jobs as jobs_repo
from service.store.tables import TrainingJob, utcnow
from service.training.retrain import JobError, JobSettings, LogTail, run_job

log = logging.getLogger("service.training.trainer")


class Worker:
    def __init__(self, settings, sessions: sessionmaker[Session], name: str | None = None):
        self.settings = settings
        self.sessions = sessions
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.job_settings = JobSettings.from_settings(settings)
        self.stopping = threading.Event()

    # --- the loop ------------------------------------------------------------------------------

    def run(self, once: bool = False) -> int:
        """Work until stopped; with ``once``, until no job is left. Returns the jobs run."""
        done = 0
        log.info("worker %s: waiting for jobs (models go to %s)", self.name, self.job_settings.models_dir)
        while not self.stopping.is_set():
            try:
                self.schedule()
                job = self.claim()
            except SQLAlchemyError as e:
                log.error("database unavailable (%s); retrying in %.0fs", e.__class__.__name__, self.settings.worker_poll_s)
                job = None
                if once:
                    raise
            if job is not None:
                self.work(job)
                done += 1
                continue
            if once:
                break
            self.stopping.wait(self.settings.worker_poll_s)
        return done

    def stop(self, *_args) -> None:
        self.stopping.set()

    def schedule(self) -> TrainingJob | None:
        """Queue a job when RETRAIN_EVERY_CORRECTIONS corrections arrived since the last job was
        queued, unless one is open."""
        every = self.settings.retrain_every_corrections
        if not every:
            return None
        with self.sessions() as session:
            if jobs_repo.open_job(session) is not None:
                return None
            new = jobs_repo.count_corrections(session, since=jobs_repo.last_job_created(session))
            if new < every:
                return None
            job = jobs_repo.create_job(session, trigger="schedule", params={}, base_model_id=None)
        log.info("queued job %d: %d new corrections (RETRAIN_EVERY_CORRECTIONS=%d)", job.id, new, every)
        return job

    def claim(self) -> TrainingJob | None:
        stale_before = utcnow() - dt.timedelta(seconds=self.settings.job_stale_s)
        with self.sessions() as session:
            return jobs_repo.claim_job(session, worker=self.name, stale_before=stale_before, max_attempts=self.settings.job_max_attempts)

    # --- one job -------------------------------------------------------------------------------

    def work(self, job: TrainingJob) -> str:
        """Run a claimed job to its end; returns its final status (or "abandoned"/"requeued")."""
        tail = LogTail(job.log, echo=lambda message: log.info("job %d: %s", job.id, message))
        tail(0.0, f"taken by worker {self.name} (attempt {job.attempts})")
        lost = threading.Event()  # the job was taken over by another worker
        beating = threading.Event()

        def beat() -> None:
            while not beating.wait(self.settings.job_heartbeat_s):
                try:
                    with self.sessions() as session:
                        if not jobs_repo.heartbeat(session, job_id=job.id, worker=self.name, progress=tail.progress, log=tail.text()):
                            lost.set()
                            return
                except SQLAlchemyError as e:
                    log.warning("heartbeat of job %d failed: %s", job.id, e.__class__.__name__)

        heart = threading.Thread(target=beat, name=f"heartbeat-{job.id}", daemon=True)
        heart.start()
        status, kwargs = jobs_repo.FAILED, dict[str, Any]()
        try:
            outcome = run_job(self.sessions, job, self.job_settings, tail, lambda: lost.is_set() or self.stopping.is_set())
            status = jobs_repo.SUCCEEDED
            kwargs = {"metrics": outcome.metrics, "decision": outcome.decision, "result_model_id": outcome.model.id}
            tail(1.0, f"done: {outcome.model.name} {outcome.model.version}" + (" is active" if outcome.decision["promote"] else " is a candidate"))
        except Exception as e:  # noqa: BLE001 - whatever went wrong, the job must end failed with the reason
            from ml.finetune import Cancelled

            if isinstance(e, Cancelled) and lost.is_set():
                log.warning("job %d was taken over by another worker; abandoning it", job.id)
                return "abandoned"
            if isinstance(e, Cancelled):
                tail(tail.progress, "stopped by a shutdown signal; back in the queue")
                with self.sessions() as session:
                    jobs_repo.requeue_job(session, job_id=job.id, worker=self.name, log=tail.text())
                return "requeued"
            message = str(e) if isinstance(e, JobError) else f"{type(e).__name__}: {e}"
            tail(tail.progress, f"failed: {message}")
            if not isinstance(e, JobError):
                log.error("job %d failed:\n%s", job.id, traceback.format_exc())
            kwargs = {"error": message}
        finally:
            beating.set()
            heart.join()
        with self.sessions() as session:
            finished = jobs_repo.finish_job(session, job_id=job.id, worker=self.name, status=status, log=tail.text(), **kwargs)
        if not finished:
            log.warning("job %d was taken over by another worker before it finished here", job.id)
            return "abandoned"
        log.info("job %d %s", job.id, status)
        return status


def main(settings, once: bool = False) -> int:
    """``ner worker``: run until SIGTERM/SIGINT (or, with --once, until the queue is empty)."""
    import torch

    from service.store.session import check_schema, make_engine, make_sessionmaker

    # stdout: `docker compose logs trainer` shows each job's progress lines as the job row does
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    torch.set_num_threads(settings.train_threads or os.cpu_count() or 1)
    engine = make_engine(settings.database_url, settings.db_timeout_s, pool_size=2)
    try:
        check_schema(engine)
        worker = Worker(settings, make_sessionmaker(engine))
        signal.signal(signal.SIGTERM, worker.stop)
        signal.signal(signal.SIGINT, worker.stop)
        return worker.run(once=once)
    finally:
        engine.dispose()
