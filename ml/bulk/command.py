"""``ner bulk``: its arguments and its command (``ml.cli`` adds the subcommand; ``service.cli`` adds
``--store``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ml.bulk.output import OUTPUT_FORMATS
from ml.bulk.sources import AUTO_SHARDS, FORMATS, MAX_SHARD_SIZE, MIN_SHARD_SIZE

if TYPE_CHECKING:
    from ml.bulk.job import BulkJob


def add_bulk_parser(sub: argparse._SubParsersAction, model_help: str) -> argparse.ArgumentParser:
    p = sub.add_parser("bulk", help="tag a corpus (text, JSONL, Parquet) into Parquet/JSONL files, on all cores or on a Ray cluster",
                       description="Tag every document of the inputs; resumable: run the same command again to finish an interrupted job.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders (searched recursively) or globs ('data/**/*.jsonl')")
    p.add_argument("--out", required=True, help="output folder: part-NNNNN.parquet|jsonl, _rejects/, _job.json, _summary.json")
    p.add_argument("--model", help=model_help)
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="input format (default: from each file's suffix; other suffixes are text)")
    p.add_argument("--output-format", default="parquet", choices=OUTPUT_FORMATS)
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    p.add_argument("--id-field", default="id", help="JSONL field / Parquet column holding the id (default when absent: SOURCE:LINE)")
    p.add_argument("--max-chars", type=int, default=100_000, help="longer texts are rejected (the service's MAX_TEXT_CHARS default)")
    p.add_argument("--engine", default="local", choices=["local", "ray"], help="local: processes on this machine; ray: Ray Data (pip install .[ray])")
    p.add_argument("--workers", type=int, help="worker processes / Ray actors (default: local, one per core; ray, the cluster's CPUs)")
    p.add_argument("--ray-address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray is started)")
    p.add_argument("--shard-size", type=int, help=f"lines of a text/JSONL file per shard (Parquet: whole row groups; default: about {AUTO_SHARDS} shards "
                                                  f"of {MIN_SHARD_SIZE} to {MAX_SHARD_SIZE} records)")
    p.add_argument("--batch-size", type=int, default=64, help="texts per call of the tagger")
    p.add_argument("--strict", action="store_true", help="stop at the first record that cannot be tagged instead of writing it to the rejects")
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    p.add_argument("--log-interval", type=float, default=30.0, metavar="SECONDS", help="seconds between progress lines when stderr is not a terminal")
    from ml.cli import add_filter_arguments

    add_filter_arguments(p)
    p.set_defaults(func=cmd_bulk)
    return p


def job_from_args(args: argparse.Namespace, model: str) -> BulkJob:
    from ml.bulk.job import BulkJob
    from ml.bulk.sources import BulkInputError, ReadOptions

    for name in ("max_chars", "batch_size", "shard_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise BulkInputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    options = ReadOptions(args.text_field, args.id_field, args.max_chars)
    rules, labels = _rules_and_labels(args, model)
    return BulkJob(tuple(args.inputs), args.out, model, args.format, args.output_format, options, args.shard_size, args.batch_size, args.strict,
                   rules, args.rules_mode, args.min_score, labels)


def _rules_and_labels(args: argparse.Namespace, model: str) -> tuple[tuple[dict, ...], tuple[str, ...] | None]:
    """``--rules FILE`` read and checked (every bad line named), ``--labels`` checked against the
    model's labels and the rules'; both before anything is tagged."""
    from ml.bulk.sources import BulkInputError
    from ml.rules import EntityFilter, RuleError, read_rules_file

    rules = []
    if args.rules:
        try:
            rules = read_rules_file(args.rules)
        except RuleError as e:
            raise BulkInputError(f"{args.rules}: {e}") from None
    labels = tuple(x.strip() for x in args.labels.split(",") if x.strip()) if args.labels is not None else None
    try:
        meta = json.loads((Path(model) / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = {}  # an unreadable model folder is reported when the job loads it
    known = list(meta.get("labels") or []) + sorted({r.label for r in rules})
    try:
        EntityFilter.of(args.min_score, labels, known if meta.get("labels") else None)
    except ValueError as e:
        raise BulkInputError(f"--labels: {e}") from None
    return tuple(r.to_dict() for r in rules), labels


def bulk_job(args: argparse.Namespace) -> BulkJob:
    from ml.artifact import default_model_path

    return job_from_args(args, args.model or os.environ.get("NER_MODEL") or str(default_model_path()))


def cmd_bulk(args: argparse.Namespace, then: Callable[[BulkJob, dict], dict] | None = None) -> int:
    """Run the job and print its summary (one JSON object); ``then(job, summary)`` runs after the job
    and adds to the summary (``service.cli``'s ``--store``). Errors the user can fix exit 2 with one line."""
    from ml.bulk.driver import run_job
    from ml.bulk.job import BulkError
    from ml.bulk.output import OutputError
    from ml.bulk.sources import BulkInputError, RejectedRecord

    try:
        job = bulk_job(args)
        summary = run_job(job, engine=args.engine, workers=args.workers, ray_address=args.ray_address, progress=not args.quiet,
                          log_interval_s=args.log_interval)
        if then is not None:
            summary.update(then(job, summary))
    except (BulkInputError, OutputError, RejectedRecord, BulkError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the shards written so far are kept; run the same command again to resume", file=sys.stderr)
        return 130
    print(json.dumps(summary))
    return 0
