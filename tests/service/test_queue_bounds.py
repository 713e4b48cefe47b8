"""The inference queue is bounded by characters (the work), not by texts, and a small request is
admitted while big batches are refused."""
from __future__ import annotations

import asyncio
import threading

import pytest

from service.serving.batching import MicroBatcher, QueueFull


def test_queue_counts_characters_and_keeps_room_for_small_requests():
    release = threading.Event()

    def process(texts):
        release.wait(10)
        return [len(t) for t in texts]

    async def scenario():
        batcher = MicroBatcher(process, max_items=64, max_wait_ms=0, max_queue=10_000, weight=len, max_weight=10_000).start()
        try:
            first = asyncio.ensure_future(batcher.submit(["x" * 100]))  # taken by the worker, which blocks
            while batcher.depth:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            big = ["y" * 4_000]
            queued = [asyncio.ensure_future(batcher.submit(big)) for _ in range(2)]  # 8,000 characters waiting
            await asyncio.sleep(0.05)
            with pytest.raises(QueueFull):
                await batcher.submit(big)  # one text only, but 4,000 more characters do not fit
            small = asyncio.ensure_future(batcher.submit(["Tom went to Oslo."]))  # fits in the reserve
            await asyncio.sleep(0.05)
            assert not small.done() or small.exception() is None
            release.set()
            assert await small == [17]
            assert [await q for q in queued] == [[4_000], [4_000]]
            assert await first == [100]
        finally:
            release.set()
            batcher.close()

    asyncio.run(scenario())


def test_an_empty_queue_takes_a_request_heavier_than_the_bound():
    async def scenario():
        batcher = MicroBatcher(lambda texts: [len(t) for t in texts], 64, 0, 100, weight=len, max_weight=100).start()
        try:
            assert await batcher.submit(["z" * 500]) == [500]
        finally:
            batcher.close()

    asyncio.run(scenario())


def test_tag_queue_is_bounded_by_characters(sqlite_url, small_model_dir):
    from tests.service.conftest import make_settings, running_app

    settings = make_settings(sqlite_url, small_model_dir, queue_max_chars=150_000, max_text_chars=100_000)
    with running_app(settings) as c:
        batcher = c.app.state.runtime.tagging.batcher
        assert batcher.max_weight == 150_000 and batcher.weight is len
