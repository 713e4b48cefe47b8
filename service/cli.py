"""The ``ner`` command: ml's train/evaluate/predict/export, plus ``serve`` and ``db`` for the service,
and ``train --annotations-from DATABASE_URL`` to learn from stored corrections."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from ml.cli import build_parser, cmd_train, run


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # must be set before any worker imports prometheus_client (see service.metrics)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="ner-metrics-")
    uvicorn.run(
        "service.main:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
        log_level=args.log_level, access_log=args.access_log, proxy_headers=True,
    )
    return 0


def _database_url(args: argparse.Namespace) -> str:
    if getattr(args, "database_url", None):
        return args.database_url
    from service.config import Settings

    return Settings().database_url


def cmd_db(args: argparse.Namespace) -> int:
    from service.db import session as db

    url = _database_url(args)
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


def cmd_train_with_annotations(args: argparse.Namespace) -> int:
    """Export stored corrections to a JSONL file, then train on the base data plus them."""
    if not args.annotations_from:
        return cmd_train(args)
    import datetime as dt

    from service.db.session import check_schema, make_engine, make_sessionmaker
    from service.exports import export_lines

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
        print(f"error: no stored corrections in {args.annotations_from}" + (f" since {args.since}" if args.since else ""), file=sys.stderr)
        return 2
    print(f"training with {count} stored corrections from the database", file=sys.stderr)
    args.feedback = (args.feedback or []) + [f.name]
    args.lineage = {"annotations_from": engine.url.render_as_string(hide_password=True), "annotations_since": args.since, "corrections": count}
    try:
        return cmd_train(args)
    finally:
        Path(f.name).unlink(missing_ok=True)


def parser() -> argparse.ArgumentParser:
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    train = sub.choices["train"]
    train.add_argument("--annotations-from", metavar="DATABASE_URL", help="add the corrections stored in this database")
    train.add_argument("--since", help="with --annotations-from: only corrections stored at or after this ISO time")
    train.set_defaults(func=cmd_train_with_annotations)

    serve = sub.add_parser("serve", help="run the HTTP service (settings from the environment / .env)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="uvicorn worker processes; metrics are aggregated across them")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--access-log", action="store_true", help="log every request (off by default: it costs throughput)")
    serve.set_defaults(func=cmd_serve)

    db = sub.add_parser("db", help="database schema (Alembic)")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    for name, help_, default in (("upgrade", "apply migrations", "head"), ("downgrade", "revert migrations", None), ("current", "show the revision", None)):
        c = db_sub.add_parser(name, help=help_)
        if name != "current":
            c.add_argument("revision", nargs="?" if default else None, default=default)
        c.add_argument("--database-url", help="default: DATABASE_URL / .env / the SQLite default")
    db.set_defaults(func=cmd_db)
    return p


def main(argv: list[str] | None = None) -> int:
    from service.db.session import SchemaError

    return run(parser(), argv, expected=(SchemaError,))


if __name__ == "__main__":
    sys.exit(main())
