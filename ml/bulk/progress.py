"""Progress of a bulk job: a tqdm bar (records, records/s, tokens/s) when the stream is a terminal,
otherwise one log line every ``interval_s`` seconds and one at the end."""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    def __init__(self, total: int, done: int = 0, *, enabled: bool = True, stream: TextIO | None = None, interval_s: float = 30.0):
        self.total = total
        self.initial = done
        self.records = 0  # this run's, beyond ``done``
        self.tokens = 0
        self.rejects = 0
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self.started = time.monotonic()
        self._last_log = self.started
        self._bar: Any = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, unit="doc", unit_scale=True, dynamic_ncols=True, file=self.stream, smoothing=0.1)

    def add(self, records: int, tokens: int, rejects: int = 0) -> None:
        self.records += records
        self.tokens += tokens
        self.rejects += rejects
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(records)
            self._bar.set_postfix_str(f"{self._rate(self.tokens):,.0f} tokens/s, {self.rejects} rejects", refresh=False)
        elif time.monotonic() - self._last_log >= self.interval_s:
            self._last_log = time.monotonic()
            self._log()

    def _rate(self, count: int) -> float:
        return count / max(time.monotonic() - self.started, 1e-9)

    def _log(self, final: bool = False) -> None:
        done = self.initial + self.records
        share = f" ({100 * done / self.total:.0f}%)" if self.total else ""
        line = (f"bulk: {done:,}/{self.total:,} documents{share}, {self._rate(self.records):,.0f} documents/s, "
                f"{self._rate(self.tokens):,.0f} tokens/s, {self.rejects} rejects")
        if not final and self.records:
            line += f", about {(self.total - done) / self._rate(self.records):,.0f} s left"
        if final:
            line += " (done)" if done >= self.total else " (stopped)"
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            self._log(final=True)
