"""Helpers shared by the tests and the benchmarks: PostgreSQL databases made and dropped for a run
(``databases``), free ports and waiting for a server or a condition (``waiting``), ``ner serve`` as a
child process (``serving``)."""
from __future__ import annotations

from tests.support.databases import PG_ADMIN_URL, create_database, drop_database, fresh_database, pg_available
from tests.support.serving import serve_env, start_serve, stop_serve
from tests.support.waiting import WaitTimeout, free_port, is_ready, wait_ready, wait_until

__all__ = [
    "PG_ADMIN_URL", "WaitTimeout", "create_database", "drop_database", "free_port", "fresh_database", "is_ready", "pg_available",
    "serve_env", "start_serve", "stop_serve", "wait_ready", "wait_until",
]
