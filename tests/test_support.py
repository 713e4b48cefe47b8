"""tests.support: the databases and waits the tests and benchmarks share."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest

from tests.support import PG_ADMIN_URL, WaitTimeout, create_database, free_port, fresh_database, is_ready, pg_available, wait_until


def test_wait_until_returns_the_first_true_value():
    values = iter([0, None, [], "found"])
    assert wait_until(lambda: next(values), timeout=5, what="a value", interval=0) == "found"


def test_wait_until_names_what_it_waited_for_when_the_time_runs_out():
    with pytest.raises(WaitTimeout, match=r"^the impossible: not within 0\.05 s\nlast state: 7$"):
        wait_until(lambda: False, timeout=0.05, what="the impossible", interval=0.01, details=lambda: "last state: 7")


def test_wait_until_stops_when_the_process_exits():
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    process.wait(30)
    with pytest.raises(WaitTimeout, match="a server: the process exited with status 3"):
        wait_until(lambda: False, timeout=60, what="a server", process=process)


def test_wait_until_stops_when_the_thread_ends():
    thread = threading.Thread(target=lambda: None, name="starter")
    thread.start()
    thread.join()
    with pytest.raises(WaitTimeout, match="the thread starter ended"):
        wait_until(lambda: False, timeout=60, what="a live server", process=thread)


def test_a_free_port_can_be_bound_and_nothing_answers_there():
    port = free_port()
    assert not is_ready(f"http://127.0.0.1:{port}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_database_names_are_checked_before_the_server_is_asked():
    with pytest.raises(ValueError, match="lower-case letters"):
        create_database('x"; DROP DATABASE postgres; --', admin_url="postgresql+psycopg://nobody@127.0.0.1:1/none")


@pytest.mark.postgres
def test_a_fresh_database_exists_for_the_block_and_is_dropped_after():
    from sqlalchemy import create_engine, text

    if not pg_available():
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}")

    def exists(name: str) -> bool:
        admin = create_engine(PG_ADMIN_URL)
        try:
            with admin.connect() as conn:
                return conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first() is not None
        finally:
            admin.dispose()

    with fresh_database("ner_support") as url:
        name = url.rsplit("/", 1)[1]
        assert name.startswith("ner_support_") and exists(name)
        engine = create_engine(url)  # a connection left open does not stop the drop
        engine.connect()
    assert not exists(name)
    engine.dispose()
