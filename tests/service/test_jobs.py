"""The learning loop as deployed, on PostgreSQL: corrections through /feedback, POST /admin/retrain
records a job, a separate trainer process (`ner worker`) takes it, is killed mid-job, another
worker takes the job again after the heartbeat went stale, the promotion gate decides, and the
served version changes; a job that does not beat the active model leaves it a candidate."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.store.session import upgrade
from tests.service.conftest import LiveServer, make_settings
from tests.support import wait_until

ROOT = Path(__file__).resolve().parents[2]
ADMIN = {"X-Admin-Key": "b" * 24}
PRODUCTS = ["Zephyr X9", "Nimbus Pro", "Falcon 7", "Orion Max", "Vega S2"]
CONTEXTS = ["Olga bought a {} yesterday .", "Tom sold his {} in Oslo .", "Anna Berg likes the {} .", "the {} is sold out in Lagos .",
            "Chen Wei tested the {} in Paris .", "Maria Lopez wants a {} ."]
PROBE = "Pierre Dubois bought a Falcon 7 in Kyoto ."
# the trainer's settings, shared by the test's Settings and the worker processes' environment
JOB_ENV = {
    "JOB_HEARTBEAT_S": "0.3", "JOB_STALE_S": "2", "WORKER_POLL_S": "0.2", "JOB_MAX_ATTEMPTS": "3",
    "PROMOTE_MIN_GAIN": "0.01", "PROMOTE_MAX_LABEL_DROP": "0.1", "PROMOTE_MIN_LABEL_SUPPORT": "1",
    # the small model learns fast; 1 document in 2 held out so that 30 corrections give a held-out set
    "FINETUNE": json.dumps({"epochs": 30, "lr": 0.01, "holdout_every": 2, "threads": 1}),
}


def start_worker(db_url: str, models_dir: Path, log: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": db_url, "MODELS_DIR": str(models_dir), "TORCH_THREADS": "1", **JOB_ENV}
    return subprocess.Popen([sys.executable, "-m", "service.cli", "worker", *args], cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for(predicate, timeout: float, what: str, log: Path | None = None):
    def worker_log() -> str:
        return f"worker log:\n{log.read_text()[-3000:]}" if log is not None and log.exists() else "(no worker log)"

    return wait_until(predicate, timeout=timeout, what=what, details=worker_log)


def post_corrections(c: httpx.Client) -> int:
    n = 0
    for product in PRODUCTS:
        for context in CONTEXTS:
            text = context.format(product)
            pred = c.post("/tag", json={"text": text}).json()
            start = text.index(product)
            span = {"start": start, "end": start + len(product), "label": "PRODUCT"}
            known = [{k: e[k] for k in ("start", "end", "label")} for e in pred["entities"] if e["end"] <= span["start"] or e["start"] >= span["end"]]
            r = c.post("/feedback", json={"prediction_id": pred["id"], "entities": sorted([*known, span], key=lambda e: e["start"]), "author": "test"})
            assert r.status_code == 201, r.text
            n += 1
    return n


@pytest.mark.postgres
@pytest.mark.slow
def test_retrain_job_survives_a_killed_worker_and_the_gate_promotes(tmp_path, small_model_dir, fresh_pg_url):
    upgrade(fresh_pg_url)
    models_dir = tmp_path / "models"
    settings = make_settings(
        fresh_pg_url, small_model_dir, admin_key=ADMIN["X-Admin-Key"], model_poll_s=0.2, extra_labels=["PRODUCT"], models_dir=models_dir,
        **{k.lower(): json.loads(v) if k == "FINETUNE" else v for k, v in JOB_ENV.items()},
    )
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.post("/admin/retrain", json={}, headers=ADMIN).json()["error"]["code"] == "no_corrections"
        count = post_corrections(c)
        assert c.post("/admin/retrain", json={"finetune": {"epochs": "many"}}, headers=ADMIN).status_code == 422
        assert c.post("/admin/retrain", json={}).status_code == 401

        r = c.post("/admin/retrain", json={}, headers=ADMIN)
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] == "queued" and job["trigger"] == "api" and job["corrections"] == count
        # a second request while it is open answers with the same job
        again = c.post("/admin/retrain", json={}, headers=ADMIN)
        assert again.status_code == 200 and again.json()["id"] == job["id"]

        def get_job():
            return c.get(f"/admin/jobs/{job['id']}", headers=ADMIN).json()

        # the first trainer takes it and dies (SIGKILL: no chance to clean up) mid-job
        log1 = tmp_path / "worker1.log"
        first = start_worker(fresh_pg_url, models_dir, log1)
        try:
            running = wait_for(lambda: (j := get_job())["status"] == "running" and j["heartbeat_at"] and j, 120, "the first worker to take the job", log1)
            assert running["attempts"] == 1
            first_worker = running["worker"]
            wait_for(lambda: get_job()["heartbeat_at"] != running["heartbeat_at"], 30, "a heartbeat", log1)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(30)
        stuck = get_job()
        assert stuck["status"] == "running" and stuck["worker"] == first_worker, "the killed worker's job cannot have finished"

        # a second trainer takes it again once the heartbeat is stale, and finishes it
        log2 = tmp_path / "worker2.log"
        second = start_worker(fresh_pg_url, models_dir, log2)
        try:
            done = wait_for(lambda: (j := get_job())["status"] in ("succeeded", "failed") and j, 300, "the job to finish", log2)
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(60) == 0, log2.read_text()[-3000:]
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2 and done["worker"] != first_worker
        assert done["progress"] == 1.0 and any("taken by worker" in line for line in done["log_tail"])
        decision = done["decision"]
        assert decision["promote"] is True, decision
        assert decision["checks"]["heldout_gain"] > 0.01 and "time_gain" in decision["checks"]
        # the trainer's own output carries the job's progress lines (docker compose logs trainer)
        assert re.search(rf"service\.training\.trainer: job {job['id']}: epoch 30/30: loss", log2.read_text()), log2.read_text()[-2000:]
        # the gain curve: one point per succeeded job up to this one
        assert [p["job_id"] for p in done["curve"]] == [job["id"]] and done["curve"][0]["heldout_gain"] > 0.01
        assert done["curve"][0]["corrections"] == count and done["metrics"]["time"]["documents"] == 3
        metrics = done["metrics"]
        assert metrics["heldout_f1_after"] > metrics["heldout_f1_before"] + 0.01
        assert metrics["model"]["version"] == "1.1.0"

        # the gate activated it; the API follows within MODEL_POLL_S
        wait_for(lambda: c.get("/model").json()["version"] == "1.1.0", 30, "the API to serve 1.1.0")
        served = c.get("/model").json()
        assert "PRODUCT" in served["labels"]
        assert served["lineage"]["base_model"] == "small 1.0.0" and served["lineage"]["job_id"] == job["id"]
        assert served["metrics"]["heldout"]["after"]["f1"] == metrics["heldout_f1_after"]
        entities = [(e["text"], e["label"]) for e in c.post("/tag", json={"text": PROBE, "store": False}).json()["entities"]]
        assert ("Falcon 7", "PRODUCT") in entities and ("Pierre Dubois", "PER") in entities
        versions = {m["version"]: m for m in c.get("/admin/models", headers=ADMIN).json()}
        assert versions["1.1.0"]["active"] and versions["1.1.0"]["promotion"]["promote"] is True
        # GET /admin/models shows every held-out measure of a version and what the gate checked
        shown = versions["1.1.0"]["metrics"]
        assert shown["time"]["documents"] == 3 and "mentions" in shown["heldout"]["unseen"] and "probe" in shown
        assert versions["1.1.0"]["promotion"]["checks"]["heldout_gain"] == decision["checks"]["heldout_gain"]
        assert versions["1.0.0"]["promotion"] is None  # registered by hand (NER_MODEL), not by a job

        # a job that cannot beat the active model: a learning rate too small to change anything
        r = c.post("/admin/retrain", json={"finetune": {"epochs": 1, "lr": 1e-9}}, headers=ADMIN)
        assert r.status_code == 202
        out = subprocess.run(
            [sys.executable, "-m", "service.cli", "worker", "--once"], cwd=ROOT, capture_output=True, text=True, timeout=300,
            env={**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": fresh_pg_url, "MODELS_DIR": str(models_dir), **JOB_ENV},
        )
        assert out.returncode == 0, out.stderr[-3000:]
        second_job = c.get(f"/admin/jobs/{r.json()['id']}", headers=ADMIN).json()
        assert second_job["status"] == "succeeded" and second_job["decision"]["promote"] is False
        assert "below the required" in second_job["decision"]["reason"]
        assert [p["job_id"] for p in second_job["curve"]] == [job["id"], second_job["id"]] and second_job["curve"][1]["promoted"] is False
        assert f"job {second_job['id']}: kept as a candidate" in out.stdout
        versions = {m["version"]: m for m in c.get("/admin/models", headers=ADMIN).json()}
        assert not versions["1.2.0"]["active"] and "below the required" in versions["1.2.0"]["promotion"]["reason"]
        assert c.get("/model").json()["version"] == "1.1.0"

        # the job metrics, from the database
        exposition = c.get("/metrics").text
        assert re.search(r"^ner_training_jobs_started_total 3\.0$", exposition, re.M), exposition
        assert re.search(r"^ner_training_jobs_succeeded_total 2\.0$", exposition, re.M)
        assert re.search(r"^ner_training_jobs_failed_total 0\.0$", exposition, re.M)
        assert re.search(r"^ner_training_job_duration_seconds_count 2\.0$", exposition, re.M)
        assert re.search(r'^ner_model_heldout_f1\{name="small",version="1\.1\.0"\} [01]\.\d+', exposition, re.M)
        assert re.search(r"^ner_corrections_not_trained 0\.0$", exposition, re.M)
