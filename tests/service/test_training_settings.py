"""The trainer's settings and helpers: TRAIN_THREADS, BASE_CORPUS, the gate policy from the
settings, progress lines echoed to the trainer's own log, and a job's gain curve."""
from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from service.store.session import make_engine, make_sessionmaker, upgrade
from service.training.retrain import JobError, JobSettings, LogTail, gain_curve, read_base_corpus
from tests.service.conftest import make_settings


def test_train_threads_default_to_every_core_and_refuse_a_negative_count(sqlite_url, small_model_dir):
    assert JobSettings.from_settings(make_settings(sqlite_url, small_model_dir)).threads == (os.cpu_count() or 1)
    assert JobSettings.from_settings(make_settings(sqlite_url, small_model_dir, train_threads=3)).threads == 3
    with pytest.raises(ValidationError, match="TRAIN_THREADS"):
        make_settings(sqlite_url, small_model_dir, train_threads=-1)


def test_gate_policy_comes_from_the_promote_settings(sqlite_url, small_model_dir):
    gate = JobSettings.from_settings(make_settings(sqlite_url, small_model_dir, promote_min_probe_agreement=0.8, promote_max_dev_drop=0.01,
                                                   promote_min_unseen_gain=0.02, promote_max_time_drop=0.0)).gate
    assert (gate.min_probe_agreement, gate.max_dev_drop, gate.min_unseen_gain, gate.max_time_drop) == (0.8, 0.01, 0.02, 0.0)


def test_base_corpus_is_read_when_set_and_a_folder_without_it_is_named(tmp_path, sqlite_url, small_model_dir):
    assert JobSettings.from_settings(make_settings(sqlite_url, small_model_dir)).base_corpus is None
    assert read_base_corpus(None) is None
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.txt").write_text("Olga NNP B-NP B-PER\nvisited VBD B-VP O\nOslo NNP B-NP B-LOC\n")
    with pytest.raises(JobError, match=r"lacks dev\.txt"):
        read_base_corpus(folder)
    (folder / "dev.txt").write_text("Tom NNP B-NP B-PER\n")
    train, dev = read_base_corpus(folder)
    assert [s.tokens for s in train] == [["Olga", "visited", "Oslo"]] and len(dev) == 1


def test_progress_lines_go_to_the_job_row_and_to_the_trainers_log():
    echoed: list[str] = []
    tail = LogTail("earlier line", echo=echoed.append)
    tail(0.5, "epoch 1/3: loss 2.000")
    assert echoed == ["epoch 1/3: loss 2.000"]
    assert tail.text().splitlines()[0] == "earlier line" and tail.text().endswith("epoch 1/3: loss 2.000") and tail.progress == 0.5


def test_gain_curve_has_one_point_per_succeeded_job_up_to_this_one(sqlite_url):
    from service.store import training_jobs as jobs_repo

    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        with make_sessionmaker(engine)() as session:
            jobs: list = []
            for corrections, before, after, status in ((10, 0.60, 0.62, jobs_repo.SUCCEEDED), (25, 0.60, 0.66, jobs_repo.FAILED),
                                                       (50, 0.60, 0.70, jobs_repo.SUCCEEDED), (100, 0.60, 0.75, jobs_repo.SUCCEEDED)):
                job = jobs_repo.create_job(session, trigger="api", params={}, base_model_id=None)
                job.status = status
                job.metrics = {"corrections": corrections, "model": {"version": f"1.{len(jobs) + 1}.0"},
                               "heldout": {"before": {"f1": before}, "after": {"f1": after},
                                           "unseen": {"mentions": 30, "before": {"f1": 0.5}, "after": {"f1": 0.5 + after - before - 0.01}}},
                               "probe": {"agreement": 0.95}}
                job.decision = {"promote": corrections == 50}
                session.commit()
                jobs.append(job)
            curve = gain_curve(session, jobs[2])
            assert [p["corrections"] for p in curve] == [10, 50], "failed jobs and later jobs are not on it"
            assert curve[1] == {"job_id": jobs[2].id, "corrections": 50, "version": "1.3.0", "heldout_gain": 0.1, "unseen_gain": 0.09,
                                "time_gain": None, "probe_agreement": 0.95, "promoted": True}
            assert len(gain_curve(session, jobs[3])) == 3
    finally:
        engine.dispose()


def test_a_full_retrain_job_needs_the_base_corpus(sqlite_url, small_model_dir, tmp_path):
    from tests.service.conftest import running_app

    admin = {"X-Admin-Key": "c" * 24}
    with running_app(make_settings(sqlite_url, small_model_dir, admin_key=admin["X-Admin-Key"])) as c:
        r = c.post("/admin/retrain", json={"method": "retrain"}, headers=admin)
        assert r.status_code == 422 and "BASE_CORPUS" in r.json()["error"]["message"]
        assert c.post("/admin/retrain", json={"method": "distil"}, headers=admin).status_code == 422
    with running_app(make_settings(sqlite_url, small_model_dir, admin_key=admin["X-Admin-Key"], base_corpus=str(tmp_path)), migrate=False) as c:
        assert c.post("/feedback", json={"text": "Olga visited Kyoto .", "entities": [{"start": 13, "end": 18, "label": "LOC"}]}).status_code == 201
        r = c.post("/admin/retrain", json={"method": "retrain"}, headers=admin)
        assert r.status_code == 202 and r.json()["params"] == {"method": "retrain"}
