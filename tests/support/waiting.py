"""Free ports, and waiting for a server to be ready or any condition to hold, with one clear
failure: what was awaited, and whether the process behind it exited or the time ran out."""
from __future__ import annotations

import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
# straight to the loopback server, whatever http_proxy says
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class WaitTimeout(AssertionError):
    """What was awaited never happened (an AssertionError: a test that waits fails, it does not error)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the caller binds it soon after; another process could take
    it in between, which on a test machine it does not)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(
    predicate: Callable[[], T], *, timeout: float, what: str, interval: float = 0.05,
    process: subprocess.Popen | threading.Thread | None = None, details: Callable[[], str] | None = None,
) -> T:
    """Call ``predicate`` until it returns something true, and return that. Raises WaitTimeout
    naming ``what`` when ``timeout`` seconds pass or ``process`` (a process or a thread) ends
    first; ``details()`` (a log's tail, say) is added to the message."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if process is not None and (ended := _ended(process)):
            reason = ended
        elif time.monotonic() > deadline:
            reason = f"not within {timeout:g} s"
        else:
            time.sleep(interval)
            continue
        raise WaitTimeout(f"{what}: {reason}" + (f"\n{details()}" if details is not None else ""))


def _ended(process: subprocess.Popen | threading.Thread) -> str | None:
    if isinstance(process, threading.Thread):
        return None if process.is_alive() else f"the thread {process.name} ended"
    return None if process.poll() is None else f"the process exited with status {process.returncode}"


def is_ready(base: str) -> bool:
    """Whether ``base``/readyz answers 200 now."""
    try:
        with _OPENER.open(base + "/readyz", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):  # refused, 503 (HTTPError), timed out
        return False


def wait_ready(base: str, process: subprocess.Popen | None = None, timeout: float = 90, details: Callable[[], str] | None = None) -> None:
    """Until ``base``/readyz answers 200; WaitTimeout if ``process`` exits or the time runs out."""
    wait_until(lambda: is_ready(base), timeout=timeout, what=f"{base} becoming ready", interval=0.3, process=process, details=details)
