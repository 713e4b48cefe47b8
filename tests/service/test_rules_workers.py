"""Every worker of `ner serve --workers 2` picks up a new rule set version within MODEL_POLL_S,
without a restart, on SQLite and on PostgreSQL."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.serving import supervisor
from tests.support import free_port, serve_env, start_serve, stop_serve, wait_ready

ROOT = Path(__file__).resolve().parents[2]
ADMIN = {"X-Admin-Key": "w" * 24}

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not supervisor.available(), reason="SO_REUSEPORT balancing is Linux-only")]


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'workers.db'}"
    else:
        yield request.getfixturevalue("fresh_pg_url")


def _versions(base: str) -> list[float]:
    """ner_rule_set_version of each live worker (one series per process in multiprocess mode)."""
    text = httpx.get(base + "/metrics", timeout=10).text
    return [float(v) for v in re.findall(r'^ner_rule_set_version\{pid="\d+"\} ([0-9.e+-]+)$', text, flags=re.M)]


def _wait_for(condition, what: str, server: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline and server.poll() is None, f"timed out waiting for {what}"
        time.sleep(0.2)


def _tagged_labels(base: str) -> set[tuple[str, str]]:
    # a fresh connection each time: SO_REUSEPORT spreads new connections over the workers
    with httpx.Client(base_url=base, timeout=30) as client:
        r = client.post("/tag", json={"text": "Tom visited Paris .", "store": False})
    assert r.status_code == 200, r.text
    return {(e["text"], e["source"]) for e in r.json()["entities"]}


def test_two_workers_pick_up_a_new_rule_set(tmp_path, database_url, small_model_dir):
    env = serve_env(DATABASE_URL=database_url, NER_MODEL=str(small_model_dir), ADMIN_KEY=ADMIN["X-Admin-Key"], MODEL_POLL_S="0.5")
    assert subprocess.run([sys.executable, "-m", "service.cli", "db", "upgrade"], env=env, cwd=ROOT, capture_output=True).returncode == 0
    port = free_port()
    server = start_serve(env, port)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, server)
        _wait_for(lambda: _versions(base) == [0.0, 0.0], "both workers to report rule set version 0", server)
        assert ("Paris", "model") in _tagged_labels(base)

        r = httpx.post(base + "/admin/rules", headers=ADMIN, json={"rules": [{"phrase": "paris", "label": "ORG"}], "author": "test"}, timeout=30)
        assert r.status_code == 201, r.text
        # the worker that stored it serves it at once; the other within MODEL_POLL_S (plus loading)
        _wait_for(lambda: _versions(base) == [1.0, 1.0], "both workers to apply version 1", server, timeout=30)
        for _ in range(12):
            assert ("Paris", "rule") in _tagged_labels(base)

        r = httpx.post(base + "/admin/rules/versions/1/rollback", headers=ADMIN, json={}, timeout=30)
        assert r.status_code == 201
        r = httpx.put(base + "/admin/rules", headers=ADMIN, json={"rules": []}, timeout=30)
        assert r.status_code == 201 and r.json()["version"] == 3 and r.json()["rule_count"] == 0
        _wait_for(lambda: _versions(base) == [3.0, 3.0], "both workers to apply version 3", server, timeout=30)
        for _ in range(12):
            assert ("Paris", "model") in _tagged_labels(base)
    finally:
        stop_serve(server)
