"""The output folder of a bulk job::

    OUT/_job.json                  the job: inputs, options, model, and the shard plan
    OUT/part-00000.parquet         one file per shard (or .jsonl): one row per document
    OUT/_rejects/part-00000.jsonl  the shard's rejects (only when it has some), with their reasons
    OUT/_summary.json              the counts, once every shard is complete

A shard's file is written whole under a temporary name (``.part-00000.parquet.<pid>.<random>.tmp``),
flushed to disk, then renamed into place: a file named ``part-NNNNN`` is always complete, and a rerun
of the same job skips the shards that have one. Its rejects are written (the same way) before it.
Names starting with ``_`` or ``.`` are skipped by Parquet readers: ``pyarrow.parquet.read_table(OUT)``,
``pandas.read_parquet(OUT)`` and Ray's ``read_parquet(OUT)`` read the documents alone."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ml.bulk.sources import Reject, ShardSpec, count_lines

OUTPUT_FORMATS = ("parquet", "jsonl")
JOB_FILE = "_job.json"
SUMMARY_FILE = "_summary.json"
REJECTS_DIR = "_rejects"
LOCK_FILE = "_job.lock"


class OutputError(ValueError):
    """The output folder cannot take this job (another job's folder, or one in use)."""


def output_schema() -> Any:
    import pyarrow as pa

    entity = pa.struct([("start", pa.int64()), ("end", pa.int64()), ("label", pa.string()), ("text", pa.string()), ("score", pa.float64()),
                        ("source", pa.string()), ("rule_id", pa.int64())])  # ml.pipeline.entity_dicts: "model" or "rule", and which rule
    return pa.schema([
        ("id", pa.string()), ("entities", pa.list_(entity)), ("min_score", pa.float64()),
        ("model_name", pa.string()), ("model_version", pa.string()),
    ])


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a temporary sibling, flush it to disk, rename it to ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_jsonl(rows: Sequence[dict]) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)

    return write


def _write_parquet(rows: Sequence[dict]) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(list(rows), schema=output_schema()), tmp)

    return write


def _first_difference(old: dict, new: dict) -> str:
    for key in sorted(set(old) | set(new)):
        if key == "shards":
            continue
        if old.get(key) != new.get(key):
            return f"{key} was {old.get(key)!r}, now {new.get(key)!r}"
    old_shards, new_shards = old.get("shards", []), new.get("shards", [])
    for a, b in zip(old_shards, new_shards, strict=False):
        if a != b:
            return f"the inputs changed: shard {a.get('index')} was {a}, now {b}"
    return f"the inputs changed: {len(old_shards)} shards then, {len(new_shards)} now"


class OutputFolder:
    def __init__(self, path: str | Path, fmt: str = "parquet"):
        if fmt not in OUTPUT_FORMATS:
            raise OutputError(f"unknown output format {fmt!r}; use one of {', '.join(OUTPUT_FORMATS)}")
        self.path = Path(path)
        self.format = fmt

    def warm(self) -> None:
        """Import and initialise the Parquet writer (about a second, the first time in a process):
        done before the local engine forks, the workers do not each pay for it."""
        if self.format == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist([], schema=output_schema()), pa.BufferOutputStream())

    def shard_path(self, spec: ShardSpec) -> Path:
        return self.path / f"{spec.name}.{self.format}"

    def rejects_path(self, spec: ShardSpec) -> Path:
        return self.path / REJECTS_DIR / f"{spec.name}.jsonl"

    def is_complete(self, spec: ShardSpec) -> bool:
        return self.shard_path(spec).is_file()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Held by the job's driver: a second job into the same folder is refused, not interleaved."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOCK_FILE, "w") as lock:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputError(f"{self.path} is in use by another ner bulk job") from None
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def prepare(self, manifest: dict) -> None:
        """Record the job in the folder, or check that it is the job recorded there (a rerun), and
        remove what interrupted writers left (temporary files). Call while ``locked``."""
        job_file = self.path / JOB_FILE
        if job_file.exists():
            old = json.loads(job_file.read_text(encoding="utf-8"))
            if old != manifest:
                raise OutputError(f"{self.path} holds the output of another job ({_first_difference(old, manifest)}); give another --out, or delete it")
        elif any(p.name.startswith("part-") for p in self.path.iterdir()):
            raise OutputError(f"{self.path} holds part files but no {JOB_FILE}; give an empty or new folder")
        else:
            atomic_write(job_file, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8"))
        (self.path / REJECTS_DIR).mkdir(exist_ok=True)
        for folder in (self.path, self.path / REJECTS_DIR):
            for p in folder.glob(".part-*.tmp"):
                p.unlink(missing_ok=True)

    def write_shard(self, spec: ShardSpec, rows: Sequence[dict], rejects: Sequence[Reject]) -> None:
        """The shard's rejects (if any), then its rows: when the rows' file exists the shard is done."""
        stale = self.rejects_path(spec)
        if rejects:
            atomic_write(stale, _write_jsonl([r.to_dict() for r in rejects]))
        else:
            stale.unlink(missing_ok=True)
        atomic_write(self.shard_path(spec), _write_parquet(rows) if self.format == "parquet" else _write_jsonl(rows))

    def rows(self, spec: ShardSpec) -> list[dict]:
        """The rows of a complete shard, in input order."""
        path = self.shard_path(spec)
        if self.format == "parquet":
            import pyarrow.parquet as pq

            return list(pq.read_table(path).to_pylist())
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    def count_rows(self, spec: ShardSpec) -> int:
        path = self.shard_path(spec)
        if self.format == "parquet":
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(path).metadata.num_rows)
        return count_lines(path)

    def count_rejects(self, spec: ShardSpec) -> int:
        path = self.rejects_path(spec)
        return count_lines(path) if path.exists() else 0

    def finish(self, summary: dict) -> None:
        atomic_write(self.path / SUMMARY_FILE, lambda tmp: tmp.write_text(json.dumps(summary, indent=1), encoding="utf-8"))


def read_rows(folder: str | Path) -> list[dict]:
    """Every row of a finished output folder, in shard order (for tests and small outputs)."""
    rows: list[dict] = []
    for path in sorted(Path(folder).glob("part-*")):
        name, fmt = path.name.split(".", 1)
        spec = ShardSpec(int(name.removeprefix("part-")), "", "", "", 0, 0, 0, 0)
        rows.extend(OutputFolder(folder, fmt).rows(spec))
    return rows


def read_rejects(folder: str | Path) -> list[dict]:
    out: list[dict] = []
    for path in sorted((Path(folder) / REJECTS_DIR).glob("part-*.jsonl")):
        with open(path, encoding="utf-8") as f:
            out.extend(json.loads(line) for line in f)
    return out
