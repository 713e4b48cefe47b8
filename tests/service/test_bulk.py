"""ner bulk against the service: the same entities as POST /tag, and --store into the annotation queue."""
from __future__ import annotations

import json

import pytest

from ml.bulk.driver import run_job
from ml.bulk.job import BulkJob
from ml.bulk.output import read_rows
from tests.service.conftest import make_settings, running_app

TEXTS = [
    "Anna Berg visited Paris .",
    "Globex hired Tom yesterday . Olga works for Initech in Oslo .",
    "  Chen Wei and Maria Lopez met .\tthe office of Red Cross is in Lagos .  ",
    "Pierre Dubois — of Acme Corp — flew from Kyoto to Buenos Aires, then to New York.",
    "nothing happened today .",
    "Tom visited Lagos . " * 40,
    "Xqzt Vlorp Mmnn Wkkz .",
]


def test_bulk_rows_have_the_entities_post_tag_answers(tmp_path, client, small_model_dir):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)), encoding="utf-8")
    for workers, out in ((1, "one"), (2, "two")):
        run_job(BulkJob((str(path),), str(tmp_path / out), str(small_model_dir), shard_size=3, batch_size=2), workers=workers, progress=False)
    served = client.post("/tag", json={"texts": TEXTS, "store": False})
    assert served.status_code == 200, served.text
    results = served.json()["results"]
    for out in ("one", "two"):
        rows = read_rows(tmp_path / out)
        assert [r["id"] for r in rows] == [f"t{i}" for i in range(len(TEXTS))]
        for row, result in zip(rows, results, strict=True):
            exact = [{k: v for k, v in e.items() if k != "score"} for e in row["entities"]]
            assert exact == [{k: v for k, v in e.items() if k != "score"} for e in result["entities"]]
            assert [e["score"] for e in row["entities"]] == pytest.approx([e["score"] for e in result["entities"]], abs=2e-6)
            assert (row["model_name"], row["model_version"]) == (result["model"]["name"], result["model"]["version"])
    assert sum(len(r["entities"]) for r in results) > 10


@pytest.mark.postgres
def test_store_puts_the_documents_in_the_annotation_queue_once(tmp_path, fresh_pg_url, small_model_dir, capsys):
    from service.cli import main
    from service.store.session import upgrade

    upgrade(fresh_pg_url)
    path = tmp_path / "in.txt"
    path.write_text("".join(t.strip() + "\n" for t in TEXTS), encoding="utf-8")
    argv = ["bulk", str(path), "--out", str(tmp_path / "out"), "--model", str(small_model_dir), "--shard-size", "3", "--workers", "1",
            "--quiet", "--store", "--database-url", fresh_pg_url]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["stored"] == len(TEXTS) and first["already_stored"] == 0
    assert main(argv) == 0  # run again: nothing is stored twice
    second = json.loads(capsys.readouterr().out)
    assert second["stored"] == 0 and second["already_stored"] == len(TEXTS)
    rows = {r["id"]: r for r in read_rows(tmp_path / "out")}
    with running_app(make_settings(fresh_pg_url, small_model_dir)) as c:
        queue = c.get("/annotations/queue", params={"limit": 500}).json()
    assert sorted(item["text"] for item in queue) == sorted(t.strip() for t in TEXTS)
    scores = [item["min_score"] for item in queue]
    assert scores == sorted(scores)
    by_text = {item["text"]: item for item in queue}
    for number, text in enumerate(TEXTS, 1):
        row = rows[f"{path}:{number}"]
        assert by_text[text.strip()]["min_score"] == pytest.approx(row["min_score"])
        assert by_text[text.strip()]["entities"] == row["entities"]


def test_store_refuses_a_database_without_the_schema_before_tagging(tmp_path, small_model_dir, sqlite_url, capsys):
    from service.cli import main

    path = tmp_path / "in.txt"
    path.write_text("Anna Berg visited Paris .\n", encoding="utf-8")
    code = main(["bulk", str(path), "--out", str(tmp_path / "out"), "--model", str(small_model_dir), "--store", "--database-url", sqlite_url])
    assert code == 2 and "schema" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_store_refuses_an_entity_filter(tmp_path, small_model_dir, sqlite_url, capsys):
    from service.cli import main

    path = tmp_path / "in.txt"
    path.write_text("Anna Berg visited Paris .\n", encoding="utf-8")
    code = main(["bulk", str(path), "--out", str(tmp_path / "out"), "--model", str(small_model_dir), "--store", "--min-score", "0.5", "--database-url", sqlite_url])
    assert code == 2 and "--store records every entity" in capsys.readouterr().err
