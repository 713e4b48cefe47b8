"""The default engine: the shards on ``workers`` processes of this machine, one torch thread each.

The model is loaded once, in this process, before the workers are forked: the workers share its
weights (the word table is most of them) page for page instead of each loading a copy, and only what
a worker writes (its feature cache, its batches) becomes its own memory. Loading with one torch
thread keeps OpenMP from starting a thread pool in the parent, which a forked child could not use.
A worker that dies (killed, out of memory) stops the job with an error; the shards written so far
are kept, and running the same command again resumes."""
from __future__ import annotations

import gc
import multiprocessing
import signal
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from ml.bulk.job import BulkError, BulkJob, ShardResult, ShardWorker
from ml.bulk.progress import Progress
from ml.bulk.sources import ShardSpec

# set in the parent before the fork, inherited by the workers
_worker: ShardWorker | None = None
_counters: Any = None  # shared Array("q", 2): documents and tokens tagged, updated every batch


def _count(documents: int, tokens: int) -> None:
    with _counters.get_lock():
        _counters[0] += documents
        _counters[1] += tokens


def _init_child() -> None:
    import torch

    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool


def _run_shard(spec: ShardSpec) -> ShardResult:
    assert _worker is not None
    return _worker.run(spec, _count)


def run_local(job: BulkJob, pending: Sequence[ShardSpec], workers: int, progress: Progress) -> list[ShardResult]:
    global _worker, _counters
    import torch

    torch.set_num_threads(1)
    worker = ShardWorker.load(job)
    workers = min(workers, len(pending))  # no idle process for a job of few shards
    if workers <= 1:  # in this process: the one-process baseline, and no fork
        results = []
        for spec in pending:
            result = worker.run(spec, lambda docs, tokens: progress.add(docs, tokens))
            progress.add(result.rejects, 0, result.rejects)
            results.append(result)
        return results
    context = multiprocessing.get_context("fork")
    _worker, _counters = worker, context.Array("q", 2)
    # the loaded objects out of the garbage collector's reach: its passes would write to every
    # object's header in each worker, copying the pages the workers otherwise share
    gc.freeze()
    try:
        return _run_pool(pending, workers, context, progress)
    finally:
        _worker = _counters = None
        gc.unfreeze()


def _run_pool(pending: Sequence[ShardSpec], workers: int, context: Any, progress: Progress) -> list[ShardResult]:
    results: list[ShardResult] = []
    queue = iter(pending)
    seen = [0, 0]  # counters already reported to the progress
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_child)
    running: set[Future[ShardResult]] = set()
    try:
        while True:
            while len(running) < 2 * workers and (spec := next(queue, None)) is not None:
                running.add(pool.submit(_run_shard, spec))  # a few ahead: no worker waits for the parent
            if not running:
                break
            done, running = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            now = list(_counters)
            progress.add(now[0] - seen[0], now[1] - seen[1])
            seen = now
            for future in done:
                result = future.result()
                progress.add(result.rejects, 0, result.rejects)
                results.append(result)
    except BrokenProcessPool:
        raise BulkError("a worker process died (killed, or out of memory?); the shards written so far are kept: run the same command again to resume") from None
    except KeyboardInterrupt:  # Ctrl-C: stop now, not after the shards in hand (a shard can take minutes)
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()  # what it was writing stays a temporary file, removed by the next run
        raise
    finally:
        for future in running:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
    return results
