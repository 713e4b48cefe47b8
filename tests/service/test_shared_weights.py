"""`ner serve --workers 2`: both workers read the word table from one mapped cache file (the page
cache holds it once), the supervisor forks them after importing torch, and each answers /tag."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.serving import supervisor
from tests.support import free_port, wait_ready, wait_until

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not supervisor.available(), reason="the per-worker supervisor is Linux-only")


def test_what_the_supervisor_preloads_starts_no_thread_and_no_metric(tmp_path):
    """The workers are forked from the supervisor after it imports PRELOAD: a thread would not exist
    in them (a lock it held would stay held), and a metric created there would write its
    multiprocess file under the supervisor's pid."""
    code = (
        "import importlib, sys, threading\n"
        "from service.serving.supervisor import PRELOAD\n"
        "for name in PRELOAD: importlib.import_module(name)\n"
        "print(threading.active_count(), 'service.metrics' in sys.modules)\n"
    )
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "False"], out.stdout + out.stderr
    assert not list(metrics_dir.iterdir())


def _mapped_tables(pid: int) -> set[tuple[str, str]]:
    """(inode, path) of the word-table cache files mapped by a process."""
    found = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith("word_embedding.weight.f32"):
            found.add((fields[4], fields[5]))
    return found


@pytest.mark.slow
def test_workers_map_one_word_table_file(tmp_path):
    cache = tmp_path / "model-cache"
    env = {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR", "NER_MODEL")}
    env.update(DATABASE_URL=f"sqlite:///{tmp_path / 'w.db'}", PYTHONPATH=str(ROOT), MODEL_CACHE_DIR=str(cache))
    assert subprocess.run([sys.executable, "-m", "service.cli", "db", "upgrade"], env=env, cwd=ROOT, capture_output=True).returncode == 0
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:  # the bundled model: its word table is large enough to be mapped
        server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--workers", "2", "--log-level", "info"],
                                  cwd=ROOT, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}", server, timeout=180, details=lambda: log.read_text()[-3000:])
        wait_until(lambda: log.read_text().count("Application startup complete") >= 2, timeout=180, what="both workers started", interval=0.5, process=server)
        workers = [int(p) for p in Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()]
        assert len(workers) == 2, workers
        tables = [_mapped_tables(pid) for pid in workers]
        assert tables[0] and tables[0] == tables[1], f"the workers map different word tables (or none): {tables}"
        (_, path), = tables[0]
        assert Path(path).parent.parent == cache
        assert "not shared between processes" not in log.read_text()
        for _ in range(6):  # new connections: spread over both workers
            response = httpx.post(f"http://127.0.0.1:{port}/tag", json={"text": "Tom visited Oslo ."}, timeout=30)
            assert response.status_code == 200
            assert [(e["text"], e["label"]) for e in response.json()["entities"]] == [("Tom", "PER"), ("Oslo", "LOC")]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
    assert server.returncode == 0
