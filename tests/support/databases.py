"""A fresh PostgreSQL database per run (or per test), made on the server behind an admin URL and
dropped afterwards, its open connections first."""
from __future__ import annotations

import contextlib
import os
import re
import socket
import uuid
from collections.abc import Iterator

from sqlalchemy.engine import make_url

# trust authentication on the local server; NER_TEST_PG_ADMIN points elsewhere
PG_ADMIN_URL = os.environ.get("NER_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def pg_available(admin_url: str = PG_ADMIN_URL) -> bool:
    """Whether the server of ``admin_url`` accepts TCP connections (nothing more is checked)."""
    url = make_url(admin_url)
    with contextlib.suppress(OSError), socket.create_connection((url.host or "127.0.0.1", url.port or 5432), timeout=1):
        return True
    return False


def _checked(name: str) -> str:
    # names are put into the SQL as identifiers: only plain lower-case ones
    if not _NAME.match(name):
        raise ValueError(f"database name {name!r}: use lower-case letters, digits and _ (at most 63)")
    return name


def create_database(prefix: str, admin_url: str = PG_ADMIN_URL) -> str:
    """Create ``<prefix>_<random>`` on the server of ``admin_url``; returns its URL (same server,
    user and driver)."""
    from sqlalchemy import create_engine, text

    name = _checked(f"{prefix}_{uuid.uuid4().hex[:10]}")
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str, admin_url: str = PG_ADMIN_URL) -> None:
    """Drop the database of ``url`` (if it exists), ending the sessions still connected to it."""
    from sqlalchemy import create_engine, text

    name = _checked(make_url(url).database or "")
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name AND pid <> pg_backend_pid()"), {"name": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    finally:
        admin.dispose()


@contextlib.contextmanager
def fresh_database(prefix: str, admin_url: str = PG_ADMIN_URL) -> Iterator[str]:
    """A new database's URL for the ``with`` block; dropped when it ends."""
    url = create_database(prefix, admin_url)
    try:
        yield url
    finally:
        drop_database(url, admin_url)
