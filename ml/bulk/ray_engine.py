"""``--engine ray``: the same shards as Ray Data, ``from_items(shards) -> map_batches(ShardTagger,
concurrency=N, num_cpus=1, batch_size=1)``, the model loaded once per actor (``pip install .[ray]``).

Joins the cluster at ``--ray-address`` / ``RAY_ADDRESS`` (or the Ray this process already runs),
otherwise starts a local Ray for the job. Each actor reads its shard from the input path, tags it
and writes the shard's file itself (temporary file + rename), so on a cluster the inputs, the output
folder and the model folder must be on a file system every node sees, and this package installed
on every node. A shard's file name is fixed by the plan: a shard run twice (a task retried after its
node died) replaces its file with the same content, and no document is written twice.

Should a round fail (a node lost with a task Ray could not retry), the shards still without a file
are run again, up to ``ROUNDS`` rounds, each sized to the CPUs the cluster has then."""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import numpy as np

from ml.bulk.job import BulkError, BulkJob, ShardResult, ShardWorker
from ml.bulk.output import OutputFolder
from ml.bulk.progress import Progress
from ml.bulk.sources import BulkInputError, Reject, RejectedRecord, ShardSpec

ROUNDS = 3
RESULT_FIELDS = ("index", "documents", "rejects", "tokens", "seconds")  # ml.bulk.job.ShardResult
log = logging.getLogger("ml.bulk.ray")


class ShardTagger:
    """A Ray Data actor: the model loaded once in ``__init__``; each call tags one batch of shards."""

    def __init__(self, job: dict):
        import torch

        torch.set_num_threads(1)
        self.worker = ShardWorker.load(BulkJob.from_dict(job))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One result row per shard. The job's own errors come back as data (``error``: Ray keeps
        only the text of an exception raised in an actor, and would retry it as if it were a crash)."""
        names = list(batch)
        results = []
        for k in range(len(batch[names[0]])):
            spec = ShardSpec.from_dict({name: batch[name][k].item() if hasattr(batch[name][k], "item") else batch[name][k] for name in names})
            row = dict.fromkeys(RESULT_FIELDS, 0) | {"error": ""}
            try:
                row |= self.worker.run(spec).to_dict()
            except RejectedRecord as e:
                row["error"] = json.dumps({"reject": e.reject.to_dict()})
            except BulkInputError as e:
                row["error"] = json.dumps({"input": str(e)})
            results.append(row)
        return {key: np.array([r[key] for r in results]) for key in (*RESULT_FIELDS, "error")}


def _raise_job_error(error: str) -> None:
    """Raise, in the driver, the error an actor returned (``ShardTagger.__call__``)."""
    data = json.loads(error)
    if "reject" in data:
        raise RejectedRecord(Reject(**data["reject"]))
    raise BulkInputError(data["input"])


def _connect(address: str | None) -> bool:
    """Join or start Ray; True when this call started it (and the job must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:  # what ray.init raises for an address it cannot join
        raise BulkError(f"cannot {'join the Ray cluster at ' + address if address else 'start a local Ray'}: {e}") from None
    return True


def _round(job: BulkJob, shards: Sequence[ShardSpec], workers: int | None, progress: Progress) -> list[ShardResult]:
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the job's own progress (ml.bulk.progress) is shown
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # nor a few INFO lines per dataset
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = max(1, min(workers or cpus, len(shards)))
    items = ray.data.from_items([s.to_dict() for s in shards], override_num_blocks=len(shards))
    pool = ray.data.ActorPoolStrategy(size=actors)
    ds = items.map_batches(ShardTagger, fn_constructor_kwargs={"job": job.to_dict()}, batch_size=1, compute=pool, num_cpus=1)
    results = []
    for row in ds.iter_rows():
        if row["error"]:
            _raise_job_error(str(row["error"]))
        result = ShardResult(int(row["index"]), int(row["documents"]), int(row["rejects"]), int(row["tokens"]), float(row["seconds"]))
        progress.add(result.documents + result.rejects, result.tokens, result.rejects)
        results.append(result)
    return results


def run_ray(job: BulkJob, pending: Sequence[ShardSpec], workers: int | None, address: str | None, progress: Progress) -> list[ShardResult]:
    try:
        import ray
        import ray.data  # (Ray Data: the [data] half of the extra)
    except ImportError as e:
        raise BulkError(f"--engine ray needs Ray Data: pip install '.[ray]' (ray[data]==2.60.0); {e}") from None

    started_here = _connect(address)
    out = OutputFolder(job.out, job.output_format)
    results: list[ShardResult] = []
    try:
        for attempt in range(1, ROUNDS + 1):
            remaining = [s for s in pending if not out.is_complete(s)]
            if not remaining:
                break
            try:
                results.extend(_round(job, remaining, workers, progress))
            except (RejectedRecord, BulkInputError):
                raise
            except Exception as e:  # whatever Ray raises when a round fails (its own types, wrapping the cause)
                if attempt == ROUNDS:
                    raise BulkError(f"the Ray job failed {ROUNDS} times, last: {e}; the shards written so far are kept: run the same command again") from e
                log.warning("Ray round %d failed (%s); running the %d shards still missing again", attempt, type(e).__name__, len(remaining))
    finally:
        if started_here:
            ray.shutdown()
    return results
