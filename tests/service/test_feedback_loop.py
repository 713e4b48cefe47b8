"""The feedback loop end to end: corrections through /feedback, retraining from the database,
activating the new version without a restart while requests keep flowing, and rolling back."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from ml.data.conll import write_conll
from service.store.session import upgrade
from tests.conftest import SMALL_MODEL
from tests.service.conftest import LiveServer, make_settings
from tests.support import wait_until
from tests.synthetic import synthetic_corpus

ROOT = Path(__file__).resolve().parents[2]
ADMIN = {"X-Admin-Key": "a" * 24}
# a new pattern: product names, a label the base model does not have (allowed by EXTRA_LABELS)
PRODUCTS = ["Zephyr X9", "Nimbus Pro", "Falcon 7", "Orion Max"]
CONTEXTS = ["Olga bought a {} yesterday .", "Tom sold his {} in Oslo .", "Anna Berg likes the {} .", "the {} is sold out in Lagos ."]
PROBE = "Chen Wei bought a Zephyr X9 in Kyoto ."


def product_entity(text: str, product: str) -> dict:
    start = text.index(product)
    return {"start": start, "end": start + len(product), "label": "PRODUCT"}


def _write_config(path: Path) -> Path:
    model = "\n".join(f"{k} = {json.dumps(v)}" for k, v in SMALL_MODEL["model"].items())
    train = "\n".join(f"{k} = {json.dumps(v)}" for k, v in {**SMALL_MODEL["train"], "feedback_weight": 4}.items())
    path.write_text(f"[model]\n{model}\n[train]\n{train}\n")
    return path


@pytest.mark.slow
def test_corrections_retrain_activate_and_roll_back(tmp_path, small_model_dir):
    db_url = f"sqlite:///{tmp_path / 'loop.db'}"
    upgrade(db_url)
    settings = make_settings(db_url, small_model_dir, admin_key=ADMIN["X-Admin-Key"], models_dir=tmp_path, model_poll_s=0.5, extra_labels=["PRODUCT"])
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        before = c.post("/tag", json={"text": PROBE, "store": False}).json()
        assert before["model"]["version"] == "1.0.0"
        # the base model has no PRODUCT label: it misses the pattern or calls it something else
        assert ("Zephyr X9", "PRODUCT") not in [(e["text"], e["label"]) for e in before["entities"]]
        assert "PRODUCT" not in c.get("/model").json()["labels"]

        # annotators correct the predictions on texts with the new pattern
        for product in PRODUCTS:
            for context in CONTEXTS:
                text = context.format(product)
                pred = c.post("/tag", json={"text": text}).json()
                span = product_entity(text, product)
                known = [e for e in pred["entities"] if e["end"] <= span["start"] or e["start"] >= span["end"]]
                entities = sorted([*known, span], key=lambda e: e["start"])
                r = c.post("/feedback", json={"prediction_id": pred["id"], "entities": [{k: e[k] for k in ("start", "end", "label")} for e in entities], "author": "test"})
                assert r.status_code == 201, r.text

        # retrain from the database: the base corpus plus the stored corrections
        data = tmp_path / "data"
        data.mkdir()
        with open(data / "train.txt", "w") as f:
            write_conll(synthetic_corpus(80, seed=0), f)
        with open(data / "dev.txt", "w") as f:
            write_conll(synthetic_corpus(80, seed=0), f)
        out = subprocess.run(
            [sys.executable, "-m", "service.cli", "train", "--config", str(_write_config(tmp_path / "small.toml")), "--data", str(data),
             "--annotations-from", db_url, "--out", str(tmp_path / "v2"), "--name", "small", "--version", "1.1.0",
             "--base-model", "small 1.0.0", "--quiet"],
            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert "training with 16 stored corrections" in out.stderr
        lineage = json.loads((tmp_path / "v2" / "meta.json").read_text())["lineage"]
        assert lineage["corrections"] == 16 and lineage["feedback_weight"] == 4 and lineage["base_model"] == "small 1.0.0"
        assert lineage["feedback_fingerprint"] and lineage["train_fingerprint"]

        # a bad folder is refused and the old model keeps serving
        r = c.post("/admin/models", json={"path": str(tmp_path / "nowhere")}, headers=ADMIN)
        assert r.status_code == 422 and "still serving" in r.json()["error"]["message"]
        assert c.post("/admin/models", json={"path": str(tmp_path / "v2")}).status_code == 401

        # switch while requests are in flight: none fails
        statuses, versions, stop = [], [], threading.Event()

        def hammer():
            with httpx.Client(base_url=server.url, timeout=30) as h:
                while not stop.is_set():
                    r = h.post("/tag", json={"text": PROBE, "store": False})
                    statuses.append(r.status_code)
                    versions.append(r.json().get("model", {}).get("version"))

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        r = c.post("/admin/models", json={"path": str(tmp_path / "v2")}, headers=ADMIN)
        assert r.status_code == 201, r.text
        new_id = r.json()["id"]
        after = c.post("/tag", json={"text": PROBE, "store": False}).json()
        stop.set()
        for t in threads:
            t.join()
        assert statuses and set(statuses) == {200}
        assert "1.1.0" in versions

        assert after["model"] == {"name": "small", "version": "1.1.0"}
        print(f"\nbefore (1.0.0): {[(e['text'], e['label']) for e in before['entities']]}\nafter  (1.1.0): {[(e['text'], e['label']) for e in after['entities']]}")
        assert ("Zephyr X9", "PRODUCT") in [(e["text"], e["label"]) for e in after["entities"]]
        assert ("Chen Wei", "PER") in [(e["text"], e["label"]) for e in after["entities"]]
        assert c.get("/model").json()["version"] == "1.1.0" and "PRODUCT" in c.get("/model").json()["labels"]
        assert 'ner_model_info{name="small",version="1.1.0"} 1.0' in c.get("/metrics").text

        # rolling back is the same operation
        models = c.get("/admin/models", headers=ADMIN).json()
        assert [m["version"] for m in models if m["active"]] == ["1.1.0"]
        old_id = next(m["id"] for m in models if m["version"] == "1.0.0")
        assert old_id != new_id
        r = c.post(f"/admin/models/{old_id}/activate", headers=ADMIN)
        assert r.status_code == 200 and r.json()["active"] is True
        assert c.post("/tag", json={"text": PROBE, "store": False}).json()["model"]["version"] == "1.0.0"


def test_workers_follow_the_version_activated_in_the_database(tmp_path, small_model_dir):
    """Another worker (here: a direct database update) activates a version; this one follows."""
    import shutil

    from service.store import repositories
    from service.store.session import make_engine, make_sessionmaker

    db_url = f"sqlite:///{tmp_path / 'follow.db'}"
    upgrade(db_url)
    v2 = tmp_path / "v2"
    shutil.copytree(small_model_dir, v2)
    meta = json.loads((v2 / "meta.json").read_text())
    meta["version"] = "1.0.1"
    (v2 / "meta.json").write_text(json.dumps(meta))
    with LiveServer(make_settings(db_url, small_model_dir, model_poll_s=0.2)) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/model").json()["version"] == "1.0.0"
        engine = make_engine(db_url)
        with make_sessionmaker(engine)() as session:
            row = repositories.register_model(session, name="small", version="1.0.1", path=str(v2), metrics={}, lineage={})
            repositories.activate_model(session, model_id=row.id)
        engine.dispose()
        wait_until(lambda: c.get("/model").json()["version"] == "1.0.1", timeout=20, what="the worker following the database's active version", interval=0.1)
