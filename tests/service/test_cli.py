"""The `ner` command as users run it: `ner db`, and `ner serve` with several workers whose metrics
are aggregated (Prometheus multiprocess mode)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from tests.service.conftest import make_settings, running_app
from tests.support import free_port, serve_env, start_serve, stop_serve, wait_ready

ROOT = Path(__file__).resolve().parents[2]


def ner(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env, **kwargs)


def test_db_commands_and_refusal_of_an_unmigrated_database(tmp_path):
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    out = ner("db", "current", env=env)
    assert out.returncode == 0 and "database revision: None" in out.stdout
    out = ner("db", "upgrade", env=env)
    assert out.returncode == 0 and re.search(r"database revision: (\w+) \(code: \1\)", out.stdout)
    out = ner("db", "downgrade", "base", env=env)
    assert out.returncode == 0 and "database revision: None" in out.stdout


def test_serve_with_two_workers_aggregates_metrics(tmp_path, small_model_dir):
    env = serve_env(DATABASE_URL=f"sqlite:///{tmp_path / 's.db'}", NER_MODEL=str(small_model_dir))
    assert ner("db", "upgrade", env=env).returncode == 0
    port = free_port()
    server = start_serve(env, port)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, server)
        with httpx.Client(base_url=base, timeout=30) as c:
            for i in range(30):
                assert c.post("/tag", json={"text": f"Tom visited Oslo . {i}"}, headers={"Connection": "close"}).status_code == 200
            totals = set()
            pids = set()
            for _ in range(6):
                text = c.get("/metrics", headers={"Connection": "close"}).text
                m = re.search(r'^ner_http_requests_total\{method="POST",route="/tag",status="200"\} ([0-9.]+)$', text, re.M)
                assert m, text[:2000]
                totals.add(float(m.group(1)))
                pids |= set(re.findall(r'ner_model_info\{name="small",pid="(\d+)",version="1.0.0"\} 1.0', text))
        # whichever worker answers /metrics, it reports the sum over both workers
        assert totals == {30.0}
        assert len(pids) == 2, "both workers should report the model they serve"
    finally:
        stop_serve(server)


def test_finetune_from_the_database(tmp_path, small_model_dir):
    from service.store import repositories
    from service.store.session import make_engine, make_sessionmaker, upgrade

    url = f"sqlite:///{tmp_path / 'c.db'}"
    upgrade(url)
    engine = make_engine(url)
    with make_sessionmaker(engine)() as session:
        for product in ("Zephyr X9", "Nimbus Pro", "Falcon 7"):
            for context in ("Olga bought a {} .", "Tom sold his {} in Oslo ."):
                text = context.format(product)
                start = text.index(product)
                repositories.create_annotation(session, text=text, entities=[{"start": start, "end": start + len(product), "label": "PRODUCT"}], author="t", source="text")
    engine.dispose()
    assert ner("finetune", "--from-model", str(small_model_dir), "--version", "1.1.0").returncode == 2  # no corrections given
    out = ner("finetune", "--from-model", str(small_model_dir), "--annotations-from", url, "--version", "1.1.0", "--out", str(tmp_path / "v2"),
              "--set", "epochs=2", "--set", "holdout_every=0", "--quiet")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fine-tuning on 6 stored corrections" in out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    lineage = json.loads((tmp_path / "v2" / "meta.json").read_text())["lineage"]
    assert lineage["corrections"] == lineage["train_documents"] == 6 and summary["heldout_documents"] == 0
    assert lineage["annotations_from"].startswith("sqlite:///") and lineage["new_labels"] == ["PRODUCT"]
    bad = ner("finetune", "--from-model", str(small_model_dir), "--annotations-from", url, "--version", "1.1.0", "--set", "epochs=many")
    assert bad.returncode == 2 and "epochs" in bad.stderr


def test_serve_refuses_a_device_it_cannot_use_before_starting(tmp_path):
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'd.db'}"}
    out = ner("serve", "--device", "gpu", "--port", str(free_port()), env=env, timeout=60)
    assert out.returncode == 2 and "DEVICE must be cpu, cuda or cuda:N, not 'gpu'" in out.stderr
    if not torch.cuda.is_available():
        out = ner("serve", "--device", "cuda", "--workers", "2", "--port", str(free_port()), env=env, timeout=60)
        assert out.returncode == 2 and out.stderr.startswith("error: device 'cuda': CUDA is not available"), out.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_serve_on_cuda_tags_as_on_the_cpu(tmp_path, small_model_dir):
    """The service with DEVICE=cuda (the scripted model on the GPU) answers what the CPU path answers."""
    texts = ["Tom visited Oslo .", "Ann met Bob in Paris on Monday .", "Initech hired Ann ."]
    answers = {}
    for device in ("cpu", "cuda"):
        settings = make_settings(f"sqlite:///{tmp_path / f'{device}.db'}", small_model_dir, device=device)
        with running_app(settings) as client:
            r = client.post("/tag", json={"texts": texts})
            assert r.status_code == 200
            answers[device] = r.json()["results"]
    for cpu, gpu in zip(answers["cpu"], answers["cuda"], strict=True):
        assert [(e["start"], e["end"], e["label"]) for e in cpu["entities"]] == [(e["start"], e["end"], e["label"]) for e in gpu["entities"]]
        assert all(abs(a["score"] - b["score"]) < 1e-4 for a, b in zip(cpu["entities"], gpu["entities"], strict=True))


def test_serve_hands_its_settings_to_the_app_without_the_environment(monkeypatch, tmp_path):
    import pickle

    import uvicorn

    from service import cli

    monkeypatch.delenv("BIND_HOST", raising=False)
    monkeypatch.delenv("DEVICE", raising=False)
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'd.db'}")
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **config: seen.update(app=app, config=config))
    assert cli.main(["serve", "--host", "localhost", "--device", "cpu", "--port", "8123"]) == 0
    app = pickle.loads(pickle.dumps(seen["app"]))  # what a spawned worker process receives
    assert (app.settings.bind_host, app.settings.device, app.settings.database_url) == ("localhost", "cpu", f"sqlite:///{tmp_path / 'd.db'}")
    assert seen["config"]["port"] == 8123 and seen["config"]["factory"] is True
    assert "BIND_HOST" not in os.environ and "DEVICE" not in os.environ


def test_the_service_extends_ml_commands_through_the_hook():
    from ml.cli import build_commands
    from service.cli import parser

    with pytest.raises(KeyError, match="no subcommand 'serve'; there are: train, "):
        build_commands().command("serve")
    args = parser().parse_args(["train", "--annotations-from", "sqlite:///x.db", "--data", "d"])
    assert args.annotations_from == "sqlite:///x.db" and args.func.__name__ == "cmd_train_with_annotations"
    assert parser().parse_args(["worker", "--once"]).once is True
