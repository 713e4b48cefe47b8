"""``run_job``: plan the shards, check them against the output folder, hand the missing ones to an
engine, and write the summary once every shard is complete."""
from __future__ import annotations

import os
import time
from typing import TextIO

from ml.bulk.job import BulkError, BulkJob, model_identity
from ml.bulk.output import OutputFolder
from ml.bulk.progress import Progress

ENGINES = ("local", "ray")  # (ml.bulk.command offers the same)


def default_workers() -> int:
    """One per core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_job(job: BulkJob, *, engine: str = "local", workers: int | None = None, ray_address: str | None = None,
            progress: bool = True, stream: TextIO | None = None, log_interval_s: float = 30.0) -> dict:
    """Tag every shard of ``job`` that its output folder lacks; returns the summary (also written to
    ``OUT/_summary.json``). Raises BulkInputError, OutputError, RejectedRecord (strict), BulkError."""
    if engine not in ENGINES:
        raise BulkError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    if workers is not None and workers < 1:
        raise BulkError(f"--workers must be at least 1, got {workers}")
    model = model_identity(job.model)
    shard_size, specs = job.plan()
    out = OutputFolder(job.out, job.output_format)
    started = time.monotonic()
    with out.locked():
        out.prepare(job.manifest(model, shard_size, specs))
        pending = [s for s in specs if not out.is_complete(s)]
        done = sum(s.count for s in specs) - sum(s.count for s in pending)
        bar = Progress(sum(s.count for s in specs), done, enabled=progress, stream=stream, interval_s=log_interval_s)
        try:
            if pending and engine == "local":
                from ml.bulk.local import run_local

                run_local(job, pending, workers or default_workers(), bar)
            elif pending:
                from ml.bulk.ray_engine import run_ray

                run_ray(job, pending, workers, ray_address, bar)
        finally:
            bar.close()
        missing = [s.name for s in specs if not out.is_complete(s)]
        if missing:
            raise BulkError(f"{len(missing)} shards have no output after the run ({', '.join(missing[:5])}...); run the same command again")
        summary = {
            "out": str(out.path), "format": job.output_format, "model": model, "shards": len(specs), "shards_run": len(pending),
            "documents": sum(out.count_rows(s) for s in specs), "rejects": sum(out.count_rejects(s) for s in specs),
            "seconds": round(time.monotonic() - started, 1),
        }
        out.finish({k: v for k, v in summary.items() if k != "seconds"})
    return summary
