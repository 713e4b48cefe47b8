"""The annotation page's routes over HTTP (the page itself runs in a browser in tests/browser)."""
from __future__ import annotations

from service.api.routes.annotate import ASSETS, STATIC
from tests.service.conftest import make_settings, running_app


def test_page_and_its_files_are_served_from_the_package(client):
    r = client.get("/annotate")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for name, media in ASSETS.items():
        assert f"/annotate/static/{name}" in r.text
        asset = client.get(f"/annotate/static/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(media)
        assert asset.content == (STATIC / name).read_bytes()
    # nothing from outside the page's own list, no path tricks; no CDN or remote URL in the page
    for bad in ("index.html", "..%2F..%2Fconfig.py", "missing.js"):
        r = client.get(f"/annotate/static/{bad}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    for name in ["index.html", *ASSETS]:
        assert "http://" not in (STATIC / name).read_text() and "https://" not in (STATIC / name).read_text()


def test_status_counts_corrections_and_the_queue(client):
    def status():
        r = client.get("/annotate/status")
        assert r.status_code == 200, r.text
        return r.json()

    first = status()
    assert first == {"model": {"name": "small", "version": "1.0.0"}, "labels": first["labels"], "corrected_total": 0, "queue_remaining": 0}
    assert sorted(first["labels"]) == ["LOC", "ORG", "PER"]
    ids = [res["id"] for res in client.post("/tag", json={"texts": ["Anna Berg visited Paris .", "Tom visited Oslo .", "Olga met Tom ."]}).json()["results"]]
    client.post("/tag", json={"text": "Tom visited Lagos .", "store": False})  # not stored: not queued
    assert status()["queue_remaining"] == 3
    assert client.post("/feedback", json={"prediction_id": ids[0], "entities": []}).status_code == 201
    assert client.post("/feedback", json={"prediction_id": ids[0], "entities": [{"start": 0, "end": 4, "label": "PER"}]}).status_code == 201
    assert client.post("/feedback", json={"text": "Kyoto .", "entities": [{"start": 0, "end": 5, "label": "LOC"}]}).status_code == 201
    after = status()
    # the second correction of the same text supersedes the first: two texts corrected
    assert after["corrected_total"] == 2 and after["queue_remaining"] == 2


def test_status_lists_extra_labels_after_the_models(sqlite_url, small_model_dir):
    with running_app(make_settings(sqlite_url, small_model_dir, extra_labels=["PRODUCT", "PER"])) as c:
        labels = c.get("/annotate/status").json()["labels"]
        assert labels[-1] == "PRODUCT" and labels.count("PER") == 1 and len(labels) == 4


def test_status_needs_a_key_when_keys_are_set_but_the_page_does_not(sqlite_url, small_model_dir):
    key = "k" * 20
    with running_app(make_settings(sqlite_url, small_model_dir, api_keys=[key])) as c:
        assert c.get("/annotate").status_code == 200  # the page holds no data; it asks for the key
        assert c.get("/annotate/static/app.js").status_code == 200
        r = c.get("/annotate/status")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert c.get("/annotate/status", headers={"X-API-Key": key}).status_code == 200


def test_status_answers_503_when_the_database_fails(sqlite_url, small_model_dir):
    import sqlite3

    with running_app(make_settings(sqlite_url, small_model_dir)) as c:
        assert c.get("/annotate/status").status_code == 200
        with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as db:
            db.execute("ALTER TABLE annotations RENAME TO annotations_gone")  # the query now fails inside the database
        r = c.get("/annotate/status")
        assert r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable" and r.headers["Retry-After"]
