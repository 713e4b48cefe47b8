"""What a retraining job does, in the trainer process (``ner worker``), never in an API process:
fine-tune the active model (or the one the job names) on the stored corrections, register the new
version, and let the promotion gate decide whether it becomes active.

The API only records jobs (``POST /admin/retrain``) and shows them (``GET /admin/jobs/{id}``)."""
from __future__ import annotations

import collections
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.errors import ApiError
from service.security import default_models_dir
from service.store import repositories
from service.store import training_jobs as jobs_repo
from service.store.tables import ModelVersion, TrainingJob

LOG_TAIL = 60  # lines of a job's log kept in the database


class JobError(RuntimeError):
    """A job that cannot run as asked (no corrections, no base model): failed with this message."""


def load_corrections(session: Session):
    """The accepted corrections as ``ml.finetune.Correction``s, keyed by document id (the held-out
    split is by document, so a later correction of the same text stays on the same side)."""
    from ml.finetune import Correction

    out = []
    for a in repositories.iter_annotations(session):
        text = a.document.text
        if text is None:
            continue  # cannot happen: corrected texts are always kept (repositories.create_annotation)
        out.append(Correction(str(a.document_id), text, [(e["start"], e["end"], e["label"]) for e in repositories.annotation_entities(a)]))
    return out


_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)")


def next_version(versions: list[str], base: str) -> str:
    """The next minor version after the highest MAJOR.MINOR registered under the model's name."""
    parsed = [tuple(int(x) for x in m.groups()) for v in [*versions, base] if (m := _SEMVER.match(v))]
    major, minor = max(parsed)[:2] if parsed else (1, 0)
    return f"{major}.{minor + 1}.0"


def finetune_config(overrides: dict[str, Any]):
    """The fine-tuning settings with FINETUNE and a job's overrides applied (ConfigError names a bad one)."""
    from ml.finetune import FinetuneConfig

    return FinetuneConfig.from_dict(overrides, "fine-tuning settings")


def request_retrain(session: Session, *, settings, base_model_id: int | None, finetune: dict[str, Any]) -> tuple[TrainingJob, bool]:
    """POST /admin/retrain's rules: the settings must be valid, the base model must exist, there
    must be corrections; a job already queued or running is returned instead of a second one.
    Returns (job, created)."""
    from ml.config import ConfigError

    try:
        finetune_config({**settings.finetune, **finetune})
    except ConfigError as e:
        raise ApiError(422, "invalid_request", str(e)) from None
    if base_model_id is not None and repositories.get_model(session, model_id=base_model_id) is None:
        raise ApiError(404, "model_not_found", f"no model version with id {base_model_id}")
    if jobs_repo.count_corrections(session) == 0:
        raise ApiError(422, "no_corrections", "there are no stored corrections to learn from: send some to POST /feedback first")
    open_job = jobs_repo.open_job(session)
    if open_job is not None:
        return open_job, False
    params = {"finetune": finetune} if finetune else {}
    return jobs_repo.create_job(session, trigger="api", params=params, base_model_id=base_model_id), True


def list_jobs(session: Session, *, limit: int) -> list[TrainingJob]:
    """The latest training jobs, newest first (GET /admin/jobs)."""
    return jobs_repo.list_jobs(session, limit=limit)


def get_job(session: Session, *, job_id: int) -> TrainingJob:
    """One training job; 404 job_not_found when there is none with this id."""
    job = jobs_repo.get_job(session, job_id=job_id)
    if job is None:
        raise ApiError(404, "job_not_found", f"no training job with id {job_id}")
    return job


class LogTail:
    """The last LOG_TAIL lines of a job's log, with timestamps; thread-safe."""

    def __init__(self, initial: str = "") -> None:
        self.lines: collections.deque[str] = collections.deque(initial.splitlines()[-LOG_TAIL:], maxlen=LOG_TAIL)
        self.progress = 0.0
        self.lock = threading.Lock()

    def __call__(self, fraction: float, message: str) -> None:
        with self.lock:
            self.progress = max(self.progress, min(fraction, 1.0))
            self.lines.append(f"{time.strftime('%H:%M:%S')} {message}")

    def text(self) -> str:
        with self.lock:
            return "\n".join(self.lines)


@dataclass
class JobSettings:
    models_dir: Path
    finetune: dict[str, Any]
    promote_min_gain: float
    promote_max_label_drop: float
    promote_min_label_support: int
    rehearsal_max_texts: int

    @classmethod
    def from_settings(cls, settings) -> JobSettings:
        return cls(
            Path(settings.models_dir or default_models_dir()), dict(settings.finetune), settings.promote_min_gain, settings.promote_max_label_drop,
            settings.promote_min_label_support, settings.rehearsal_max_texts,
        )


@dataclass
class JobOutcome:
    model: ModelVersion
    metrics: dict[str, Any]
    decision: dict[str, Any]


def run_job(
    sessions: sessionmaker[Session], job: TrainingJob, settings: JobSettings, log: LogTail, should_stop: Callable[[], bool],
) -> JobOutcome:
    """Fine-tune, register, gate. Raises JobError (or any error of the training) on failure."""
    from ml.finetune import finetune, promotion_decision, split_corrections, to_sentences
    from ml.predictor import Predictor, evaluate

    overrides = {**settings.finetune, **(job.params.get("finetune") or {})}
    config = finetune_config(overrides)
    with sessions() as session:
        active = repositories.active_model(session)
        base = repositories.get_model(session, model_id=job.base_model_id) if job.base_model_id is not None else active
        if base is None:
            raise JobError("no base model: no version is active and the job names none")
        corrections = load_corrections(session)
        if not corrections:
            raise JobError("no stored corrections to learn from")
        rehearsal = jobs_repo.rehearsal_texts(session, limit=settings.rehearsal_max_texts) if config.rehearsal_ratio > 0 else []
        versions = [m.version for m in repositories.list_models(session) if m.name == base.name]
    version = next_version(versions, base.version)
    out = settings.models_dir / f"{base.name}-{version}"
    log(0.0, f"job {job.id} (attempt {job.attempts}): fine-tuning {base.name} {base.version} on {len(corrections)} corrections"
        f"{f' and {len(rehearsal)} stored texts for rehearsal' if rehearsal else ''} into {version} at {out}")
    result = finetune(
        base.path, corrections, out, version, config, base.name, rehearsal_texts=rehearsal,
        lineage={"job_id": job.id, "base_model_id": base.id}, progress=lambda f, m: log(0.95 * f, m), should_stop=should_stop,
    )
    metrics = result.metrics
    held = metrics["heldout"]
    before = held["before"]
    if active is not None and active.id != base.id and held["after"] is not None:
        # the gate compares with the version being served, on the same held-out texts
        _, held_docs = split_corrections(corrections, config.holdout_every)
        sentences = to_sentences(held_docs, result.meta.language)
        before = evaluate(Predictor.load(active.path, script=False), sentences).to_dict()
        log(0.97, f"active {active.name} {active.version} on the held-out corrections: F1 {100 * before['f1']:.2f}")
    decision = promotion_decision(before, held["after"], settings.promote_min_gain, settings.promote_max_label_drop, settings.promote_min_label_support)
    log(0.98, f"{'promoted' if decision.promote else 'kept as a candidate'}: {decision.reason}")
    promotion = {**decision.to_dict(), "job_id": job.id, "compared_with": f"{active.name} {active.version}" if active is not None else None}
    with sessions() as session:
        row = repositories.register_model(session, name=result.meta.name, version=version, path=str(out), metrics=metrics, lineage=result.meta.lineage)
        jobs_repo.set_promotion(session, model_id=row.id, promotion=promotion)
        if decision.promote:
            row = repositories.activate_model(session, model_id=row.id)
        session.refresh(row)
    summary = {
        "model": {"id": row.id, "name": row.name, "version": row.version, "path": row.path},
        "heldout_f1_before": before["f1"] if before else None,
        "heldout_f1_after": held["after"]["f1"] if held["after"] else None,
        "heldout": {"before": before, "after": held["after"], "documents": held["documents"]},
        "train_seconds": metrics["train_seconds"],
        "corrections": len(corrections),
    }
    return JobOutcome(row, summary, promotion)
