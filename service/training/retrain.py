"""What a retraining job does, in the trainer process (``ner worker``), never in an API process:
fine-tune the active model (or the one the job names) on the stored corrections, register the new
version, and let the promotion gate decide whether it becomes active.

The API only records jobs (``POST /admin/retrain``) and shows them (``GET /admin/jobs/{id}``)."""
from __future__ import annotations

import collections
import os
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


def request_retrain(
    session: Session, *, settings, base_model_id: int | None, finetune: dict[str, Any], method: str = "finetune",
) -> tuple[TrainingJob, bool]:
    """POST /admin/retrain's rules: the settings must be valid, the base model must exist, there
    must be corrections, a full retrain needs BASE_CORPUS; a job already queued or running is
    returned instead of a second one. Returns (job, created)."""
    from ml.config import ConfigError

    try:
        finetune_config({**settings.finetune, **finetune})
    except ConfigError as e:
        raise ApiError(422, "invalid_request", str(e)) from None
    if method == "retrain" and not settings.base_corpus:
        raise ApiError(422, "invalid_request", "method retrain trains from scratch on the base corpus: set BASE_CORPUS for the trainer (docs/learning-loop.md)")
    if base_model_id is not None and repositories.get_model(session, model_id=base_model_id) is None:
        raise ApiError(404, "model_not_found", f"no model version with id {base_model_id}")
    if jobs_repo.count_corrections(session) == 0:
        raise ApiError(422, "no_corrections", "there are no stored corrections to learn from: send some to POST /feedback first")
    open_job = jobs_repo.open_job(session)
    if open_job is not None:
        return open_job, False
    params: dict[str, Any] = {"finetune": finetune} if finetune else {}
    if method != "finetune":
        params["method"] = method
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
    """The last LOG_TAIL lines of a job's log, with timestamps; thread-safe. Each line also goes to
    ``echo`` (the trainer's own log: an operator reads ``docker compose logs trainer``)."""

    def __init__(self, initial: str = "", echo: Callable[[str], None] | None = None) -> None:
        self.lines: collections.deque[str] = collections.deque(initial.splitlines()[-LOG_TAIL:], maxlen=LOG_TAIL)
        self.progress = 0.0
        self.lock = threading.Lock()
        self.echo = echo

    def __call__(self, fraction: float, message: str) -> None:
        with self.lock:
            self.progress = max(self.progress, min(fraction, 1.0))
            self.lines.append(f"{time.strftime('%H:%M:%S')} {message}")
        if self.echo is not None:
            self.echo(message)

    def text(self) -> str:
        with self.lock:
            return "\n".join(self.lines)


@dataclass
class JobSettings:
    models_dir: Path
    finetune: dict[str, Any]
    gate: Any  # ml.finetune.GatePolicy (ml is imported in the trainer only)
    stored_max_texts: int
    base_corpus: Path | None
    threads: int

    @classmethod
    def from_settings(cls, settings) -> JobSettings:
        from ml.gate import GatePolicy

        gate = GatePolicy(
            min_gain=settings.promote_min_gain, max_label_drop=settings.promote_max_label_drop, min_label_support=settings.promote_min_label_support,
            min_unseen_gain=settings.promote_min_unseen_gain, min_unseen_mentions=settings.promote_min_unseen_mentions,
            max_time_drop=settings.promote_max_time_drop, min_probe_agreement=settings.promote_min_probe_agreement, max_dev_drop=settings.promote_max_dev_drop,
        )
        corpus = Path(settings.base_corpus) if settings.base_corpus else None
        return cls(Path(settings.models_dir or default_models_dir()), dict(settings.finetune), gate, settings.rehearsal_max_texts, corpus,
                   settings.train_threads or os.cpu_count() or 1)


@dataclass
class JobOutcome:
    model: ModelVersion
    metrics: dict[str, Any]
    decision: dict[str, Any]


@dataclass
class _JobInputs:
    base: ModelVersion
    active: ModelVersion | None
    corrections: list
    stored: list[str]
    version: str


def _job_inputs(sessions: sessionmaker[Session], job: TrainingJob, settings: JobSettings) -> _JobInputs:
    with sessions() as session:
        active = repositories.active_model(session)
        base = repositories.get_model(session, model_id=job.base_model_id) if job.base_model_id is not None else active
        if base is None:
            raise JobError("no base model: no version is active and the job names none")
        corrections = load_corrections(session)
        if not corrections:
            raise JobError("no stored corrections to learn from")
        # stored texts nobody corrected: the forgetting probe, and rehearsal / distillation when on
        stored = jobs_repo.rehearsal_texts(session, limit=settings.stored_max_texts)
        versions = [m.version for m in repositories.list_models(session) if m.name == base.name]
    return _JobInputs(base, active, corrections, stored, next_version(versions, base.version))


def read_base_corpus(folder: Path | None):
    """(train, dev) sentences of BASE_CORPUS, or None when unset; a set folder without them is an error."""
    if folder is None:
        return None
    from ml.data import read_corpus

    missing = [name for name in ("train.txt", "dev.txt") if not (folder / name).is_file()]
    if missing:
        raise JobError(f"BASE_CORPUS={folder} lacks {', '.join(missing)} (mount the base model's corpus there, or unset BASE_CORPUS)")
    return read_corpus(folder / "train.txt"), read_corpus(folder / "dev.txt")


def run_job(
    sessions: sessionmaker[Session], job: TrainingJob, settings: JobSettings, log: LogTail, should_stop: Callable[[], bool],
) -> JobOutcome:
    """Fine-tune, register, gate. Raises JobError (or any error of the training) on failure."""
    import torch

    from ml.finetune import FinetuneInputs, finetune, retrain
    from ml.gate import promotion_decision

    method = job.params.get("method", "finetune")
    config = finetune_config({**settings.finetune, **(job.params.get("finetune") or {})})
    torch.set_num_threads(config.threads or settings.threads)
    inputs = _job_inputs(sessions, job, settings)
    base, active = inputs.base, inputs.active
    out = settings.models_dir / f"{base.name}-{inputs.version}"
    base_data = read_base_corpus(settings.base_corpus)
    if method == "retrain" and base_data is None:
        raise JobError("a retrain job trains on the base corpus: set BASE_CORPUS for the trainer")
    log(0.0, f"job {job.id} (attempt {job.attempts}): {'retraining' if method == 'retrain' else 'fine-tuning'} {base.name} {base.version} on {len(inputs.corrections)} corrections "
        f"({len(inputs.stored)} stored texts nobody corrected{', the base corpus' if base_data else ''}) into {inputs.version} at {out}, "
        f"{torch.get_num_threads()} threads")
    # the gate compares with the version being served, on the same held-out texts
    reference = active.path if active is not None and active.id != base.id else None
    result = (retrain if method == "retrain" else finetune)(
        FinetuneInputs(base.path, inputs.corrections, inputs.version, out, base.name, base_data, inputs.stored, reference,
                       lineage={"job_id": job.id, "base_model_id": base.id}),
        config, progress=lambda f, m: log(0.95 * f, m), should_stop=should_stop,
    )
    decision = promotion_decision(result.metrics, settings.gate)
    log(0.98, f"{'promoted' if decision.promote else 'kept as a candidate'}: {decision.reason}")
    promotion = {**decision.to_dict(), "job_id": job.id, "compared_with": f"{active.name} {active.version}" if active is not None else None}
    with sessions() as session:
        row = repositories.register_model(session, name=result.meta.name, version=inputs.version, path=str(out), metrics=result.metrics, lineage=result.meta.lineage)
        jobs_repo.set_promotion(session, model_id=row.id, promotion=promotion)
        if decision.promote:
            row = repositories.activate_model(session, model_id=row.id)
        session.refresh(row)
    return JobOutcome(row, job_summary(row, result.metrics, len(inputs.corrections)), promotion)


def job_summary(row: ModelVersion, metrics: dict[str, Any], corrections: int) -> dict[str, Any]:
    """A finished job's metrics: the new version and every held-out measure, before and after."""
    held = metrics.get("heldout") or {}
    return {
        "model": {"id": row.id, "name": row.name, "version": row.version, "path": row.path},
        "heldout_f1_before": held["before"]["f1"] if held else None,
        "heldout_f1_after": held["after"]["f1"] if held else None,
        "heldout": metrics.get("heldout"),
        "time": metrics.get("time"),
        "probe": metrics.get("probe"),
        **({"dev_before": metrics["dev_before"], "dev": metrics["dev"]} if "dev" in metrics else {}),
        "schedule": metrics.get("schedule"),
        "train_seconds": metrics["train_seconds"],
        "corrections": corrections,
    }


def _gain(part: dict[str, Any] | None) -> float | None:
    if not part or not part.get("before") or not part.get("after"):
        return None
    return round(part["after"]["f1"] - part["before"]["f1"], 4)


def gain_curve(session: Session, job: TrainingJob) -> list[dict[str, Any]]:
    """The gain per number of corrections: one point per succeeded job up to this one (its own
    included), each measured by that job on its held-out parts against the model it was compared with."""
    points = []
    for j in jobs_repo.succeeded_jobs(session, up_to=job.id):
        m = j.metrics or {}
        held = m.get("heldout") or {}
        points.append({
            "job_id": j.id, "corrections": m.get("corrections", j.corrections), "version": (m.get("model") or {}).get("version"),
            "heldout_gain": _gain(held), "unseen_gain": _gain(held.get("unseen")), "time_gain": _gain(m.get("time")),
            "probe_agreement": (m.get("probe") or {}).get("agreement"), "promoted": bool((j.decision or {}).get("promote")),
        })
    return points
