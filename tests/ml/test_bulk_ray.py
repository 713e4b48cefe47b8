"""ner bulk --engine ray: on a local Ray, and on a two-node cluster (ray.cluster_utils.Cluster, on this
machine) that loses a worker node mid-job. Needs ray[data] (pip install .[ray]; CI installs it)."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from ml.bulk.driver import run_job
from ml.bulk.job import BulkJob
from ml.bulk.output import read_rejects, read_rows
from ml.bulk.sources import RejectedRecord
from tests.ml.test_bulk import TEXTS, write_lines, write_parquet

pytestmark = pytest.mark.slow


def corpus(root: Path, copies: int) -> list[str]:
    text = write_lines(root / "a.txt", TEXTS * copies + [""])
    jsonl = write_lines(root / "b.jsonl", [json.dumps({"id": f"b{i}", "text": t}) for i, t in enumerate(TEXTS * copies)] + ["{broken"])
    parquet = write_parquet(root / "c.parquet", {"id": [f"c{i}" for i in range(len(TEXTS) * copies)], "text": TEXTS * copies}, row_group_size=5)
    return [str(text), str(jsonl), str(parquet)]


def local_reference(tmp_path: Path, inputs: list[str], model: Path, shard_size: int) -> list[dict]:
    run_job(BulkJob(tuple(inputs), str(tmp_path / "reference"), str(model), shard_size=shard_size), workers=1, progress=False)
    return read_rows(tmp_path / "reference")


def test_ray_engine_on_a_local_ray_writes_what_the_local_engine_writes(tmp_path, small_model_dir):
    import ray

    inputs = corpus(tmp_path / "in", copies=2)
    job = BulkJob(tuple(inputs), str(tmp_path / "out"), str(small_model_dir), shard_size=5)
    summary = run_job(job, engine="ray", workers=2, progress=False)
    assert not ray.is_initialized()  # the local Ray it started is shut down again
    assert summary["documents"] == 3 * len(TEXTS) * 2 and summary["rejects"] == 2
    assert read_rows(tmp_path / "out") == local_reference(tmp_path, inputs, small_model_dir, 5)
    assert [(r["reason"], r["record"]) for r in read_rejects(tmp_path / "out")] == [("empty_text", 13), ("not_json", 13)]


def test_ray_engine_survives_losing_a_worker_node_mid_job(tmp_path, small_model_dir):
    """Head (no CPU for tasks) and two one-CPU worker nodes; the second is killed once a few shards
    are written. The job still finishes, and its output holds each document exactly once. (Before it,
    on the same cluster, a --strict job.)"""
    import ray
    from ray.cluster_utils import Cluster

    inputs = corpus(tmp_path / "in", copies=20)
    shards = 3 * len(TEXTS) * 20 // 5
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": {
        "health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 3}})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address)
    # first, --strict: an actor's reject comes back as the job's own error, not as a Ray crash to retry
    strict = write_lines(tmp_path / "strict.jsonl", [json.dumps({"text": TEXTS[0]}), "{broken"])
    with pytest.raises(RejectedRecord, match=r"strict.jsonl:2: the line is not JSON"):
        run_job(BulkJob((str(strict),), str(tmp_path / "strict"), str(small_model_dir), strict=True), engine="ray", workers=1, progress=False)
    assert ray.is_initialized()  # a Ray the job did not start is left running
    outcome: dict = {}
    out = tmp_path / "out"

    def job() -> None:
        try:
            outcome["summary"] = run_job(BulkJob(tuple(inputs), str(out), str(small_model_dir), shard_size=5), engine="ray", workers=2, progress=False)
        except BaseException as e:  # noqa: BLE001 (reported by the test below)
            outcome["error"] = e

    try:
        worker = threading.Thread(target=job)
        worker.start()
        deadline = time.monotonic() + 240
        while len(list(out.glob("part-*"))) < 3 and worker.is_alive():
            assert time.monotonic() < deadline, "no shard written within 4 minutes"
            time.sleep(0.05)
        written_at_kill = len(list(out.glob("part-*")))
        cluster.remove_node(nodes[1], allow_graceful=False)
        worker.join(timeout=300)
        assert not worker.is_alive(), "the job did not finish after the node was lost"
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert "error" not in outcome, outcome.get("error")
    assert written_at_kill < shards, "the job ended before the node was killed: make it longer"
    rows = read_rows(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 3 * len(TEXTS) * 20
    assert rows == local_reference(tmp_path, inputs, small_model_dir, 5)
