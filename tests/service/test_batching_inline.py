"""MicroBatcher's inline path: an idle batcher runs a submission in the caller's thread (no
hand-off), a busy one queues it for the worker, and both give the same results and errors."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.serving.batching import MicroBatcher


def make(inline=lambda items: True, delay: float = 0.0):
    threads: list[int] = []
    batches: list[list[int]] = []

    def process(items: list[int]) -> list[int]:
        threads.append(threading.get_ident())
        batches.append(list(items))
        if delay:
            time.sleep(delay)
        if any(i < 0 for i in items):
            raise ValueError("negative item")
        return [i * 10 for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(process, 8, 0.0, 64, name="test", inline=inline).start()
    return batcher, threads, batches


def test_an_idle_batcher_runs_a_submission_in_the_callers_thread():
    batcher, threads, _ = make()
    try:
        result = asyncio.run(batcher.submit([1, 2]))
        assert result == [10, 20]
        assert threads == [threading.get_ident()]
    finally:
        batcher.close()


def test_a_submission_the_predicate_refuses_goes_to_the_worker():
    batcher, threads, _ = make(inline=lambda items: len(items) < 2)
    try:
        assert asyncio.run(batcher.submit([1, 2])) == [10, 20]
        assert threads and threads[0] != threading.get_ident()
    finally:
        batcher.close()


def test_concurrent_submissions_are_merged_by_the_worker_with_their_own_results():
    batcher, threads, batches = make(delay=0.02)

    async def many():
        return await asyncio.gather(*(batcher.submit([i]) for i in range(12)))

    try:
        results = asyncio.run(many())
        assert results == [[i * 10] for i in range(12)]
        assert len(batches) < 12  # merged
        assert sum(len(b) for b in batches) == 12
        assert threads.count(threading.get_ident()) <= 1  # at most the first one ran inline
    finally:
        batcher.close()


def test_an_inline_error_reaches_the_caller_and_the_batcher_keeps_working():
    batcher, _, _ = make()
    try:
        with pytest.raises(ValueError, match="negative item"):
            asyncio.run(batcher.submit([-1]))
        assert asyncio.run(batcher.submit([3])) == [30]
    finally:
        batcher.close()


def test_a_worker_batch_resolves_every_request_once_errors_and_cancellations_included():
    """The worker wakes each event loop once per batch: every request of a merged batch gets its
    own result, a failing batch gives its error to each of its requests, and a request cancelled
    while queued (client gone) does not disturb the others."""
    batcher, _, batches = make(inline=lambda items: False, delay=0.05)

    async def scenario():
        first = asyncio.ensure_future(batcher.submit([1]))  # taken alone while the rest queue
        await asyncio.sleep(0.01)
        good = [asyncio.ensure_future(batcher.submit([i])) for i in (2, 3, 4)]
        gone = asyncio.ensure_future(batcher.submit([5]))
        await asyncio.sleep(0)
        gone.cancel()
        assert await first == [10]
        assert await asyncio.gather(*good) == [[20], [30], [40]]
        failing = [asyncio.ensure_future(batcher.submit([i])) for i in (6, -7)]
        return await asyncio.gather(*failing, return_exceptions=True), gone.cancelled()

    try:
        (a, b), cancelled = asyncio.run(scenario())
        assert cancelled
        assert isinstance(a, ValueError) and isinstance(b, ValueError)  # one batch [6, -7]: its error to both
        assert [2, 3, 4, 5] in batches and [6, -7] in batches
    finally:
        batcher.close()
