"""Service fixtures: the real app over real databases (a SQLite file, and a fresh database on the
PostgreSQL server at 127.0.0.1:5432), with the small model trained once per run."""
from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

# wait_ready: tests import it from here too
from tests.support import PG_ADMIN_URL, free_port, fresh_database, pg_available, wait_ready, wait_until  # noqa: F401


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

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=60, what="the live server starting", process=self.thread)
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
