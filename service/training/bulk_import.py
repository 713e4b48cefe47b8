"""``ner bulk --store``: a finished bulk job's documents and predictions recorded as ``POST /tag``
records them (a document row and a prediction row each, through ``PredictionStore``'s bulk INSERTs,
one transaction per shard), so the least confident join ``GET /annotations/queue``.

Prediction ids are UUIDv7-shaped like the service's: 48 bits of the job's first ``--store`` time
(kept in ``OUT/_stored.json``), then bits derived from the shard and the row. A shard whose first
prediction is already in the database was stored by an earlier run and is skipped: running the same
command again (after a crash, or to store a resumed job's new shards) never stores a document twice."""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path

from sqlalchemy import Engine

from ml.bulk.job import BulkJob
from ml.bulk.output import OutputFolder, atomic_write
from ml.bulk.sources import ShardSpec, read_shard
from service.store import repositories
from service.store.repositories import PredictionRecord, PredictionStore
from service.store.session import make_sessionmaker

STORED_FILE = "_stored.json"


class BulkStoreError(RuntimeError):
    """The output folder and the inputs disagree (changed since the job ran)."""


def _identity(out: Path) -> dict:
    """The job's id namespace and time, created on the first ``--store``."""
    path = out / STORED_FILE
    if not path.exists():
        identity = {"namespace": str(uuid.uuid4()), "millis": time.time_ns() // 1_000_000}
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(identity), encoding="utf-8"))
    return json.loads(path.read_text(encoding="utf-8"))


def prediction_ids(identity: dict, shard: int, count: int) -> list[uuid.UUID]:
    """UUIDv7 layout (RFC 9562): the job's milliseconds, version 7, variant, then 74 bits of a hash
    of (namespace, shard, row): the same ids on every run, stored together in the index like the service's."""
    stamp = int(identity["millis"]).to_bytes(6, "big")
    ids = []
    for k in range(count):
        noise = bytearray(hashlib.sha256(f"{identity['namespace']}:{shard}:{k}".encode()).digest()[:10])
        noise[0] = 0x70 | (noise[0] & 0x0F)  # version 7
        noise[2] = 0x80 | (noise[2] & 0x3F)  # RFC 9562 variant
        ids.append(uuid.UUID(bytes=stamp + bytes(noise)))
    return ids


def _records(job: BulkJob, out: OutputFolder, spec: ShardSpec, ids: list[uuid.UUID]) -> list[PredictionRecord]:
    docs, _ = read_shard(spec, job.options)
    rows = out.rows(spec)
    if [d.id for d in docs] != [r["id"] for r in rows]:
        raise BulkStoreError(f"{out.shard_path(spec)} does not hold the documents of {spec.source} lines/rows {spec.first}-{spec.first + spec.count - 1} "
                             "any more: the input changed since the job ran")
    return [
        PredictionRecord(pid, doc.text, row["model_name"], row["model_version"], list(row["entities"]), float(row["min_score"]), 0.0)
        for pid, doc, row in zip(ids, docs, rows, strict=True)
    ]


def store_output(engine: Engine, job: BulkJob, shards: list[ShardSpec], *, store_text: bool) -> dict:
    """Store every complete shard's documents not stored yet; returns the counts."""
    out = OutputFolder(job.out, job.output_format)
    identity = _identity(out.path)
    store = PredictionStore(engine)
    sessions = make_sessionmaker(engine)
    stored = skipped = 0
    for spec in shards:
        count = out.count_rows(spec)
        if count == 0:
            continue
        ids = prediction_ids(identity, spec.index, count)
        with sessions() as session:
            if repositories.get_prediction(session, prediction_id=ids[0]) is not None:
                skipped += count
                continue
        store.store(_records(job, out, spec, ids), store_text=store_text)
        stored += count
    return {"stored": stored, "already_stored": skipped}
