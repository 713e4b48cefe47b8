"""The admin endpoints (api/routes/models.py): list, register a folder, activate by id, roll back,
and refusals that leave the served model alone."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from tests.service.conftest import make_settings, running_app

ADMIN = {"X-Admin-Key": "a" * 24}


def _copy_with_version(src, dst, version: str):
    shutil.copytree(src, dst)
    meta = json.loads((dst / "meta.json").read_text())
    meta["version"] = version
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst


def _switches(client, result: str) -> float:
    m = re.search(rf'^ner_model_switches_total\{{result="{result}"\}} ([0-9.e+-]+)$', client.get("/metrics").text, re.M)
    assert m, f"no ner_model_switches_total for {result}"
    return float(m.group(1))


def _served(client) -> str:
    return client.get("/model").json()["version"]


@pytest.fixture
def admin(sqlite_url, small_model_dir, tmp_path):
    # model folders are registered from the test's own folder (MODELS_DIR confines them)
    with running_app(make_settings(sqlite_url, small_model_dir, admin_key=ADMIN["X-Admin-Key"], models_dir=tmp_path)) as c:
        yield c


def test_list_models_shows_the_served_version(admin, small_model_dir):
    r = admin.get("/admin/models", headers=ADMIN)
    assert r.status_code == 200, r.text
    (row,) = r.json()
    assert (row["name"], row["version"], row["active"]) == ("small", "1.0.0", True)
    assert row["path"] == str(small_model_dir.resolve())
    assert row["metrics"]["dev"]["f1"] == 1.0 and "history" not in row["metrics"]


def test_register_a_valid_folder_and_serve_it(admin, small_model_dir, tmp_path):
    v2 = _copy_with_version(small_model_dir, tmp_path / "v2", "1.0.1")
    ok_before = _switches(admin, "ok")
    r = admin.post("/admin/models", json={"path": str(v2)}, headers=ADMIN)
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["version"], body["active"], body["path"]) == ("1.0.1", True, str(v2.resolve()))
    assert _served(admin) == "1.0.1"
    assert admin.post("/tag", json={"text": "Tom visited Oslo .", "store": False}).json()["model"] == {"name": "small", "version": "1.0.1"}
    assert _switches(admin, "ok") - ok_before == 1
    rows = admin.get("/admin/models", headers=ADMIN).json()
    assert [(m["version"], m["active"]) for m in rows] == [("1.0.0", False), ("1.0.1", True)]


def test_register_without_activating_keeps_the_served_model(admin, small_model_dir, tmp_path):
    v2 = _copy_with_version(small_model_dir, tmp_path / "v2", "1.0.1")
    r = admin.post("/admin/models", json={"path": str(v2), "activate": False}, headers=ADMIN)
    assert r.status_code == 201, r.text
    assert r.json()["active"] is False
    assert _served(admin) == "1.0.0"
    rows = admin.get("/admin/models", headers=ADMIN).json()
    assert [(m["version"], m["active"]) for m in rows] == [("1.0.0", True), ("1.0.1", False)]


def test_activate_by_id_then_roll_back(admin, small_model_dir, tmp_path):
    v2 = _copy_with_version(small_model_dir, tmp_path / "v2", "1.0.1")
    new_id = admin.post("/admin/models", json={"path": str(v2), "activate": False}, headers=ADMIN).json()["id"]
    old_id = next(m["id"] for m in admin.get("/admin/models", headers=ADMIN).json() if m["version"] == "1.0.0")

    r = admin.post(f"/admin/models/{new_id}/activate", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert (r.json()["id"], r.json()["active"]) == (new_id, True)
    assert _served(admin) == "1.0.1"

    r = admin.post(f"/admin/models/{old_id}/activate", headers=ADMIN)  # rolling back is the same call
    assert r.status_code == 200, r.text
    assert (r.json()["version"], r.json()["active"]) == ("1.0.0", True)
    assert _served(admin) == "1.0.0"
    assert 'ner_model_info{name="small",version="1.0.0"} 1.0' in admin.get("/metrics").text
    rows = admin.get("/admin/models", headers=ADMIN).json()
    assert [m["version"] for m in rows if m["active"]] == ["1.0.0"]


def test_activate_an_unknown_id_is_404(admin):
    r = admin.post("/admin/models/9999/activate", headers=ADMIN)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found" and "9999" in r.json()["error"]["message"]
    assert _served(admin) == "1.0.0"


@pytest.mark.parametrize("breakage", ["missing folder", "garbled config", "truncated weights"])
def test_a_bad_folder_is_refused_and_the_old_model_keeps_serving(admin, small_model_dir, tmp_path, breakage):
    folder = tmp_path / "bad"
    if breakage != "missing folder":
        _copy_with_version(small_model_dir, folder, "2.0.0")
        if breakage == "garbled config":
            (folder / "config.json").write_text("{ not json")
        else:
            weights = folder / "weights.safetensors"
            weights.write_bytes(weights.read_bytes()[:100])
    refused_before = _switches(admin, "refused")
    r = admin.post("/admin/models", json={"path": str(folder)}, headers=ADMIN)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "bad_model" and "still serving the previous one" in error["message"]
    assert _switches(admin, "refused") - refused_before == 1
    assert _served(admin) == "1.0.0"
    tagged = admin.post("/tag", json={"text": "Anna Berg visited Paris .", "store": False})
    assert tagged.status_code == 200 and tagged.json()["model"]["version"] == "1.0.0"
    assert [m["version"] for m in admin.get("/admin/models", headers=ADMIN).json()] == ["1.0.0"]  # nothing recorded


def test_admin_needs_its_key_and_is_off_without_one(admin, sqlite_url, small_model_dir):
    assert admin.get("/admin/models").status_code == 401
    assert admin.get("/admin/models", headers={"X-Admin-Key": "b" * 24}).json()["error"]["code"] == "unauthorized"
    with running_app(make_settings(sqlite_url, small_model_dir)) as c:
        r = c.get("/admin/models", headers=ADMIN)
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
