"""Issue 24: ambiguity is refused, never resolved silently (credential headers, Host headers, an
absolute-form target naming another host); erasure by what a client holds (a prediction id, the
text's hash); the annotation queue offers each text once and none with an accepted correction;
several workers on a fresh PostgreSQL database register a model once. All through the public app
factory, HTTP or the ``ner`` command."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from tests.service.conftest import free_port, make_settings, running_app, wait_ready

ROOT = Path(__file__).resolve().parents[2]
TAG, ANNOTATE, ADMIN = "t" * 20, "n" * 20, "d" * 20
KEYS = [f"tag:{TAG}", f"annotate:{ANNOTATE}", f"admin:{ADMIN}"]


def _code(response) -> str:
    return response.json()["error"]["code"]


def _sha(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


@pytest.fixture
def keyed(sqlite_url, small_model_dir, tmp_path):
    with running_app(make_settings(sqlite_url, small_model_dir, api_keys=KEYS, models_dir=tmp_path)) as c:
        yield c


# 1-2: credential headers


@pytest.mark.parametrize("first, second", [(TAG, "bogus" * 4), ("bogus" * 4, TAG), (TAG, TAG)])
def test_two_api_key_headers_are_refused_whatever_their_order(keyed, first, second):
    r = keyed.get("/model", headers=[("X-API-Key", first), ("X-API-Key", second)])
    assert r.status_code == 401 and _code(r) == "ambiguous_credentials", r.text
    assert "X-API-Key" in r.json()["error"]["message"]


@pytest.mark.parametrize("extra", [
    ("X-Admin-Key", ""),
    ("Authorization", "Bearer "),
    ("Authorization", "Basic ZGQ6ZGQ="),
    ("X-Admin-Key", ADMIN),  # two valid keys are still two credentials
    ("Authorization", f"Bearer {ADMIN}"),
])
@pytest.mark.parametrize("route", ["/admin/models", "/admin/jobs", "/model", "/annotations"])
def test_a_second_credential_beside_a_valid_key_is_refused(keyed, extra, route):
    assert keyed.get(route, headers={"X-API-Key": ADMIN}).status_code == 200
    r = keyed.get(route, headers=[("X-API-Key", ADMIN), extra])
    assert r.status_code == 401 and _code(r) == "ambiguous_credentials", r.text


@pytest.mark.parametrize("header", [
    ("X-API-Key", ""),
    ("X-Admin-Key", ""),
    ("Authorization", ""),
    ("Authorization", "Bearer"),
    ("Authorization", "Bearer  "),
    ("Authorization", f"Basic {TAG}"),
    ("Authorization", f"Token {TAG}"),
])
def test_an_empty_or_unknown_scheme_credential_is_refused(keyed, header):
    r = keyed.get("/model", headers=[header])
    assert r.status_code == 401 and _code(r) == "invalid_credentials", r.text
    assert r.headers["WWW-Authenticate"]
    assert header[0] in r.json()["error"]["message"]


def test_bearer_scheme_is_case_insensitive(keyed):
    assert keyed.get("/model", headers={"Authorization": f"bearer {TAG}"}).status_code == 200
    assert keyed.get("/model", headers={"Authorization": f"Bearer {TAG}"}).status_code == 200


@pytest.mark.parametrize("route", ["/healthz", "/annotate", "/tag"])
def test_a_bad_credential_is_refused_on_open_routes_too(client, route):
    # the client fixture has no keys at all: every route is open, yet a malformed or ambiguous
    # credential is a client bug, refused rather than ignored
    send = client.post if route == "/tag" else client.get
    kwargs = {"json": {"text": "Tom"}} if route == "/tag" else {}
    assert send(route, **kwargs).status_code == 200
    assert _code(send(route, headers={"Authorization": "Basic eDp4"}, **kwargs)) == "invalid_credentials"
    assert _code(send(route, headers=[("X-API-Key", "k" * 20), ("X-API-Key", "k" * 20)], **kwargs)) == "ambiguous_credentials"


# 3: Host headers


@pytest.mark.parametrize("hosts", [["testserver", "evil.example"], ["evil.example", "testserver"], ["testserver", "testserver"]])
def test_two_host_headers_are_refused(client, hosts):
    r = client.get("/healthz", headers=[("host", h) for h in hosts])
    assert r.status_code == 400 and _code(r) == "ambiguous_host", r.text


@pytest.mark.parametrize("host", ["testserver:80@evil.example", "user@testserver", "testserver:80:81", "testserver:abc", "test server", "testserver/x", ""])
def test_a_malformed_host_is_refused(client, host):
    r = client.get("/healthz", headers={"host": host})
    assert r.status_code == 400 and _code(r) in ("invalid_host", "untrusted_host"), r.text
    if host:
        assert _code(r) == "invalid_host"


def test_malformed_or_duplicate_hosts_are_refused_even_when_any_host_is_allowed(sqlite_url, small_model_dir):
    with running_app(make_settings(sqlite_url, small_model_dir, allowed_hosts=["*"])) as c:
        assert c.get("/healthz", headers={"host": "anything.example:8000"}).status_code == 200
        assert c.get("/healthz", headers={"host": "[::1]:8000"}).status_code == 200
        assert _code(c.get("/healthz", headers={"host": "localhost:8000@evil.example"})) == "invalid_host"
        assert _code(c.get("/healthz", headers=[("host", "a.example"), ("host", "b.example")])) == "ambiguous_host"


def _raw(port: int, request: bytes) -> tuple[int, dict]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), (json.loads(body) if body.strip() else {})


@pytest.mark.slow
def test_ner_serve_refuses_hosts_it_cannot_trust_on_the_wire(tmp_path, small_model_dir):
    """Through ``ner serve`` (uvicorn's HTTP parser, not the test client): an absolute-form target
    naming another host than Host, two Host headers, userinfo in Host."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(DATABASE_URL=f"sqlite:///{tmp_path / 'h.db'}", NER_MODEL=str(small_model_dir), AUTO_MIGRATE="true", PYTHONPATH=str(ROOT))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--log-level", "warning"],
                              cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    here = f"127.0.0.1:{port}".encode()
    try:
        wait_ready(f"http://127.0.0.1:{port}", server)
        assert _raw(port, b"GET /healthz HTTP/1.1\r\nHost: " + here + b"\r\nConnection: close\r\n\r\n")[0] == 200
        same = _raw(port, b"GET http://" + here + b"/healthz HTTP/1.1\r\nHost: " + here + b"\r\nConnection: close\r\n\r\n")
        assert same[0] == 200, same
        other = _raw(port, b"GET http://evil.example/healthz HTTP/1.1\r\nHost: " + here + b"\r\nConnection: close\r\n\r\n")
        assert other[0] == 400 and other[1]["error"]["code"] == "ambiguous_host", other
        two = _raw(port, b"GET /healthz HTTP/1.1\r\nHost: " + here + b"\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
        assert two[0] == 400 and two[1]["error"]["code"] == "ambiguous_host", two
        userinfo = _raw(port, b"GET /healthz HTTP/1.1\r\nHost: localhost:" + str(port).encode() + b"@evil.example\r\nConnection: close\r\n\r\n")
        assert userinfo[0] == 400 and userinfo[1]["error"]["code"] == "invalid_host", userinfo
    finally:
        server.terminate()
        server.communicate(timeout=30)


# 4: erasure by what a client holds


@pytest.fixture(params=["sqlite", "postgres"])
def db_client(request, small_model_dir, sqlite_url, tmp_path):
    """(client, database URL) with role keys, on SQLite and on PostgreSQL (a fresh database)."""
    if request.param == "sqlite":
        url = sqlite_url
    else:
        url = request.getfixturevalue("fresh_pg_url")
    with running_app(make_settings(url, small_model_dir, api_keys=KEYS, models_dir=tmp_path)) as c:
        yield c, url


def _everywhere(url: str, needles: list[str]) -> dict[str, int]:
    """How many rows of each table (every table of the database) mention any of ``needles``."""
    engine = create_engine(url)
    found: dict[str, int] = {}
    try:
        with engine.connect() as conn:
            for table in inspect(conn).get_table_names():
                for row in conn.execute(text(f'SELECT * FROM "{table}"')):
                    dump = repr(tuple(row)).replace("-", "")
                    if any(n.replace("-", "") in dump for n in needles):
                        found[table] = found.get(table, 0) + 1
    finally:
        engine.dispose()
    return found


def _export(client) -> str:
    return client.get("/annotations", headers={"X-API-Key": ADMIN}).text + client.get("/annotations?format=conll", headers={"X-API-Key": ADMIN}).text


def test_a_text_only_tagged_is_erased_by_its_prediction_id(db_client):
    c, url = db_client
    marker = f"Zorbel{uuid.uuid4().hex[:8]}"
    secret = f"{marker} visited Oslo ."
    pred = c.post("/tag", json={"text": secret}, headers={"X-API-Key": TAG}).json()
    assert "documents" in _everywhere(url, [marker])  # (the prediction may name it as an entity too)
    r = c.delete(f"/predictions/{pred['id']}", headers={"X-API-Key": TAG})
    assert r.status_code == 200, r.text
    assert r.json()["prediction_id"] == pred["id"]
    assert r.json()["deleted"] == {"documents": 1, "predictions": 1, "annotations": 0, "idempotency_keys": 0}
    assert _everywhere(url, [marker, pred["id"], _sha(secret)]) == {}
    again = c.delete(f"/predictions/{pred['id']}", headers={"X-API-Key": TAG})
    assert again.status_code == 404 and _code(again) == "prediction_not_found"
    assert c.delete(f"/predictions/{pred['id']}").status_code == 401
    assert c.delete(f"/predictions/{uuid.uuid4()}", headers={"X-API-Key": ANNOTATE}).status_code == 403


def test_deleting_a_prediction_keeps_a_text_a_correction_refers_to(db_client):
    c, url = db_client
    marker = f"Quillon{uuid.uuid4().hex[:8]}"
    secret = f"{marker} met Anna in Rome ."
    first, second = (c.post("/tag", json={"text": secret}, headers={"X-API-Key": TAG}).json() for _ in range(2))
    c.post("/feedback", json={"prediction_id": first["id"], "entities": []}, headers={"X-API-Key": ANNOTATE}).raise_for_status()
    # the other copy: nothing else refers to it, its text goes
    r = c.delete(f"/predictions/{second['id']}", headers={"X-API-Key": TAG})
    assert r.json()["deleted"] == {"documents": 1, "predictions": 1, "annotations": 0, "idempotency_keys": 0}
    # the corrected copy: the correction keeps the text (training data); only the prediction goes
    r = c.delete(f"/predictions/{first['id']}", headers={"X-API-Key": TAG})
    assert r.json()["deleted"] == {"documents": 0, "predictions": 1, "annotations": 0, "idempotency_keys": 0}
    assert _everywhere(url, [first["id"]]) == {}
    assert marker in _export(c)


def test_erasure_by_text_hash_removes_every_copy_from_every_table_and_the_export(db_client):
    c, url = db_client
    marker = f"Vantrell{uuid.uuid4().hex[:8]}"
    secret = f"{marker} flew to Lagos ."
    preds = [c.post("/tag", json={"text": secret}, headers={"X-API-Key": TAG}).json() for _ in range(2)]
    c.post("/feedback", json={"prediction_id": preds[0]["id"], "entities": []}, headers={"X-API-Key": ANNOTATE}).raise_for_status()
    c.post("/feedback", json={"text": secret, "entities": [], "author": "x"}, headers={"X-API-Key": ANNOTATE, "Idempotency-Key": marker}).raise_for_status()
    c.post("/tag", json={"text": "Tom stays in Paris ."}, headers={"X-API-Key": TAG}).raise_for_status()
    assert marker in _export(c)
    r = c.delete("/documents", params={"sha256": _sha(secret)}, headers={"X-API-Key": TAG})
    assert r.status_code == 204, r.text
    assert _everywhere(url, [marker, _sha(secret), *(p["id"] for p in preds)]) == {}
    assert marker not in _export(c)
    assert "Tom stays" in json.dumps(c.get("/annotations/queue?limit=500", headers={"X-API-Key": ADMIN}).json())
    # the same answer when nothing was stored (it does not tell whether someone sent that text)
    assert c.delete("/documents", params={"sha256": _sha(secret)}, headers={"X-API-Key": TAG}).status_code == 204
    assert c.delete("/documents", params={"sha256": _sha(secret).upper()}, headers={"X-API-Key": TAG}).status_code == 204
    for bad in ("", "abc", "g" * 64, _sha(secret) + "0"):
        r = c.delete("/documents", params={"sha256": bad}, headers={"X-API-Key": TAG})
        assert r.status_code == 422 and _code(r) == "invalid_request", (bad, r.text)
    assert c.delete("/documents", params={"sha256": _sha(secret)}).status_code == 401


# 5: the annotation queue


def _queue(c) -> list[dict]:
    return c.get("/annotations/queue", params={"limit": 500}, headers={"X-API-Key": ADMIN}).json()


def _remaining(c) -> int:
    return c.get("/annotate/status", headers={"X-API-Key": ADMIN}).json()["queue_remaining"]


def test_the_queue_offers_each_text_once_and_none_already_corrected(db_client):
    c, _url = db_client
    marker = uuid.uuid4().hex[:8]
    twice, other, corrected_first = (f"Brimble{marker} saw Oslo .", f"Xqzt Vlorp{marker} Mmnn .", f"Corvin{marker} left Kyoto .")
    tag = lambda t: c.post("/tag", json={"text": t}, headers={"X-API-Key": TAG}).json()  # noqa: E731
    copies = [tag(twice), tag(twice)]
    tag(other)
    listed = [q for q in _queue(c) if marker in q["text"]]
    assert sorted(q["text"] for q in listed) == sorted([twice, other])
    assert _remaining(c) == 2
    # the copy offered is the least confident one of that text
    offered = next(q for q in listed if q["text"] == twice)
    assert offered["min_score"] == min(q["min_score"] for q in listed if q["text"] == twice)
    assert offered["prediction_id"] in {p["id"] for p in copies}
    # correcting one copy takes every copy of the text out of the queue
    c.post("/feedback", json={"prediction_id": copies[0]["id"], "entities": []}, headers={"X-API-Key": ANNOTATE}).raise_for_status()
    assert [q["text"] for q in _queue(c) if marker in q["text"]] == [other]
    assert _remaining(c) == 1
    # a text corrected before it was tagged (a new-text correction) is not offered either
    c.post("/feedback", json={"text": corrected_first, "entities": []}, headers={"X-API-Key": ANNOTATE}).raise_for_status()
    tag(corrected_first)
    tag(twice)
    assert [q["text"] for q in _queue(c) if marker in q["text"]] == [other]
    assert _remaining(c) == 1


# 6: the schema says what the service accepts


def test_register_model_schema_refuses_an_empty_path(keyed):
    schema = keyed.get("/openapi.json").json()["components"]["schemas"]["RegisterModel"]
    assert schema["properties"]["path"]["minLength"] == 1
    r = keyed.post("/admin/models", json={"path": ""}, headers={"X-API-Key": ADMIN})
    assert r.status_code == 422 and _code(r) == "invalid_request" and "path" in r.json()["error"]["message"]


def test_the_schema_refuses_an_empty_idempotency_key_as_the_service_does(keyed):
    header = next(p for p in keyed.get("/openapi.json").json()["paths"]["/feedback"]["post"]["parameters"] if p["name"] == "idempotency-key")
    assert header["schema"]["minLength"] == 1
    r = keyed.post("/feedback", json={"text": "Tom left .", "entities": []}, headers={"X-API-Key": ANNOTATE, "Idempotency-Key": ""})
    assert r.status_code == 422 and _code(r) == "invalid_idempotency_key"


def test_a_whole_number_written_with_a_fraction_is_an_integer_as_the_schema_says(keyed):
    entity = keyed.get("/openapi.json").json()["components"]["schemas"]["EntityIn"]["properties"]["start"]
    assert entity["type"] == "integer"  # JSON Schema: 3.0 is an integer
    r = keyed.post("/feedback", json={"text": "Tom left .", "entities": [{"start": 0.0, "end": 3.0, "label": "PER"}]}, headers={"X-API-Key": ANNOTATE})
    assert r.status_code == 201, r.text
    assert r.json()["entities"] == [{"start": 0, "end": 3, "label": "PER", "text": "Tom"}]
    for bad in (0.5, "0", True):
        r = keyed.post("/feedback", json={"text": "Tom left .", "entities": [{"start": bad, "end": 3, "label": "PER"}]}, headers={"X-API-Key": ANNOTATE})
        assert r.status_code == 422 and _code(r) == "invalid_request", (bad, r.text)


def test_openapi_declares_the_new_erasure_routes_and_their_role(keyed):
    paths = keyed.get("/openapi.json").json()["paths"]
    assert paths["/predictions/{prediction_id}"]["delete"]["x-required-role"] == "tag"
    erase = paths["/documents"]["delete"]
    assert erase["x-required-role"] == "tag" and "204" in erase["responses"]
    sha = next(p for p in erase["parameters"] if p["name"] == "sha256")
    assert sha["required"] and sha["schema"]["pattern"]


# 7: several workers, one registration


def _waiting_on_locks(url: str, database: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            query = "SELECT count(*) FROM pg_stat_activity WHERE datname = :db AND wait_event_type = 'Lock'"
            return conn.execute(text(query), {"db": database}).scalar_one()
    finally:
        engine.dispose()


@pytest.mark.postgres
@pytest.mark.slow
def test_workers_starting_together_register_the_model_once(fresh_pg_url, small_model_dir):
    """Three apps start on one fresh database with NER_MODEL set while a test transaction holds the
    models table in SHARE mode: each has read the table (no row yet) and waits to write when the
    lock is released, the moment that made two workers insert the same model. Exactly one INSERT
    may run: a failed one takes a sequence value (a gap in model ids, an ERROR in the server log)."""
    from service.store.session import upgrade

    upgrade(fresh_pg_url)
    database = fresh_pg_url.rsplit("/", 1)[1]
    settings = make_settings(fresh_pg_url, small_model_dir)
    blocker = create_engine(fresh_pg_url)
    started: list[int] = []
    errors: list[BaseException] = []
    release = threading.Event()

    def start() -> None:
        try:
            with running_app(settings, migrate=False) as c:
                started.append(c.get("/model").status_code)
                release.wait(120)
        except Exception as e:  # noqa: BLE001 (reported by the assertions below)
            errors.append(e)

    with blocker.connect() as conn:
        conn.execute(text("LOCK TABLE models IN SHARE MODE"))
        threads = [threading.Thread(target=start) for _ in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while _waiting_on_locks(fresh_pg_url, database) < 3:
            assert time.monotonic() < deadline and not errors, f"the apps did not reach the registration: {errors}"
            time.sleep(0.2)
        conn.rollback()  # releases the table lock
    while len(started) + len(errors) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    release.set()
    for t in threads:
        t.join(60)
    blocker.dispose()
    assert not errors and started == [200, 200, 200], (errors, started)
    engine = create_engine(fresh_pg_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, name, active FROM models")).all()
            last_value = conn.execute(text("SELECT last_value FROM models_id_seq")).scalar_one()
    finally:
        engine.dispose()
    assert [(r.id, r.active) for r in rows] == [(1, True)]
    assert last_value == 1, f"{last_value - 1} INSERT(s) failed on uq_models_name_version"
