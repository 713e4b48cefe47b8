"""Several worker processes, each accepting on its own listening socket (``SO_REUSEPORT``).

uvicorn's ``--workers`` shares one listening socket among the workers, and each worker's event loop
accepts every pending connection when it wakes. A client that opens its keep-alive connections at
once (a load balancer's upstream pool, a benchmark) then lands most of them on one worker: with 32
connections and two workers the split was 32/0, 28/4, 31/1 or 22/10 in four runs, and the busy
worker's one core capped the service at one worker's throughput (docs/benchmarks/history.md, Speed). With a
socket per worker bound with ``SO_REUSEPORT``, Linux spreads new connections over the workers by a
hash of their addresses, whoever is awake. When a worker dies its socket closes and new connections
go to the others until its replacement binds again.

Linux only (elsewhere SO_REUSEPORT does not balance, and ``ner serve`` uses uvicorn's workers).

Memory: the supervisor imports the heavy libraries (``PRELOAD``: torch, spaCy, the web stack) once and
forks the workers, which share those pages instead of each importing its own copy (~230 MB a
process); the model's word table is shared through a mapped cache file (ml.mapped). The preload
starts no Python thread, opens no database connection and creates no metric; each worker loads its
model, connects and creates its metrics itself (the native thread numpy's OpenBLAS starts on import
is OpenBLAS's to handle across a fork, as in every forked numpy program: pthread_atfork).
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
import types
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from typing import Any

log = logging.getLogger("service.serving.supervisor")

STARTUP_FAILURE = 3  # uvicorn's exit status when the app cannot start (lifespan failure, bad config)
# imported by the supervisor before it forks the workers. Not service.metrics (a worker imports it
# afresh: see _forget_single_process_metrics) nor anything that starts a thread.
PRELOAD = ("torch", "numpy", "uvicorn", "fastapi", "sqlalchemy.orm", "pydantic_settings", "spacy", "spacy.lang.en",
           "ml.pipeline", "ml.mapped", "service.config", "service.schemas", "service.store.tables", "service.store.repositories",
           "service.store.session")


def available() -> bool:
    """Whether the kernel balances connections over sockets bound with SO_REUSEPORT (Linux)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def check_port_free(host: str, port: int) -> None:
    """Raise OSError if ``host:port`` is taken. A socket without SO_REUSEPORT cannot bind beside a
    listening one with it, so this also finds an earlier ``ner serve`` still holding the port,
    which would otherwise silently share it with this one."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


def bind_reuse_port(host: str, port: int) -> socket.socket:
    """Bound, not yet listening: uvicorn listens once the application has started, and only a
    listening socket gets connections, so none wait on a worker that is still loading its model."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _die_with_parent(parent: int) -> None:
    """A worker must not outlive its supervisor (it would keep serving on the port, unsupervised)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(1)


def worker_main(config_kwargs: dict[str, Any], parent: int) -> None:
    """One worker process: its own socket, then uvicorn's server on it (graceful on SIGTERM)."""
    import uvicorn

    _die_with_parent(parent)
    config = uvicorn.Config(**config_kwargs)
    config.configure_logging()
    try:
        sock = bind_reuse_port(config.host, config.port)
    except OSError as e:
        log.error("cannot bind %s:%s: %s", config.host, config.port, e)
        sys.exit(STARTUP_FAILURE)
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run(sockets=[sock])


def _forked(target: Callable[[dict[str, Any], int], None], config_kwargs: dict[str, Any], parent: int) -> None:
    """A forked worker starts with the supervisor's signal handlers: back to Python's defaults first."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _forget_single_process_metrics()
    target(config_kwargs, parent)


def _forget_single_process_metrics() -> None:
    """``ner serve`` checks its settings (service.security imports service.metrics) before it sets
    PROMETHEUS_MULTIPROC_DIR, so the supervisor's prometheus_client keeps its values in memory, not
    in the shared files. A worker forgets prometheus_client and every service module that refers to
    it, directly or through another such module, and imports them afresh, in multiprocess mode."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR") or "prometheus_client.values" not in sys.modules:
        return
    values = sys.modules["prometheus_client.values"]
    if values.ValueClass is not values.MutexValue:  # already multiprocess: its values follow the pid
        return
    forgotten = {name for name in sys.modules if name.split(".")[0] == "prometheus_client"}
    while more := {name for name, module in list(sys.modules.items())
                   if name.split(".")[0] == "service" and name not in forgotten and _refers_to(module, forgotten)}:
        forgotten |= more
    for name in forgotten:
        del sys.modules[name]


def _refers_to(module: Any, names: set[str]) -> bool:
    """Whether a module's globals hold one of the modules ``names`` or something defined in one."""
    for value in list(vars(module).values()):
        if isinstance(value, types.ModuleType):
            if value.__name__ in names:
                return True
        elif getattr(value, "__module__", None) in names:
            return True
    return False


class Supervisor:
    """Starts ``workers`` processes, restarts one that dies (after a pause that doubles while they
    keep dying young, up to 30 s), stops them all on SIGINT/SIGTERM, and gives up if a worker
    fails to start its application (exit status 3): that would fail the same way every time."""

    def __init__(self, config_kwargs: dict[str, Any], workers: int, *,
                 target: Callable[[dict[str, Any], int], None] = worker_main, stop_timeout_s: float = 30.0,
                 preload: Sequence[str] = PRELOAD):
        self.config_kwargs = config_kwargs
        self.workers = workers
        self.target = target
        self.stop_timeout_s = stop_timeout_s
        self.preload = tuple(preload)
        self._context = multiprocessing.get_context("fork")
        self._stopping = False

    def _preload(self) -> None:
        """Import what every worker imports, then keep those objects out of the garbage collector's
        passes (which would write to each object's header in every worker, unsharing the pages)."""
        for name in self.preload:
            try:
                importlib.import_module(name)
            except ImportError as e:  # the worker meets the same error and reports it; not the supervisor's to stop on
                log.warning("could not preload %s for the workers: %s", name, e)
        gc.collect()
        gc.freeze()

    def _spawn(self) -> tuple[BaseProcess, float]:
        process = self._context.Process(target=_forked, args=(self.target, self.config_kwargs, os.getpid()), daemon=False)
        process.start()
        log.info("started worker process [%s]", process.pid)
        return process, time.monotonic()

    def _stop(self, signum: int, _frame: object) -> None:
        self._stopping = True

    def run(self) -> int:
        """Blocks until stopped; 0 after a signal, 1 when a worker could not start its application."""
        host, port = self.config_kwargs.get("host", "127.0.0.1"), int(self.config_kwargs.get("port", 8000))
        check_port_free(host, port)
        self._preload()
        previous = {s: signal.signal(s, self._stop) for s in (signal.SIGINT, signal.SIGTERM)}
        status = 0
        slots = [self._spawn() for _ in range(self.workers)]
        pauses = [0.0] * self.workers
        restart_at: list[float | None] = [None] * self.workers
        try:
            while not self._stopping:
                time.sleep(0.2)
                for i, (process, started) in enumerate(slots):
                    if process.is_alive() or self._stopping:
                        continue
                    if process.exitcode == STARTUP_FAILURE:
                        log.error("worker [%s] could not start the application; stopping", process.pid)
                        self._stopping, status = True, 1
                        break
                    now = time.monotonic()
                    if restart_at[i] is None:
                        lived = now - started
                        pauses[i] = 0.0 if lived > 60 else min(30.0, max(1.0, 2 * pauses[i]))
                        restart_at[i] = now + pauses[i]
                        log.warning("worker [%s] exited with status %s after %.0f s; restarting in %.0f s",
                                    process.pid, process.exitcode, lived, pauses[i])
                    restart_at_i = restart_at[i]
                    if restart_at_i is not None and now >= restart_at_i:
                        slots[i], restart_at[i] = self._spawn(), None
        finally:
            for process, _ in slots:
                if process.is_alive() and process.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout_s
            for process, _ in slots:
                process.join(max(0.0, deadline - time.monotonic()))
                if process.is_alive():
                    log.warning("worker [%s] did not stop within %.0f s; killing it", process.pid, self.stop_timeout_s)
                    process.kill()
                    process.join()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return status
