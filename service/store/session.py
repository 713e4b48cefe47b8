"""Engine creation and the schema check: the service refuses a database that Alembic has not
brought to the code's revision."""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


class SchemaError(RuntimeError):
    pass


def make_engine(url: str, timeout_s: float = 3.0, pool_size: int = 8, fsync: bool = True) -> Engine:
    """``fsync=False`` (the prediction writer's engine, unless PREDICTIONS_FSYNC): a commit is
    committed (visible to every reader, kept if the service crashes) without waiting for the disk,
    so a power loss or OS crash can lose the last fraction of a second of such commits. SQLite:
    synchronous=NORMAL in WAL mode; PostgreSQL: synchronous_commit=off (never corrupts, loses at
    most about 3 × wal_writer_delay of commits). Other writes keep waiting for the disk."""
    if url.startswith("sqlite"):
        # hide_parameters: an error logged by SQLAlchemy must not carry users' texts (INSERT parameters)
        engine = create_engine(url, hide_parameters=True, connect_args={"check_same_thread": False, "timeout": max(timeout_s, 5.0)})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
            # FULL: a commit is on disk before it returns, so an acknowledged correction survives a
            # power loss too (NORMAL in WAL mode can lose the last commits then, not older ones: a
            # later FULL commit syncs the whole WAL)
            cursor.execute("PRAGMA synchronous=FULL" if fsync else "PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    connect_args: dict = {"connect_timeout": max(1, int(timeout_s))} if url.startswith("postgresql") else {}
    if url.startswith("postgresql") and not fsync:
        connect_args["options"] = "-c synchronous_commit=off"
    return create_engine(url, hide_parameters=True, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size, pool_timeout=timeout_s, connect_args=connect_args)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def code_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    if head is None:
        raise SchemaError(f"no migration found in {MIGRATIONS}")
    return head


def database_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def check_schema(engine: Engine) -> None:
    current, head = database_revision(engine), code_revision()
    if current != head:
        state = "has no schema" if current is None else f"is at revision {current}"
        raise SchemaError(
            f"the database {engine.url.render_as_string(hide_password=True)} {state}, but this code needs revision {head}: "
            "run `ner db upgrade` (or set AUTO_MIGRATE=true for the embedded SQLite database)"
        )


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
