"""Data: one accepted correction per text (a partial unique index, concurrent requests on
PostgreSQL), same new text -> same document, erasure, retention and purge, idempotency-key rules,
409 for a refused write, SQLite durability, path ids."""
from __future__ import annotations

import datetime as dt
import json
import threading
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.service.conftest import LiveServer, make_settings, running_app

ADMIN = {"X-Admin-Key": "a" * 24}


def _rows(url: str, sql: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]
    finally:
        engine.dispose()


def _exported(client) -> list[dict]:
    return [json.loads(line) for line in client.get("/annotations").text.splitlines()]


@pytest.mark.postgres
def test_concurrent_corrections_leave_exactly_one_accepted(pg_server_url, small_model_dir):
    from service.store.session import upgrade

    upgrade(pg_server_url)
    marker = "Concurrency Zed"
    with LiveServer(make_settings(pg_server_url, small_model_dir)) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        pred = c.post("/tag", json={"text": f"{marker} went to Oslo ."}).json()
        new_text = f"{marker} met Anna in Rome ."
        barrier = threading.Barrier(16)
        statuses: list[int] = []

        def correct(i: int) -> None:
            with httpx.Client(base_url=server.url, timeout=60) as own:
                barrier.wait()
                if i % 2:
                    r = own.post("/feedback", json={"prediction_id": pred["id"], "entities": [], "author": f"a{i}"})
                else:
                    r = own.post("/feedback", json={"text": new_text, "entities": [], "author": f"a{i}"})
                statuses.append(r.status_code)

        threads = [threading.Thread(target=correct, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert statuses.count(201) == 16, statuses
        exported = [a for a in _exported(c) if marker in a["text"]]
    assert sorted(a["text"] for a in exported) == sorted([f"{marker} went to Oslo .", new_text])
    accepted = _rows(pg_server_url, f"SELECT a.document_id FROM annotations a JOIN documents d ON d.id = a.document_id WHERE a.status = 'accepted' AND d.text LIKE '{marker}%'")
    assert len(accepted) == 2
    # the eight new-text corrections all landed on one document
    docs = _rows(pg_server_url, f"SELECT DISTINCT a.document_id FROM annotations a JOIN documents d ON d.id = a.document_id WHERE d.text = '{new_text}'")
    assert len(docs) == 1


@pytest.mark.postgres
def test_the_database_refuses_a_second_accepted_correction(pg_server_url):
    from sqlalchemy.exc import IntegrityError

    from service.store.session import upgrade

    upgrade(pg_server_url)
    engine = create_engine(pg_server_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO documents (id, text, text_sha256, length, created_at) VALUES ('00000000-0000-0000-0000-0000000000aa', 'x', 'idx-test', 1, now())"))
            insert = "INSERT INTO annotations (document_id, entities, text_sha256, source, status, created_at) VALUES ('00000000-0000-0000-0000-0000000000aa', '[]', 'idx-test', 'text', :status, now())"
            conn.execute(text(insert), {"status": "accepted"})
            conn.execute(text(insert), {"status": "superseded"})  # any number of superseded ones
        with pytest.raises(IntegrityError, match="uq_annotations_accepted_text"), engine.begin() as conn:
            conn.execute(text(insert), {"status": "accepted"})
    finally:
        engine.dispose()


def test_same_new_text_twice_is_one_document_and_the_later_wins(client):
    first = client.post("/feedback", json={"text": "Tom visited Oslo .", "entities": []}).json()
    second = client.post("/feedback", json={"text": "Tom visited Oslo .", "entities": [{"start": 0, "end": 3, "label": "PER"}]}).json()
    assert first["document_id"] == second["document_id"]
    exported = [a for a in _exported(client) if a["text"] == "Tom visited Oslo ."]
    assert [a["entities"] for a in exported] == [[{"start": 0, "end": 3, "label": "PER"}]]
    # a correction of a prediction of the same text supersedes it too
    pred = client.post("/tag", json={"text": "Tom visited Oslo ."}).json()
    client.post("/feedback", json={"prediction_id": pred["id"], "entities": []})
    assert [a["entities"] for a in _exported(client) if a["text"] == "Tom visited Oslo ."] == [[]]


def test_empty_idempotency_key_is_refused_with_the_reason(client):
    for key in ("", "   "):
        r = client.post("/feedback", json={"text": "Tom left .", "entities": []}, headers={"Idempotency-Key": key})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_idempotency_key"
        assert "empty" in r.json()["error"]["message"]


def test_a_refused_write_that_is_not_a_replay_answers_409(sqlite_url, small_model_dir):
    with running_app(make_settings(sqlite_url, small_model_dir)) as c:
        engine = create_engine(sqlite_url)
        with engine.begin() as conn:  # a constraint of the database refuses this author's corrections
            conn.execute(text("CREATE TRIGGER refuse BEFORE INSERT ON annotations WHEN NEW.author = 'refused' BEGIN SELECT RAISE(ABORT, 'refused by a constraint'); END"))
        engine.dispose()
        r = c.post("/feedback", json={"text": "Tom left .", "entities": [], "author": "refused"}, headers={"Idempotency-Key": "k-409"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
        assert "not stored" in r.json()["error"]["message"]
        assert c.post("/feedback", json={"text": "Tom left .", "entities": []}).status_code == 201


def test_delete_document_erases_the_text_everywhere(sqlite_url, small_model_dir):
    secret = "Ottoline Brackenbury visited Quarrington ."
    with running_app(make_settings(sqlite_url, small_model_dir, admin_key=ADMIN["X-Admin-Key"])) as c:
        preds = [c.post("/tag", json={"text": secret}).json() for _ in range(2)]
        stored = c.post("/feedback", json={"prediction_id": preds[0]["id"], "entities": [{"start": 0, "end": 8, "label": "PER"}]}).json()
        c.post("/tag", json={"text": "Tom stays ."})
        assert any(a["text"] == secret for a in _exported(c))
        assert c.delete(f"/documents/{stored['document_id']}").status_code == 401
        r = c.delete(f"/documents/{stored['document_id']}", headers=ADMIN)
        assert r.status_code == 200 and r.json()["deleted"] == {"documents": 2, "predictions": 2, "annotations": 1, "idempotency_keys": 0}
        assert c.delete(f"/documents/{stored['document_id']}", headers=ADMIN).status_code == 404
        assert not any(a["text"] == secret for a in _exported(c))
        assert all(q["text"] != secret for q in c.get("/annotations/queue?limit=500").json())
        assert c.get("/annotations", params={"format": "conll"}).text.count("Quarrington") == 0
        r = c.post("/feedback", json={"prediction_id": preds[1]["id"], "entities": []})
        assert r.status_code == 404
    for table in ("documents", "predictions", "annotations"):
        dump = repr(_rows(sqlite_url, f"SELECT * FROM {table}"))
        assert "Ottoline" not in dump and preds[0]["id"].replace("-", "") not in dump.replace("-", ""), table
    assert _rows(sqlite_url, "SELECT count(*) FROM documents WHERE text = 'Tom stays .'") == [(1,)]


def test_purge_applies_retention_and_expires_idempotency_keys(sqlite_url, small_model_dir):
    from service.store.repositories import purge
    from service.store.session import make_engine, make_sessionmaker

    with running_app(make_settings(sqlite_url, small_model_dir, idempotency_ttl_hours=1)) as c:
        c.post("/tag", json={"text": "Old uncorrected text ."})
        corrected = c.post("/tag", json={"text": "Old corrected text ."}).json()
        c.post("/feedback", json={"prediction_id": corrected["id"], "entities": []}, headers={"Idempotency-Key": "key-1"})
        engine = make_engine(sqlite_url)
        later = dt.datetime.now(dt.UTC) + dt.timedelta(days=31)
        with make_sessionmaker(engine)() as session:
            removed = purge(session, retention_days=None, idempotency_ttl=dt.timedelta(hours=1), now=dt.datetime.now(dt.UTC))
            assert removed.as_dict() == {"documents": 0, "predictions": 0, "annotations": 0, "idempotency_keys": 0}
            removed = purge(session, retention_days=30, idempotency_ttl=dt.timedelta(hours=1), now=later)
        engine.dispose()
        assert removed.as_dict() == {"documents": 1, "predictions": 2, "annotations": 0, "idempotency_keys": 1}
        texts = [r[0] for r in _rows(sqlite_url, "SELECT text FROM documents")]
        assert texts == ["Old corrected text ."]  # the correction and its text are training data
        assert [a["text"] for a in _exported(c)] == ["Old corrected text ."]
        # the expired key may be used again, with another body
        r = c.post("/feedback", json={"text": "New text .", "entities": []}, headers={"Idempotency-Key": "key-1"})
        assert r.status_code == 201


def test_idempotency_keys_expire_without_a_purge(sqlite_url, small_model_dir):
    with running_app(make_settings(sqlite_url, small_model_dir, idempotency_ttl_hours=1)) as c:
        assert c.post("/feedback", json={"text": "A b .", "entities": []}, headers={"Idempotency-Key": "k"}).status_code == 201
        assert c.post("/feedback", json={"text": "C d .", "entities": []}, headers={"Idempotency-Key": "k"}).status_code == 422
        engine = create_engine(sqlite_url)
        with engine.begin() as conn:
            conn.execute(text("UPDATE annotations SET created_at = :t"), {"t": dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)})
        engine.dispose()
        assert c.post("/feedback", json={"text": "C d .", "entities": []}, headers={"Idempotency-Key": "k"}).status_code == 201


def test_ner_db_purge_command(sqlite_url, small_model_dir, monkeypatch, capsys):
    from service.cli import main

    with running_app(make_settings(sqlite_url, small_model_dir)) as c:
        c.post("/tag", json={"text": "Tom went home ."})
        c.post("/tag", json={"text": "Anna stays ."})
    engine = create_engine(sqlite_url)
    with engine.begin() as conn:  # one of the two is 40 days old
        old = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)
        for table in ("documents", "predictions"):
            conn.execute(text(f"UPDATE {table} SET created_at = :t WHERE {'text' if table == 'documents' else 'document_id IN (SELECT id FROM documents WHERE text'} = 'Tom went home .'" + ("" if table == "documents" else ")")), {"t": old})
    engine.dispose()
    monkeypatch.setenv("RETENTION_DAYS", "30")
    assert main(["db", "purge", "--database-url", sqlite_url]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["removed"]["predictions"] == 1 and out["removed"]["documents"] == 1
    assert _rows(sqlite_url, "SELECT text FROM documents") == [("Anna stays .",)]


def test_sqlite_commits_are_synchronous_full(sqlite_url):
    from service.store.session import make_engine

    engine = make_engine(sqlite_url)
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
    engine.dispose()
    engine = make_engine(sqlite_url, fsync=False)
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 1  # NORMAL
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"  # NORMAL is only safe in WAL mode
    engine.dispose()


def test_postgres_commits_skip_the_disk_wait_only_on_the_prediction_engine(pg_server_url):
    from service.store.session import make_engine

    for fsync, expected in ((True, "on"), (False, "off")):
        engine = make_engine(pg_server_url, fsync=fsync)
        with engine.connect() as conn:
            assert conn.execute(text("SHOW synchronous_commit")).scalar() == expected
        engine.dispose()


@pytest.mark.parametrize("fsync", [False, True])
def test_only_predictions_may_skip_the_disk_wait_and_stored_means_committed(sqlite_url, small_model_dir, fsync):
    """PREDICTIONS_FSYNC=false (the default): the prediction writer's connections commit without
    fsync; every other write (corrections, deletions, models) keeps synchronous=FULL; either way a
    "stored": true answer is committed, visible to a new connection at once."""
    with running_app(make_settings(sqlite_url, small_model_dir, predictions_fsync=fsync)) as c:
        runtime = c.app.state.runtime
        assert (runtime.writer_engine is runtime.engine) == fsync
        with runtime.writer_engine.connect() as conn:
            assert conn.execute(text("PRAGMA synchronous")).scalar() == (2 if fsync else 1)
        with runtime.engine.connect() as conn:
            assert conn.execute(text("PRAGMA synchronous")).scalar() == 2
        r = c.post("/tag", json={"text": "Tom went home ."})
        assert r.status_code == 200 and r.json()["stored"] is True
        assert _rows(sqlite_url, "SELECT text FROM documents") == [("Tom went home .",)]


@pytest.mark.parametrize("model_id", [2**31, 2**63, 10**30, 0, -1])
def test_out_of_range_model_ids_are_refused_not_500(sqlite_url, small_model_dir, model_id):
    with running_app(make_settings(sqlite_url, small_model_dir, admin_key=ADMIN["X-Admin-Key"])) as c:
        r = c.post(f"/admin/models/{model_id}/activate", headers=ADMIN)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
        assert c.post("/admin/models/999/activate", headers=ADMIN).status_code == 404


def test_export_holds_no_connection_between_pages(sqlite_url, small_model_dir):
    from service.store import repositories
    from service.store.session import make_engine, make_sessionmaker

    with running_app(make_settings(sqlite_url, small_model_dir)) as c:
        for i in range(5):
            assert c.post("/feedback", json={"text": f"Tom number {i} left .", "entities": []}).status_code == 201
    engine = make_engine(sqlite_url)
    try:
        with make_sessionmaker(engine)() as session:
            rows = repositories.iter_annotations(session, batch=2)
            seen = [next(rows).document.text]
            # a reader that stops here holds nothing: no transaction, no checked-out connection
            pool: Any = engine.pool  # a QueuePool for a SQLite file
            assert not session.in_transaction() and pool.checkedout() == 0
            seen += [a.document.text for a in rows]
        assert seen == [f"Tom number {i} left ." for i in range(5)]
    finally:
        engine.dispose()
