"""Service fixtures: the real app over real databases (a SQLite file, and a fresh database on the
PostgreSQL server at 127.0.0.1:5432), with the small model trained once per run."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

PG_ADMIN_URL = os.environ.get("NER_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def pg_available() -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", 5432), timeout=1):
        return True
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, server: subprocess.Popen, timeout: float = 90) -> None:
    """Until ``base``/readyz answers 200; fails if ``server`` exits or the time runs out."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline and server.poll() is None, "ner serve did not become ready"
        time.sleep(0.3)


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """A fresh database for this test run, dropped at the end. Fails (not skips) without Postgres:
    CI must run these tests; .ci/run starts the server when it is down."""
    if not pg_available():
        pytest.fail("PostgreSQL is not reachable at 127.0.0.1:5432 (start it: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start)")
    with fresh_database("ner_test") as url:
        yield url


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """A database of its own for one test (the session database is shared with other tests' rows)."""
    if not pg_available():
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}")
    with fresh_database("ner_fresh") as url:
        yield url


@contextlib.contextmanager
def fresh_database(prefix: str) -> Iterator[str]:
    """Create a new database on the PostgreSQL server, yield its URL, drop it afterwards."""
    from sqlalchemy import create_engine, text

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"))
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def make_settings(database_url: str, model_dir, **overrides):
    from service.config import Settings

    # TestClient sends "Host: testserver"; the trusted-host check must accept it
    values = {
        "database_url": database_url, "ner_model": model_dir, "model_poll_s": 0, "batch_max_wait_ms": 2.0,
        "allowed_hosts": ["testserver", "127.0.0.1", "localhost"], "_env_file": None,
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.contextmanager
def running_app(settings, migrate: bool = True):
    """The real app with its lifespan, through Starlette's httpx-based TestClient."""
    from fastapi.testclient import TestClient

    from service.main import create_app
    from service.store.session import upgrade

    if migrate:
        upgrade(settings.database_url)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'ner.db'}"


@pytest.fixture
def client(sqlite_url, small_model_dir):
    with running_app(make_settings(sqlite_url, small_model_dir)) as c:
        yield c


@pytest.fixture(scope="session")
def pg_client(pg_server_url, small_model_dir):
    with running_app(make_settings(pg_server_url, small_model_dir)) as c:
        yield c


class LiveServer:
    """uvicorn serving the app on a free loopback port in a thread: real HTTP for concurrency tests."""

    def __init__(self, settings):
        import uvicorn

        from service.main import create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the live server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class TcpProxy:
    """A loopback TCP forwarder to the real PostgreSQL server that can be cut and restored: the
    database really goes away for the app (connections reset, new ones refused), no mock involved."""

    def __init__(self, target_port: int = 5432):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.connections: list = []
        self.lock = threading.Lock()
        self.stopped = False

    def start(self) -> TcpProxy:
        self.listener.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        while not self.stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def cut(self) -> None:
        self.up = False
        with self.lock:
            for s in self.connections:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.connections.clear()

    def restore(self) -> None:
        self.up = True

    def stop(self) -> None:
        self.stopped = True
        self.cut()
        self.listener.close()
