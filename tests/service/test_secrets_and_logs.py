"""Nothing secret in output or logs: the database password, users' texts in SQL errors; a database
outage logs a few lines, not one per request; `ner serve` cleans its metrics folders."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from service.logthrottle import ThrottledLog
from tests.service.conftest import make_settings, running_app
from tests.support import fresh_database

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.postgres
def test_train_annotations_from_never_prints_the_password(pg_server_url, tmp_path):
    from service.store.session import upgrade

    with fresh_database("ner_pw") as url:
        upgrade(url)
        # trust authentication accepts any password: the URL carries one as a real deployment's would
        secret_url = url.replace("postgres@", "postgres:S3cretPassw0rdXYZ@")
        assert "S3cretPassw0rdXYZ" in secret_url
        out = subprocess.run(
            [sys.executable, "-m", "service.cli", "train", "--annotations-from", secret_url, "--out", str(tmp_path / "m")],
            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300,
        )
        assert out.returncode == 2 and "no stored corrections" in out.stderr
        assert "S3cretPassw0rdXYZ" not in out.stdout + out.stderr
        assert "***" in out.stderr


def test_sql_errors_never_log_users_texts(sqlite_url, small_model_dir, caplog):
    from sqlalchemy import create_engine, text

    secret = "Zebulon Quixotewright visited Vhaldemar ."
    with running_app(make_settings(sqlite_url, small_model_dir)) as c:
        engine = create_engine(sqlite_url)
        with engine.begin() as conn:  # the INSERT of every /tag now fails, with its parameters in the error
            conn.execute(text("DROP TABLE annotations"))
            conn.execute(text("DROP TABLE predictions"))
        engine.dispose()
        with caplog.at_level(logging.DEBUG):
            r = c.post("/tag", json={"text": secret})
        assert r.status_code == 200 and r.json()["stored"] is False
    logged = "\n".join(rec.getMessage() + (rec.exc_text or "") for rec in caplog.records)
    assert "predictions not stored" in logged and "no such table" in logged
    assert "Zebulon" not in logged and "Vhaldemar" not in logged


def test_outage_logs_the_first_failure_then_counts(caplog):
    now = [0.0]
    throttled = ThrottledLog(logging.getLogger("test.outage"), "predictions not stored", interval_s=5.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.outage"):
        for _ in range(1000):  # 200 a second for 5 s
            throttled.failure(ConnectionError("database down"))
            now[0] += 0.005
        now[0] += 0.1
        throttled.failure(ConnectionError("database down"))
        throttled.success()
        throttled.success()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "ConnectionError: database down" in lines[0]
    assert "1000 more" in lines[1]
    assert "recovered" in lines[2]


def test_serve_removes_its_metrics_folder_and_stale_ones(monkeypatch, tmp_path):
    import uvicorn

    from service import cli

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"ner-metrics-{dead.pid}-abc"
    live = tmp_path / f"ner-metrics-{os.getppid()}-def"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "counter_1.db").write_bytes(b"x")
    seen = {}

    def fake_run(*args, **kwargs):  # what the workers would do: write their metric files there
        folder = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        (folder / "counter_2.db").write_bytes(b"x")
        seen["dir"] = folder
        raise KeyboardInterrupt  # even an interrupted server cleans up

    from service.serving import supervisor

    monkeypatch.setattr(uvicorn, "run", fake_run)  # --shared-socket, or not Linux
    monkeypatch.setattr(supervisor.Supervisor, "run", fake_run)  # a socket per worker
    with pytest.raises(KeyboardInterrupt):
        cli.main(["serve", "--workers", "2", "--host", "127.0.0.1"])
    assert seen["dir"].parent == tmp_path and not seen["dir"].exists()
    assert not stale.exists() and live.exists()
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
