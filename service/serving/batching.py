"""Micro-batching between async request handlers and a blocking worker.

Requests ``await submit(items)``; one worker thread takes whatever is queued (waiting up to
``max_wait_ms`` for company once the first item arrives, never more than ``max_items``), calls
``process(items)`` once for all of them, and hands each request its own slice of the results.
The queue is bounded: ``submit`` raises QueueFull instead of letting latency grow without end.
The same class batches model inference and database writes (group commit)."""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(Exception):
    def __init__(self, retry_after_s: float):
        super().__init__(f"queue full; retry after {retry_after_s:.1f}s")
        self.retry_after_s = retry_after_s


class BatcherClosed(Exception):
    pass


@dataclass
class _Request(Generic[T]):
    items: Sequence[T]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    weight: int = 0


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        process: Callable[[list[T]], list[R]],
        max_items: int,
        max_wait_ms: float,
        max_queue: int,
        name: str = "batcher",
        on_depth: Callable[[int], None] | None = None,
        weight: Callable[[T], int] | None = None,
        max_weight: int | None = None,
        inline: Callable[[Sequence[T]], bool] | None = None,
        on_thread_start: Callable[[], None] | None = None,
    ):
        self.process = process
        # run first in the worker thread (per-thread settings, e.g. the OpenMP thread count)
        self.on_thread_start = on_thread_start
        # a submission that ``inline`` accepts runs in the caller's thread when the batcher is idle
        # (nothing queued, processing or awaited): no hand-off to the worker and back, which is
        # most of the overhead at concurrency 1; under load everything goes through the worker
        self.inline = inline
        self.max_items = max_items
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.name = name
        self.on_depth = on_depth
        self._queue: deque[_Request[T]] = deque()
        self._pending = 0  # items queued, not yet taken by the worker
        self._busy = False  # process() is running (in the worker or inline)
        self._awaited = 0  # submissions waiting for the worker's results
        self._deciding = 0  # submissions in their turn of the event loop before choosing inline
        # the work waiting, e.g. characters of texts: the bound that matters when items differ in
        # size. Requests heavier than a tenth of it may fill only nine tenths, so a small request
        # still fits while big batches are refused
        self.weight = weight
        self.max_weight = max_weight
        self._pending_weight = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._recent_batch_s = 0.01

    def start(self) -> MicroBatcher[T, R]:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def depth(self) -> int:
        """Items queued, not yet taken by the worker."""
        return self._pending

    async def submit(self, items: Sequence[T]) -> list[R]:
        if not items:
            return []
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        inline = self.inline is not None and self.inline(items)
        if inline:
            # one turn of the event loop first: requests read in the same turn as this one reach
            # this point too, and then none of them runs inline (they are batched instead)
            self._deciding += 1
            try:
                await asyncio.sleep(0)
            finally:
                self._deciding -= 1
                inline = self._deciding == 0
        with self._cond:
            if self._closed:
                raise BatcherClosed(self.name)
            if inline and not self._queue and not self._busy and not self._awaited:
                self._busy = True
            else:
                inline = False
                w = sum(self.weight(item) for item in items) if self.weight is not None else 0
                if self._pending + len(items) > self.max_queue or not self._fits(w):
                    # a rough wait: the batches ahead of this one at the recent batch time
                    ahead = max(1.0, self._pending / self.max_items)
                    raise QueueFull(max(1.0, ahead * self._recent_batch_s))
                self._queue.append(_Request(items, future, loop, w))
                self._pending += len(items)
                self._pending_weight += w
                self._awaited += 1
                depth = self._pending
                self._cond.notify()
        if inline:
            return self._process_inline(list(items))
        if self.on_depth:
            self.on_depth(depth)
        try:
            return await future
        finally:
            with self._cond:
                self._awaited -= 1

    def _process_inline(self, items: list[T]) -> list[R]:
        started = time.perf_counter()
        try:
            results = self.process(items)
            if len(results) != len(items):
                raise RuntimeError(f"{self.name}: process returned {len(results)} results for {len(items)} items")
            return results
        finally:
            elapsed = time.perf_counter() - started
            with self._cond:
                self._recent_batch_s = 0.8 * self._recent_batch_s + 0.2 * elapsed
                self._busy = False
                if self._queue:  # wake the worker only for work (waking it costs this thread the GIL)
                    self._cond.notify()

    def _fits(self, w: int) -> bool:
        if self.max_weight is None or self._pending_weight == 0:  # an empty queue takes any request
            return True
        reserve = self.max_weight // 10
        limit = self.max_weight - reserve if w > reserve else self.max_weight
        return self._pending_weight + w <= limit

    def _take(self) -> list[_Request[T]]:
        """Block until something is queued, then gather whole requests up to max_items."""
        with self._cond:
            while (not self._queue and not self._closed) or self._busy:
                self._cond.wait()
            if not self._queue:
                return []
            deadline = time.monotonic() + self.max_wait_s
            while self._pending < self.max_items and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            taken: list[_Request[T]] = []
            count = 0
            while self._queue and (not taken or count + len(self._queue[0].items) <= self.max_items):
                request = self._queue.popleft()
                taken.append(request)
                count += len(request.items)
                self._pending_weight -= request.weight
            self._pending -= count
            self._busy = True
            depth = self._pending
        if self.on_depth:
            self.on_depth(depth)
        return taken

    def _run(self) -> None:
        if self.on_thread_start is not None:
            self.on_thread_start()
        while True:
            taken = self._take()
            if not taken:
                return
            items: list[T] = [item for request in taken for item in request.items]
            started = time.perf_counter()
            try:
                results = self.process(items)
                if len(results) != len(items):
                    raise RuntimeError(f"{self.name}: process returned {len(results)} results for {len(items)} items")
                error: BaseException | None = None
            except BaseException as e:  # noqa: BLE001 -- not swallowed: _resolve raises it in every waiting request
                results, error = [], e
            elapsed = time.perf_counter() - started
            with self._cond:
                self._recent_batch_s = 0.8 * self._recent_batch_s + 0.2 * elapsed
                self._busy = False
                self._cond.notify()
            # one wake-up of each event loop for the whole batch (each call_soon_threadsafe writes
            # to the loop's self-pipe: 32 requests of a batch were 32 system calls and wake-ups)
            outcomes: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, Any, BaseException | None]]] = {}
            offset = 0
            for request in taken:
                n = len(request.items)
                outcome = (results[offset : offset + n], None) if error is None else (None, error)
                outcomes.setdefault(request.loop, []).append((request.future, *outcome))
                offset += n
            for loop, resolved in outcomes.items():
                loop.call_soon_threadsafe(_resolve_all, resolved)


def _resolve_all(resolved: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    for future, result, error in resolved:
        _resolve(future, result, error)


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the request was cancelled (client went away)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
