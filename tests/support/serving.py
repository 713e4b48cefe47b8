"""``ner serve`` as a child process for the tests that need real worker processes: its environment,
start (in its own session, so the whole process group can be stopped) and stop."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]


def serve_env(**settings: str) -> dict[str, str]:
    """This process's environment without a Prometheus multiprocess folder of its own (``ner serve``
    makes one per run), with the project importable and the given settings (``DATABASE_URL=...``)."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(PYTHONPATH=str(ROOT), **settings)
    return env


def start_serve(env: dict[str, str], port: int, *extra: str, workers: int = 2, log_level: str = "warning", stdout: IO[Any] | int = subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--workers", str(workers), "--log-level", log_level, *extra],
        cwd=ROOT, env=env, start_new_session=True, stdout=stdout, stderr=subprocess.STDOUT, text=True,
    )


def stop_serve(server: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to the supervisor and its workers (one process group), then wait for the supervisor."""
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout)
