"""Logging a repeated failure without flooding the log: during a database outage every unstored
/tag failed the same way (about 200 lines a second). The first failure is logged; later ones are
counted and summarised at most once every ``interval_s`` seconds; the end of the streak is logged."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class ThrottledLog:
    def __init__(self, logger: logging.Logger, what: str, interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.what = what
        self.interval_s = interval_s
        self.clock = clock
        self._lock = threading.Lock()
        self._failing = False
        self._suppressed = 0
        self._last = 0.0

    def failure(self, error: BaseException, count: int = 1) -> None:
        """One failure (``count`` items): logged if it is the first of a streak or the interval passed."""
        now = self.clock()
        with self._lock:
            if not self._failing:
                self._failing, self._suppressed, self._last = True, 0, now
                message = f"{self.what}: {type(error).__name__}: {error}"
            elif now - self._last >= self.interval_s:
                message = f"{self.what}: {self._suppressed + count} more in the last {now - self._last:.0f} s (latest: {type(error).__name__})"
                self._suppressed, self._last = 0, now
            else:
                self._suppressed += count
                return
        self.logger.warning(message)

    def success(self) -> None:
        """The operation worked again: close the streak, with the count not yet reported."""
        if not self._failing:  # the common case, without the lock
            return
        with self._lock:
            if not self._failing:
                return
            suppressed, self._failing, self._suppressed = self._suppressed, False, 0
        self.logger.warning(f"{self.what}: recovered" + (f" ({suppressed} more failures since the last report)" if suppressed else ""))
