"""The HTTP API against the real app, on SQLite and on PostgreSQL."""
from __future__ import annotations

import datetime as dt
import json
import random
import uuid

import pytest

from service.config import Settings
from tests.service.conftest import make_settings, running_app

PEOPLE = ["Anna Berg", "Tom", "Maria Lopez", "Chen Wei", "Olga", "Pierre Dubois"]
PLACES = ["Paris", "New York", "Lagos", "Oslo", "Buenos Aires", "Kyoto"]


@pytest.fixture(params=["sqlite", "postgres"])
def api(request, small_model_dir, sqlite_url):
    if request.param == "sqlite":
        with running_app(make_settings(sqlite_url, small_model_dir)) as c:
            yield c
    else:
        yield request.getfixturevalue("pg_client")


def test_tag_one_text(api):
    text = "Anna Berg visited Paris ."
    r = api.post("/tag", json={"text": text})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["stored"] is True and uuid.UUID(body["id"])
    assert body["model"] == {"name": "small", "version": "1.0.0"}
    assert [(e["text"], e["label"]) for e in body["entities"]] == [("Anna Berg", "PER"), ("Paris", "LOC")]
    for e in body["entities"]:
        assert text[e["start"] : e["end"]] == e["text"] and 0 < e["score"] <= 1
    assert "tokens" not in body


def test_tag_many_texts_with_tokens_and_without_storing(api):
    texts = ["Tom works for Globex in Oslo .", "nothing happened today ."]
    r = api.post("/tag", json={"texts": texts, "include_tokens": True, "store": False})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 2 and all(res["id"] is None and res["stored"] is False for res in results)
    assert {e["label"] for e in results[0]["entities"]} == {"PER", "ORG", "LOC"}
    assert results[1]["entities"] == []
    tokens = results[0]["tokens"]
    assert [t["text"] for t in tokens] == texts[0].split()
    assert [t["tag"] for t in tokens][:3] == ["B-PER", "O", "O"]
    for t in tokens:
        assert texts[0][t["start"] : t["end"]] == t["text"]


def test_offsets_hold_for_odd_whitespace_and_non_ascii(api):
    rng = random.Random(11)
    fillers = [" ", "  ", "\t", "\n", " \n\n ", "\u00a0", "\u3000", " 😀 ", " é ", " مرحبا ", " שלום ", " Zürich ", "\r\n", " naïve café "]
    texts = []
    for _ in range(40):
        parts = []
        for _ in range(rng.randint(1, 4)):
            parts += [rng.choice(PEOPLE), rng.choice(fillers), rng.choice(["visited", "met", "and"]), rng.choice(fillers), rng.choice(PLACES), rng.choice([*fillers, "."])]
        texts.append(rng.choice(["", "  ", "😀", "\n"]) + "".join(parts))
    found = 0
    for lo in range(0, len(texts), 10):
        r = api.post("/tag", json={"texts": texts[lo : lo + 10], "store": False, "include_tokens": True})
        assert r.status_code == 200, r.text
        for text, res in zip(texts[lo : lo + 10], r.json()["results"], strict=True):
            for e in res["entities"]:
                assert text[e["start"] : e["end"]] == e["text"]
                found += 1
            for t in res["tokens"]:
                assert text[t["start"] : t["end"]] == t["text"]
    assert found > 40  # the texts are full of known names: entities were found, offsets checked


def test_long_text_is_split_into_sentences_with_whole_text_offsets(api):
    sentences = [f"{rng_name} visited {place} ." for rng_name, place in zip(PEOPLE * 10, PLACES * 10, strict=True)]
    text = " ".join(sentences)
    r = api.post("/tag", json={"text": text, "store": False})
    assert r.status_code == 200
    entities = r.json()["entities"]
    assert len(entities) >= 100
    for e in entities:
        assert text[e["start"] : e["end"]] == e["text"]


def test_feedback_on_a_prediction_then_export_as_training_data(api):
    text = f"Olga met Tom . {uuid.uuid4().hex}"
    since = dt.datetime.now(dt.UTC).isoformat()
    pred = api.post("/tag", json={"text": text}).json()
    corrected = [{"start": 0, "end": 4, "label": "PER"}, {"start": 9, "end": 12, "label": "ORG"}]
    r = api.post("/feedback", json={"prediction_id": pred["id"], "entities": corrected, "author": "ann"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["prediction_id"] == pred["id"] and body["replayed"] is False
    assert [(e["text"], e["label"]) for e in body["entities"]] == [("Olga", "PER"), ("Tom", "ORG")]

    export = api.get("/annotations", params={"format": "jsonl", "since": since})
    assert export.status_code == 200 and export.headers["content-type"].startswith("application/x-ndjson")
    records = [json.loads(line) for line in export.text.splitlines()]
    mine = [r for r in records if r["text"] == text]
    assert len(mine) == 1 and mine[0]["entities"] == [{"start": 0, "end": 4, "label": "PER"}, {"start": 9, "end": 12, "label": "ORG"}]
    assert mine[0]["meta"]["author"] == "ann"

    conll = api.get("/annotations", params={"format": "conll", "since": since})
    assert conll.status_code == 200
    assert "Olga B-PER\nmet O\nTom B-ORG\n" in conll.text


def test_exports_are_accepted_by_the_trainer_readers(api, tmp_path):
    from ml.data import read_corpus

    text = f"Maria Lopez visited Kyoto . {uuid.uuid4().hex}"
    since = dt.datetime.now(dt.UTC).isoformat()
    r = api.post("/feedback", json={"text": text, "entities": [{"start": 0, "end": 11, "label": "PER"}, {"start": 20, "end": 25, "label": "LOC"}]})
    assert r.status_code == 201, r.text
    for fmt, suffix in (("jsonl", ".jsonl"), ("conll", ".conll")):
        path = tmp_path / f"export{suffix}"
        path.write_text(api.get("/annotations", params={"format": fmt, "since": since}).text)
        sentences = read_corpus(path)
        assert any(s.tokens[:2] == ["Maria", "Lopez"] and [(x.start, x.end, x.label) for x in s.spans] == [(0, 2, "PER"), (3, 4, "LOC")] for s in sentences)


def test_a_second_correction_supersedes_the_first(api):
    text = f"Tom visited Oslo . {uuid.uuid4().hex}"
    since = dt.datetime.now(dt.UTC).isoformat()
    pred = api.post("/tag", json={"text": text}).json()
    first = api.post("/feedback", json={"prediction_id": pred["id"], "entities": [{"start": 0, "end": 3, "label": "PER"}]})
    assert first.status_code == 201, first.text
    second = api.post("/feedback", json={"prediction_id": pred["id"], "entities": [{"start": 0, "end": 3, "label": "PER"}, {"start": 12, "end": 16, "label": "LOC"}]})
    assert second.status_code == 201, second.text
    records = [json.loads(line) for line in api.get("/annotations", params={"since": since}).text.splitlines()]
    assert [len(r["entities"]) for r in records if r["text"] == text] == [2]


def test_idempotency_key_makes_retries_safe(api):
    key = uuid.uuid4().hex
    body = {"text": f"Olga visited Lagos . {key}", "entities": [{"start": 0, "end": 4, "label": "PER"}]}
    first = api.post("/feedback", json=body, headers={"Idempotency-Key": key})
    second = api.post("/feedback", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 201 and second.status_code == 200
    assert second.json() == {**first.json(), "replayed": True}
    other = api.post("/feedback", json={**body, "author": "someone else"}, headers={"Idempotency-Key": key})
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    records = [json.loads(line) for line in api.get("/annotations").text.splitlines()]
    assert sum(r["text"] == body["text"] for r in records) == 1


def test_active_learning_queue_lists_least_confident_uncorrected_texts(api):
    marker = uuid.uuid4().hex
    texts = [f"Anna Berg visited Paris . {marker}", f"Xqzt Vlorp Mmnn {marker} Wkkz ."]
    results = api.post("/tag", json={"texts": texts}).json()["results"]
    queue = api.get("/annotations/queue", params={"limit": 500}).json()
    scores = [item["min_score"] for item in queue]
    assert scores == sorted(scores)
    mine = [item for item in queue if marker in item["text"]]
    assert {item["prediction_id"] for item in mine} == {r["id"] for r in results}
    assert mine[0]["text"] == texts[1]  # gibberish is the less confident one
    api.post("/feedback", json={"prediction_id": mine[0]["prediction_id"], "entities": []})
    queue = api.get("/annotations/queue", params={"limit": 500}).json()
    assert mine[0]["prediction_id"] not in {item["prediction_id"] for item in queue}


def test_model_health_ready_and_metrics(api):
    info = api.get("/model").json()
    assert info["name"] == "small" and info["labels"] == ["LOC", "ORG", "PER"] and info["metrics"]["dev"]["f1"] == 1.0
    assert "history" not in info["metrics"]
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"
    api.post("/tag", json={"text": "Tom visited Oslo ."})
    text = api.get("/metrics").text
    assert 'ner_http_requests_total{method="POST",route="/tag",status="200"}' in text
    assert 'ner_model_info{name="small",version="1.0.0"} 1.0' in text
    assert 'ner_entities_tagged_total{label="PER",source="model"}' in text


BAD_INPUTS = [
    # (description, method, path, request kwargs, status, error code)
    ("empty text", "post", "/tag", {"json": {"text": ""}}, 422, "empty_text"),
    ("whitespace only", "post", "/tag", {"json": {"text": " \n\t "}}, 422, "empty_text"),
    ("1 MB text", "post", "/tag", {"json": {"text": "a" * 1_000_000}}, 413, "too_large"),
    ("text over the character limit", "post", "/tag", {"json": {"text": "ab " * 40_000}}, 413, "text_too_long"),
    ("10,000 texts", "post", "/tag", {"json": {"texts": ["a"] * 10_000}}, 422, "too_many_texts"),
    ("empty texts list", "post", "/tag", {"json": {"texts": []}}, 422, "invalid_request"),
    ("both text and texts", "post", "/tag", {"json": {"text": "a", "texts": ["b"]}}, 422, "invalid_request"),
    ("neither text nor texts", "post", "/tag", {"json": {}}, 422, "invalid_request"),
    ("wrong type", "post", "/tag", {"json": {"text": 42}}, 422, "invalid_request"),
    ("wrong type in list", "post", "/tag", {"json": {"texts": ["a", None]}}, 422, "invalid_request"),
    ("unknown field", "post", "/tag", {"json": {"text": "a", "lang": "en"}}, 422, "invalid_request"),
    ("invalid JSON", "post", "/tag", {"content": b'{"text": "a"', "headers": {"content-type": "application/json"}}, 422, "invalid_json"),
    ("invalid UTF-8", "post", "/tag", {"content": b'{"text": "\xff\xfe"}', "headers": {"content-type": "application/json"}}, 400, "bad_request"),
    ("NUL character", "post", "/tag", {"json": {"text": "Tom\u0000Berg"}}, 422, "invalid_character"),
    ("control character", "post", "/tag", {"json": {"text": "Tom\u001bBerg"}}, 422, "invalid_character"),
    ("lone surrogate", "post", "/tag", {"content": b'{"text": "Tom \\ud800"}', "headers": {"content-type": "application/json"}}, 422, "invalid_character"),
    ("feedback span out of range", "post", "/feedback", {"json": {"text": "Tom left", "entities": [{"start": 4, "end": 99, "label": "PER"}]}}, 422, "span_out_of_range"),
    ("feedback empty span", "post", "/feedback", {"json": {"text": "Tom left", "entities": [{"start": 2, "end": 2, "label": "PER"}]}}, 422, "span_out_of_range"),
    ("feedback overlapping spans", "post", "/feedback", {"json": {"text": "Anna Berg left", "entities": [{"start": 0, "end": 9, "label": "PER"}, {"start": 5, "end": 9, "label": "PER"}]}}, 422, "overlapping_spans"),
    ("feedback unknown label", "post", "/feedback", {"json": {"text": "Tom left", "entities": [{"start": 0, "end": 3, "label": "ANIMAL"}]}}, 422, "unknown_label"),
    ("feedback span splits a token", "post", "/feedback", {"json": {"text": "Tommy left", "entities": [{"start": 0, "end": 3, "label": "PER"}]}}, 422, "span_splits_token"),
    ("feedback wrong span text", "post", "/feedback", {"json": {"text": "Tom left", "entities": [{"start": 0, "end": 3, "label": "PER", "text": "Tim"}]}}, 422, "span_text_mismatch"),
    ("feedback negative offset", "post", "/feedback", {"json": {"text": "Tom left", "entities": [{"start": -1, "end": 3, "label": "PER"}]}}, 422, "invalid_request"),
    ("feedback unknown prediction id", "post", "/feedback", {"json": {"prediction_id": str(uuid.UUID(int=7)), "entities": []}}, 404, "prediction_not_found"),
    ("feedback malformed prediction id", "post", "/feedback", {"json": {"prediction_id": "nope", "entities": []}}, 422, "invalid_request"),
    ("feedback without target", "post", "/feedback", {"json": {"entities": []}}, 422, "invalid_request"),
    ("feedback partial span not allowed", "post", "/feedback", {"json": {"text": "Tommy left", "entities": [{"start": 0, "end": 3, "label": "PER"}], "allow_partial": True}}, 422, "partial_spans_disabled"),
    ("export format unknown", "get", "/annotations", {"params": {"format": "xml"}}, 422, "invalid_request"),
    ("export since not a date", "get", "/annotations", {"params": {"since": "yesterday"}}, 422, "invalid_request"),
    ("unknown route", "get", "/nope", {}, 404, "not_found"),
    ("wrong method", "get", "/tag", {}, 405, "method_not_allowed"),
]


@pytest.mark.parametrize("description, method, path, kwargs, status, code", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_a_readable_4xx(api, description, method, path, kwargs, status, code):
    r = getattr(api, method)(path, **kwargs)
    assert r.status_code == status, r.text[:500]
    body = r.json()
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert len(r.content) < 20_000  # never echoes a huge input back


def test_replayed_idempotency_key_with_another_body_is_rejected(api):
    key = uuid.uuid4().hex
    assert api.post("/feedback", json={"text": f"Tom left {key}", "entities": []}, headers={"Idempotency-Key": key}).status_code == 201
    r = api.post("/feedback", json={"text": f"Tom came {key}", "entities": []}, headers={"Idempotency-Key": key})
    assert r.status_code == 422 and "already used" in r.json()["error"]["message"]


def test_feedback_error_names_the_span(api):
    r = api.post("/feedback", json={"text": "Anna Berg left", "entities": [{"start": 0, "end": 4, "label": "PER"}, {"start": 5, "end": 12, "label": "LOC"}]})
    assert r.status_code == 422
    message = r.json()["error"]["message"]
    assert "entities[1]" in message and "[5, 12)" in message and "splits a token" in message


def test_api_keys_and_open_probes(sqlite_url, small_model_dir):
    keys = ["k" * 20, "q" * 24]
    with running_app(make_settings(sqlite_url, small_model_dir, api_keys=keys)) as c:
        assert c.post("/tag", json={"text": "Tom"}).status_code == 401
        assert c.post("/tag", json={"text": "Tom"}, headers={"X-API-Key": "x" * 20}).json()["error"]["code"] == "unauthorized"
        for key in keys:
            assert c.post("/tag", json={"text": "Tom"}, headers={"X-API-Key": key}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200
    with running_app(make_settings(sqlite_url, small_model_dir, api_keys=keys, protect_probes=True)) as c:
        assert c.get("/metrics").status_code == 401 and c.get("/metrics", headers={"X-API-Key": keys[0]}).status_code == 200
        assert c.get("/metrics", headers={"Authorization": f"Bearer {keys[1]}"}).status_code == 200  # as Prometheus sends it


def test_partial_spans_are_widened_when_the_server_allows_it(sqlite_url, small_model_dir):
    with running_app(make_settings(sqlite_url, small_model_dir, allow_partial_spans=True)) as c:
        r = c.post("/feedback", json={"text": "Tommy left", "entities": [{"start": 0, "end": 3, "label": "PER"}], "allow_partial": True})
        assert r.status_code == 201 and r.json()["entities"] == [{"start": 0, "end": 5, "label": "PER", "text": "Tommy"}]


def test_privacy_mode_keeps_only_hashes_of_tagged_texts(sqlite_url, small_model_dir):
    from sqlalchemy import create_engine
    from sqlalchemy import text as sql

    def stored_texts():
        engine = create_engine(sqlite_url)
        with engine.connect() as conn:
            texts = [row[0] for row in conn.execute(sql("SELECT text FROM documents WHERE text IS NOT NULL"))]
        engine.dispose()
        return texts

    with running_app(make_settings(sqlite_url, small_model_dir, store_text=False)) as c:
        pred = c.post("/tag", json={"text": "Tom visited Oslo ."}).json()
        c.post("/tag", json={"text": "Olga visited Lagos ."})
        assert pred["stored"] is True and stored_texts() == []
        r = c.post("/feedback", json={"prediction_id": pred["id"], "entities": []})
        assert r.status_code == 422 and r.json()["error"]["code"] == "text_required"
        r = c.post("/feedback", json={"prediction_id": pred["id"], "text": "Tom visited Oslo !", "entities": []})
        assert r.json()["error"]["code"] == "text_mismatch"
        r = c.post("/feedback", json={"prediction_id": pred["id"], "text": "Tom visited Oslo .", "entities": [{"start": 0, "end": 3, "label": "PER"}]})
        assert r.status_code == 201
        # the corrected text is kept (it is training data) and exported; the other stays a hash
        assert stored_texts() == ["Tom visited Oslo ."]
        assert [json.loads(line)["text"] for line in c.get("/annotations").text.splitlines()] == ["Tom visited Oslo ."]


def test_refuses_to_start_on_an_unmigrated_database(sqlite_url, small_model_dir):
    from service.store.session import SchemaError

    with pytest.raises(SchemaError, match="run `ner db upgrade`"), running_app(make_settings(sqlite_url, small_model_dir), migrate=False):
        pass
    with running_app(make_settings(sqlite_url, small_model_dir, auto_migrate=True), migrate=False) as c:
        assert c.get("/readyz").status_code == 200


def test_settings_refuse_unsafe_values(monkeypatch):
    with pytest.raises(ValueError, match="shorter than 16"):
        Settings(api_keys="short", _env_file=None)
    monkeypatch.setenv("ADMIN_KEY", "")  # as a compose file passes an unset variable
    monkeypatch.setenv("API_KEYS", "k" * 16 + ", " + "q" * 16)
    settings = Settings(_env_file=None)
    assert settings.admin_key is None and settings.api_keys == ["k" * 16, "q" * 16]
    monkeypatch.setenv("ADMIN_KEY", "short")
    with pytest.raises(ValueError, match="ADMIN_KEY must be at least 16"):
        Settings(_env_file=None)
    monkeypatch.delenv("ADMIN_KEY")
    with pytest.raises(ValueError, match="QUEUE_MAX_TEXTS"):
        Settings(queue_max_texts=2, max_batch_texts=10, _env_file=None)


def test_exported_corrections_name_their_document(client):
    """`ner finetune` splits by document: the JSONL export carries the document id."""
    text = "Olga visited Paris ."
    r = client.post("/feedback", json={"text": text, "entities": [{"start": 0, "end": 4, "label": "PER"}]})
    assert r.status_code == 201, r.text
    records = [json.loads(line) for line in client.get("/annotations?format=jsonl").text.splitlines() if line.strip()]
    mine = [rec for rec in records if rec["text"] == text]
    assert mine and all(len(rec["meta"]["document_id"]) == 36 for rec in mine)
