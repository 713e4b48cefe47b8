"""Browser fixtures: Debian's chromium driven headless by chromedriver through selenium, against the
real app served by uvicorn on a loopback port (SQLite file, the small test model).

Nothing is downloaded: the driver path is given to selenium, so selenium-manager never runs. A
machine without chromium fails these tests (``make system-deps`` installs it); they never skip."""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import LiveServer, make_settings

CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER_BIN", "/usr/bin/chromedriver")
FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", "--window-size=1100,720", "--lang=en-US",
]


@pytest.fixture(scope="session")
def browser(tmp_path_factory) -> Iterator:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if shutil.which(p) is None]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: install Debian's chromium and chromium-driver (make system-deps)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # belt and braces: selenium-manager, were it ever reached, stays offline
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


class App:
    """The live app, an HTTP client for it, and its SQLite file."""

    def __init__(self, server: LiveServer, db_path: Path, api_key: str | None):
        self.server, self.url, self.db_path = server, server.url, db_path
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=server.url, headers=headers, timeout=30)

    def tag(self, *texts: str) -> list[dict]:
        r = self.http.post("/tag", json={"texts": list(texts)})
        assert r.status_code == 200, r.text
        return r.json()["results"]

    def queue(self) -> list[dict]:
        r = self.http.get("/annotations/queue", params={"limit": 100})
        assert r.status_code == 200, r.text
        return r.json()

    def annotations(self) -> list[dict]:
        import json

        r = self.http.get("/annotations", params={"format": "jsonl"})
        assert r.status_code == 200, r.text
        return [json.loads(line) for line in r.text.splitlines() if line.strip()]

    def stored_annotation_rows(self) -> int:
        """Every row of the annotations table, superseded ones included."""
        import sqlite3

        with contextlib.closing(sqlite3.connect(self.db_path)) as db:
            return db.execute("SELECT count(*) FROM annotations").fetchone()[0]


@pytest.fixture
def serve(tmp_path, small_model_dir):
    """``with serve(**settings) as app``: a fresh migrated SQLite file and the app on a free port."""
    from service.store.session import upgrade

    @contextlib.contextmanager
    def start(api_key: str | None = None, **overrides) -> Iterator[App]:
        db_path = tmp_path / f"ner-{time.monotonic_ns()}.db"
        url = f"sqlite:///{db_path}"
        upgrade(url)
        if api_key is not None:
            overrides["api_keys"] = [api_key]
        with LiveServer(make_settings(url, small_model_dir, **overrides)) as server:
            app = App(server, db_path, api_key)
            try:
                yield app
            finally:
                app.http.close()

    return start
