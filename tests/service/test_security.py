"""Access: key roles, the refusal to serve an open API on a public address, model folders confined
to MODELS_DIR, docs behind PROTECT_PROBES, the trusted-host check, slow bodies."""
from __future__ import annotations

import asyncio
import json
import os

import pytest

from service.config import Settings
from service.security import ConfigError, KeyRing, PathRefused, check_exposure, confine
from tests.service.conftest import make_settings, running_app

TAG, ANNOTATE, READ, ADMIN = ("t" * 20, "a" * 20, "r" * 20, "d" * 20)
ROLE_KEYS = [f"tag:{TAG}", f"annotate:{ANNOTATE}", f"read:{READ}", f"admin:{ADMIN}"]


@pytest.fixture
def keyed(sqlite_url, small_model_dir, tmp_path):
    with running_app(make_settings(sqlite_url, small_model_dir, api_keys=ROLE_KEYS, models_dir=tmp_path)) as c:
        yield c


def _h(key):
    return {"X-API-Key": key}


def test_each_route_needs_its_role(keyed):
    c = keyed
    tag = lambda k: c.post("/tag", json={"text": "Tom"}, headers=_h(k)).status_code  # noqa: E731
    feedback = lambda k: c.post("/feedback", json={"text": f"Tom {k[:3]}", "entities": []}, headers=_h(k)).status_code  # noqa: E731
    export = lambda k: c.get("/annotations", headers=_h(k)).status_code  # noqa: E731
    queue = lambda k: c.get("/annotations/queue", headers=_h(k)).status_code  # noqa: E731
    admin = lambda k: c.get("/admin/models", headers=_h(k)).status_code  # noqa: E731
    assert [tag(TAG), feedback(TAG), export(TAG), queue(TAG), admin(TAG)] == [200, 403, 403, 403, 403]
    assert [tag(ANNOTATE), feedback(ANNOTATE), export(ANNOTATE), queue(ANNOTATE), admin(ANNOTATE)] == [403, 201, 403, 200, 403]
    assert [tag(READ), feedback(READ), export(READ), queue(READ), admin(READ)] == [403, 403, 200, 403, 403]
    assert [tag(ADMIN), export(ADMIN), admin(ADMIN)] == [200, 200, 200]
    r = c.get("/annotations", headers=_h(TAG))
    assert r.json()["error"]["code"] == "forbidden" and "'read' role" in r.json()["error"]["message"]
    assert c.get("/annotations").status_code == 401
    assert c.get("/admin/models", headers={"X-Admin-Key": ADMIN}).status_code == 200


def test_plain_keys_open_everything_but_admin(sqlite_url, small_model_dir):
    key = "p" * 24
    with running_app(make_settings(sqlite_url, small_model_dir, api_keys=[key])) as c:
        assert c.post("/tag", json={"text": "Tom"}, headers=_h(key)).status_code == 200
        assert c.get("/annotations", headers=_h(key)).status_code == 200
        assert c.get("/annotations/queue", headers=_h(key)).status_code == 200
        r = c.get("/admin/models", headers=_h(key))
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"


def test_key_ring_parsing():
    ring = KeyRing.from_settings([f"tag:{TAG}", f"read:{TAG}", "x" * 16], "y" * 16)
    assert ring.roles_of(TAG) == {"tag", "read"}
    assert ring.roles_of("x" * 16) == {"tag", "annotate", "read"}
    assert ring.roles_of("y" * 16) == {"tag", "annotate", "read", "admin"}
    assert ring.roles_of("z" * 16) is None
    with pytest.raises(ValueError, match="unknown role 'writer'"):
        Settings(api_keys=f"writer:{TAG}", _env_file=None)
    with pytest.raises(ValueError, match="shorter than 16"):
        Settings(api_keys="tag:short", _env_file=None)


def test_openapi_names_each_routes_role(keyed, client):
    paths = keyed.get("/openapi.json").json()["paths"]
    assert paths["/tag"]["post"]["x-required-role"] == "tag"
    assert paths["/feedback"]["post"]["x-required-role"] == "annotate"
    assert paths["/annotations/queue"]["get"]["x-required-role"] == "annotate"
    assert paths["/annotations"]["get"]["x-required-role"] == "read"
    assert paths["/admin/models"]["post"]["x-required-role"] == "admin"
    assert paths["/healthz"]["get"].get("security") is None  # probes open: no key declared
    # without API_KEYS only /admin checks a key, and the schema says so
    open_paths = client.get("/openapi.json").json()["paths"]
    assert "security" not in open_paths["/tag"]["post"] and "403" not in open_paths["/tag"]["post"]["responses"]
    assert open_paths["/admin/models"]["get"]["x-required-role"] == "admin"


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::"])
def test_public_bind_without_keys_refuses_to_start(host, sqlite_url, small_model_dir):
    from service.main import create_app

    with pytest.raises(ConfigError, match="ALLOW_NO_AUTH=true"):
        create_app(make_settings(sqlite_url, small_model_dir, bind_host=host))
    create_app(make_settings(sqlite_url, small_model_dir, bind_host=host, allow_no_auth=True))
    create_app(make_settings(sqlite_url, small_model_dir, bind_host=host, api_keys=[f"tag:{TAG}"]))
    # an admin key alone leaves /tag open: still refused
    with pytest.raises(ConfigError):
        check_exposure(host, KeyRing.from_settings([], ADMIN), False)
    check_exposure("127.0.0.1", KeyRing(), False)
    check_exposure("localhost", KeyRing(), False)


def test_ner_serve_refuses_public_bind_without_keys(monkeypatch, capsys):
    from service.cli import main

    for name in ("API_KEYS", "ADMIN_KEY", "ALLOW_NO_AUTH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BIND_HOST", "127.0.0.1")  # `ner serve` sets it; restored after the test
    monkeypatch.chdir(os.path.dirname(__file__))  # no .env here
    assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "ALLOW_NO_AUTH=true" in capsys.readouterr().err


def test_models_dir_confinement(tmp_path):
    root = tmp_path / "models"
    (root / "a").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    assert confine("a", root) == (root / "a").resolve()
    assert confine(str(root / "a"), root) == (root / "a").resolve()
    assert confine("b/c", root) == (root / "b" / "c").resolve()  # inside, need not exist
    for bad in (str(outside), "../outside", "a/../../outside", "link", "link/x", "/etc", "", str(root)):
        with pytest.raises(PathRefused):
            confine(bad, root)


def test_admin_models_cannot_load_outside_models_dir(keyed, tmp_path, small_model_dir):
    # small_model_dir is a real model outside MODELS_DIR (tmp_path of this test): refused unread
    answers = []
    for path in (str(small_model_dir), str(tmp_path.parent / "does-not-exist"), "../x", "/etc/passwd"):
        r = keyed.post("/admin/models", json={"path": path}, headers=_h(ADMIN))
        answers.append((r.status_code, r.json()["error"]["code"], r.json()["error"]["message"].replace(path, "")))
    assert {a[:2] for a in answers} == {(422, "path_not_allowed")}
    # an existing and a missing outside path get exactly the same answer
    assert answers[0] == answers[1]


def test_docs_follow_protect_probes(sqlite_url, small_model_dir):
    with running_app(make_settings(sqlite_url, small_model_dir, api_keys=[f"tag:{TAG}"], protect_probes=True)) as c:
        assert c.get("/openapi.json").status_code == 401 and c.get("/docs").status_code == 401
        assert c.get("/openapi.json", headers=_h(TAG)).status_code == 200
        assert c.get("/docs", headers=_h(TAG)).status_code == 200
    with running_app(make_settings(sqlite_url, small_model_dir, api_keys=[f"tag:{TAG}"])) as c:
        assert c.get("/openapi.json").status_code == 200 and c.get("/docs").status_code == 200


def test_untrusted_host_is_refused(sqlite_url, small_model_dir):
    settings = make_settings(sqlite_url, small_model_dir, allowed_hosts=[])  # the default: loopback names + bind host
    with running_app(settings) as c:
        r = c.post("/tag", json={"text": "Tom"}, headers={"Host": "attacker.example:8000"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "untrusted_host"
        for host in ("127.0.0.1:8000", "localhost", "[::1]:8000"):
            assert c.get("/healthz", headers={"Host": host}).status_code == 200, host
    with running_app(make_settings(sqlite_url, small_model_dir, allowed_hosts=["ner.example.org"])) as c:
        assert c.get("/healthz", headers={"Host": "ner.example.org"}).status_code == 200
        assert c.get("/healthz", headers={"Host": "localhost"}).status_code == 400


def test_slow_body_times_out_with_408():
    from service.api.middleware import BodyLimit

    async def app(scope, receive, send):  # pragma: no cover - never reached
        raise AssertionError("the app must not see an unfinished body")

    sent = []

    async def receive():
        await asyncio.sleep(3600)  # a client that never sends its body

    async def send(message):
        sent.append(message)

    middleware = BodyLimit(app, max_bytes=1000, timeout_s=0.2)
    asyncio.run(middleware({"type": "http", "method": "POST", "headers": []}, receive, send))
    assert sent[0]["status"] == 408
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_timeout"
