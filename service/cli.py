"""The ``ner`` command: ml's train/evaluate/predict/export, plus ``serve`` and ``db`` for the service,
and ``train --annotations-from DATABASE_URL`` to learn from stored corrections."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.cli import build_commands, cmd_finetune, cmd_train, run

if TYPE_CHECKING:
    from service.config import Settings

METRICS_PREFIX = "ner-metrics-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clear_stale_metrics_dirs(tmp: str | None = None) -> list[Path]:
    """Remove ``ner-metrics-PID-*`` folders whose ``ner serve`` process is gone (killed before it
    could clean up); folders of live processes are left alone."""
    removed = []
    for path in Path(tmp or tempfile.gettempdir()).glob(METRICS_PREFIX + "*"):
        pid = path.name[len(METRICS_PREFIX) :].split("-", 1)[0]
        if path.is_dir() and not path.is_symlink() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def http_protocol() -> str:
    """uvicorn's ``http`` setting for ``ner serve``: httptools keeping an absolute-form request target
    for the host check (service/api/http_protocol.py); h11, which keeps it by itself, without httptools."""
    import importlib.util

    return "service.api.http_protocol:TargetKeepingHttpTools" if importlib.util.find_spec("httptools") else "h11"


class AppFactory:
    """What a worker process calls to build its app: ``create_app`` with the settings ``ner serve``
    read once (the command line's --host and --device included). Picklable, so the supervisor hands
    it to worker processes it spawns; no environment variable carries the settings there."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def __call__(self):
        from service.main import create_app

        return create_app(self.settings)


def cmd_serve(args: argparse.Namespace) -> int:
    from service.config import Settings
    from service.security import ConfigError, check_exposure

    overrides: dict[str, Any] = {"bind_host": args.host}  # the exposure and host checks
    if args.device is not None:
        overrides["device"] = args.device
    try:
        settings = Settings(**overrides)
        check_exposure(args.host, settings.key_ring, settings.allow_no_auth)
        if settings.device != "cpu":  # once here, before any worker starts (torch is loaded only then)
            from ml.device import resolve_device

            resolve_device(settings.device)
    except (ConfigError, ValueError) as e:  # DeviceError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.workers > 1 and settings.auto_migrate:
        # once, before any worker starts: N workers migrating one fresh database at once raced
        # (one of them failed on a column the other had just added, and the service stopped)
        from service.store.session import upgrade

        upgrade(settings.database_url)
        overrides["auto_migrate"] = False
        settings = settings.model_copy(update={"auto_migrate": False})
    with _metrics_dir(args.workers):
        return _serve(args, settings, overrides)


@contextlib.contextmanager
def _metrics_dir(workers: int) -> Iterator[None]:
    """With several workers, a fresh PROMETHEUS_MULTIPROC_DIR for this run, removed afterwards. An
    environment variable because prometheus_client reads it when a worker imports it (service.metrics)."""
    if workers == 1 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        yield
        return
    clear_stale_metrics_dirs()
    # the pid in the name lets a later run tell a dead run's folder from a live one's
    metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_PREFIX}{os.getpid()}-")
    try:
        with _environment({"PROMETHEUS_MULTIPROC_DIR": metrics_dir}):
            yield
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in os.environ for the block, then as they were."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _serve(args: argparse.Namespace, settings: Settings, overrides: dict[str, Any]) -> int:
    """One process, or a worker process per CPU share under our supervisor (a socket each), both
    given ``settings`` as an object; or uvicorn's own workers (--shared-socket, or not Linux), which
    import the app by name, so only the environment reaches them: there ``overrides`` go that way."""
    import logging

    import uvicorn

    from service.serving import supervisor

    config: dict[str, Any] = {"factory": True, "host": args.host, "port": args.port, "log_level": args.log_level,
                              "access_log": args.access_log, "proxy_headers": True, "http": http_protocol()}
    if args.workers > 1 and not args.shared_socket and supervisor.available():
        # a socket per worker: the kernel spreads connections over them (service/serving/supervisor.py)
        logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")
        try:
            return supervisor.Supervisor({**config, "app": AppFactory(settings)}, args.workers).run()
        except OSError as e:
            print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
            return 2
    if args.workers == 1:
        uvicorn.run(AppFactory(settings), **config)
        return 0
    with _environment({name.upper(): str(value).lower() if isinstance(value, bool) else str(value) for name, value in overrides.items()}):
        uvicorn.run("service.main:create_app", **config, workers=args.workers)
    return 0


def _database_url(args: argparse.Namespace) -> str:
    if getattr(args, "database_url", None):
        return args.database_url
    from service.config import Settings

    return Settings().database_url


def cmd_db(args: argparse.Namespace) -> int:
    from service.store import session as db

    url = _database_url(args)
    if args.db_command == "purge":
        return _purge(url, args)
    if args.db_command == "upgrade":
        db.upgrade(url, args.revision)
    elif args.db_command == "downgrade":
        db.downgrade(url, args.revision)
    engine = db.make_engine(url)
    try:
        print(f"database revision: {db.database_revision(engine)} (code: {db.code_revision()})")
    finally:
        engine.dispose()
    return 0


def _purge(url: str, args: argparse.Namespace) -> int:
    import datetime as dt
    import json

    from service.config import Settings
    from service.store import session as db
    from service.store.repositories import purge

    settings = Settings()
    days = args.older_than_days if args.older_than_days is not None else settings.retention_days
    engine = db.make_engine(url)
    try:
        db.check_schema(engine)
        with db.make_sessionmaker(engine)() as session:
            removed = purge(session, retention_days=days, idempotency_ttl=dt.timedelta(hours=settings.idempotency_ttl_hours))
    finally:
        engine.dispose()
    print(json.dumps({"retention_days": days, "idempotency_ttl_hours": settings.idempotency_ttl_hours, "removed": removed.as_dict()}))
    return 0


def cmd_train_with_annotations(args: argparse.Namespace) -> int:
    """Export stored corrections to a JSONL file, then train on the base data plus them."""
    if not args.annotations_from:
        return cmd_train(args)
    import datetime as dt

    from service.store.session import check_schema, make_engine, make_sessionmaker
    from service.training.exports import export_lines

    since = dt.datetime.fromisoformat(args.since) if args.since else None
    engine = make_engine(args.annotations_from)
    try:
        check_schema(engine)
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as f, make_sessionmaker(engine)() as session:
            count = 0
            for line in export_lines(session, "jsonl", since):
                f.write(line)
                count += 1
    finally:
        engine.dispose()
    if count == 0:
        where = engine.url.render_as_string(hide_password=True)
        print(f"error: no stored corrections in {where}" + (f" since {args.since}" if args.since else ""), file=sys.stderr)
        return 2
    print(f"training with {count} stored corrections from the database", file=sys.stderr)
    args.feedback = (args.feedback or []) + [f.name]
    args.lineage = {"annotations_from": engine.url.render_as_string(hide_password=True), "annotations_since": args.since, "corrections": count}
    try:
        return cmd_train(args)
    finally:
        Path(f.name).unlink(missing_ok=True)


def cmd_finetune_with_annotations(args: argparse.Namespace) -> int:
    """``ner finetune --annotations-from URL``: the stored corrections (keyed by document, for the
    held-out split) and stored uncorrected texts (the forgetting probe; rehearsal when on), then ml's finetune."""
    if not args.annotations_from:
        return cmd_finetune(args)
    from ml.finetune import FinetuneConfig
    from service.store import training_jobs as jobs_repo
    from service.store.session import check_schema, make_engine, make_sessionmaker
    from service.training.exports import export_lines

    FinetuneConfig().override(args.set or [])  # a bad --set fails before the database is read
    engine = make_engine(args.annotations_from)
    files = []
    try:
        check_schema(engine)
        sessions = make_sessionmaker(engine)
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as f, sessions() as session:
            files.append(f.name)
            count = sum(f.write(line) > 0 for line in export_lines(session, "jsonl", None))
        with sessions() as session:
            texts = jobs_repo.rehearsal_texts(session, limit=args.rehearse_max)
        if texts:
            with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as f:
                files.append(f.name)
                f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
            args.rehearse = (args.rehearse or []) + [f.name]
    finally:
        engine.dispose()
    try:
        if count == 0:
            print(f"error: no stored corrections in {args.annotations_from}", file=sys.stderr)
            return 2
        print(f"fine-tuning on {count} stored corrections" + (f" and {len(texts)} stored uncorrected texts" if texts else ""), file=sys.stderr)
        args.corrections = (args.corrections or []) + [files[0]]
        args.lineage = {"annotations_from": engine.url.render_as_string(hide_password=True)}
        return cmd_finetune(args)
    finally:
        for name in files:
            Path(name).unlink(missing_ok=True)


def cmd_bulk_with_store(args: argparse.Namespace) -> int:
    """``ner bulk --store``: the database is checked before the job (a long job does not fail at its
    end), the documents and predictions stored after it (service.training.bulk_import)."""
    from ml.bulk.command import cmd_bulk

    if not args.store:
        return cmd_bulk(args)
    if args.min_score is not None or args.labels:
        print("error: --store records every entity, as POST /tag stores them: leave out --min-score and --labels with --store", file=sys.stderr)
        return 2
    from sqlalchemy.exc import SQLAlchemyError

    from ml.bulk.job import BulkJob
    from service.config import Settings
    from service.store.session import check_schema, make_engine
    from service.training.bulk_import import BulkStoreError, store_output

    settings = Settings()
    engine = make_engine(args.database_url or settings.database_url)

    def store(job: BulkJob, summary: dict) -> dict:
        return store_output(engine, job, job.plan()[1], store_text=settings.store_text)

    try:
        check_schema(engine)
        return cmd_bulk(args, then=store)
    except (BulkStoreError, SQLAlchemyError) as e:
        print(f"error: storing the predictions failed: {e}; the output is kept: run the same command again to store the rest", file=sys.stderr)
        return 2
    finally:
        engine.dispose()


def cmd_worker(args: argparse.Namespace) -> int:
    from service.config import Settings
    from service.training.trainer import main as worker_main

    worker_main(Settings(), once=args.once)
    return 0


def parser() -> argparse.ArgumentParser:
    commands = build_commands()
    train = commands.command("train")
    train.add_argument("--annotations-from", metavar="DATABASE_URL", help="add the corrections stored in this database")
    train.add_argument("--since", help="with --annotations-from: only corrections stored at or after this ISO time")
    train.set_defaults(func=cmd_train_with_annotations)

    finetune = commands.command("finetune")
    finetune.add_argument("--annotations-from", metavar="DATABASE_URL", help="the corrections (and, for rehearsal, the stored texts) of this database")
    finetune.add_argument("--rehearse-max", type=int, default=2000, help="with --annotations-from: stored uncorrected texts read at most (forgetting probe, rehearsal)")
    finetune.set_defaults(func=cmd_finetune_with_annotations)

    bulk = commands.command("bulk")
    bulk.add_argument("--store", action="store_true",
                      help="also record the documents and predictions in the service's database, as POST /tag does (the least confident join GET /annotations/queue)")
    bulk.add_argument("--database-url", help="with --store (default: DATABASE_URL / .env / the SQLite default)")
    bulk.set_defaults(func=cmd_bulk_with_store)

    worker = commands.add("worker", help="the trainer: run retraining jobs from the database one at a time (settings from the environment)")
    worker.add_argument("--once", action="store_true", help="exit when no job is left instead of waiting for more")
    worker.set_defaults(func=cmd_worker)

    serve = commands.add("serve", help="run the HTTP service (settings from the environment / .env)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="worker processes, each with its own listening socket (SO_REUSEPORT; see --shared-socket); metrics are aggregated across them")
    serve.add_argument("--shared-socket", action="store_true",
                       help="with several workers, one listening socket shared by all (uvicorn's way) instead of one per worker (SO_REUSEPORT, Linux)")
    serve.add_argument("--device", help="where the model runs: cpu (default), cuda or cuda:N (over DEVICE)")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--access-log", action="store_true", help="log every request (off by default: it costs throughput)")
    serve.set_defaults(func=cmd_serve)

    db = commands.add("db", help="database schema (Alembic)")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    for name, help_, default in (
        ("upgrade", "apply migrations", "head"), ("downgrade", "revert migrations", None), ("current", "show the revision", None),
        ("purge", "delete predictions and uncorrected texts older than RETENTION_DAYS, and expired idempotency keys", None),
    ):
        c = db_sub.add_parser(name, help=help_)
        if name in ("upgrade", "downgrade"):
            c.add_argument("revision", nargs="?" if default else None, default=default)
        if name == "purge":
            c.add_argument("--older-than-days", type=float, help="default: RETENTION_DAYS (unset: only idempotency keys are cleared)")
        c.add_argument("--database-url", help="default: DATABASE_URL / .env / the SQLite default")
    db.set_defaults(func=cmd_db)
    return commands.parser


def main(argv: list[str] | None = None) -> int:
    from service.store.session import SchemaError

    return run(parser(), argv, expected=(SchemaError,))


if __name__ == "__main__":
    sys.exit(main())
