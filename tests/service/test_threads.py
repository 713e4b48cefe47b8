"""The inference threads run OpenMP (the LSTM's matrix products) on TORCH_THREADS threads.

OpenMP keeps its thread count per thread: a thread started after torch.set_num_threads in the main
thread still gets as many OpenMP threads as the machine has cores (unless OMP_NUM_THREADS is set,
as the test suite's conftest does, hence the subprocess below). Two workers then ran four spinning
OpenMP threads on two cores and collapsed now and then (docs/design-decisions.md, Threads per worker)."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from service.serving.batching import MicroBatcher

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import ctypes, json, os, sys, threading
from pathlib import Path
import torch
from fastapi.testclient import TestClient
from service.config import Settings
from service.store.session import upgrade
from service.main import create_app

def omp():
    maps = Path(f"/proc/{os.getpid()}/maps").read_text().split()
    lib = sorted({p for p in maps if Path(p).name.startswith(("libgomp", "libiomp", "libomp"))})[0]
    return ctypes.CDLL(lib).omp_get_max_threads()

def in_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start(); t.join()
    return out[0]

url, model = sys.argv[1], sys.argv[2]
upgrade(url)
settings = Settings(database_url=url, ner_model=model, torch_threads=1, model_poll_s=0, allowed_hosts=["testserver"], _env_file=None)
with TestClient(create_app(settings)) as client:
    engine = client.app.state.runtime.tagging
    print(json.dumps({
        "plain_thread": in_thread(omp),
        "lanes": [in_thread(lambda lane=lane: (lane.on_thread_start(), omp())[1]) for lane in (engine.small, engine.batcher)],
        "tagged": client.post("/tag", json={"text": "Tom went home ."}).status_code,
    }))
"""


def test_the_services_inference_lanes_set_torch_threads_in_their_own_threads(tmp_path, small_model_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    url = f"sqlite:///{tmp_path / 'threads.db'}"
    out = subprocess.run([sys.executable, "-c", SCRIPT, url, str(small_model_dir)], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["tagged"] == 200
    if (os.cpu_count() or 1) > 1:  # the trap: a new thread has as many OpenMP threads as cores
        assert seen["plain_thread"] == os.cpu_count()
    assert seen["lanes"] == [1, 1]


def test_the_batchers_worker_thread_runs_its_start_hook_before_any_batch():
    events: list[tuple[str, int]] = []
    batcher: MicroBatcher[int, int] = MicroBatcher(
        lambda items: [events.append(("batch", threading.get_ident())) or i for i in items], 8, 0.0, 64, name="test",
        on_thread_start=lambda: events.append(("start", threading.get_ident())),
    ).start()
    try:
        assert asyncio.run(batcher.submit([1, 2])) == [1, 2]  # no inline predicate: the worker thread
        assert [e[0] for e in events] == ["start", "batch", "batch"]
        assert len({e[1] for e in events}) == 1 and events[0][1] != threading.get_ident()
    finally:
        batcher.close()
