"""One bulk job, whatever runs it: its settings (``BulkJob``), the shard plan checked against the output
folder, and ``ShardWorker``, which turns one shard into its output file with the loaded model.

Texts go through ``ml.pipeline.TextTagger``, the service's tagger: the same spaCy tokenizer, the same
predictor, the same entity rounding (``entity_dicts``), so a document gets the offsets, labels and
scores that ``POST /tag`` answers for its text."""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ml.bulk.output import OutputFolder
from ml.bulk.sources import Document, ReadOptions, RejectedRecord, ShardSpec, auto_shard_size, expand_inputs, plan_shards, read_shard
from ml.pipeline import TextTagger, entity_dicts, min_token_score
from ml.rules import EntityFilter, PhraseTokenizer, RuleSet, parse_rules


class BulkError(RuntimeError):
    """A job that could not finish (a worker died, the cluster failed); what was written is kept."""


@dataclass(frozen=True)
class BulkJob:
    inputs: tuple[str, ...]
    out: str
    model: str  # model folder
    input_format: str = "auto"
    output_format: str = "parquet"
    options: ReadOptions = field(default_factory=ReadOptions)
    shard_size: int | None = None  # None: auto_shard_size (recorded in the job's manifest)
    batch_size: int = 64  # texts per call of the tagger (the service's BATCH_MAX_TEXTS default)
    strict: bool = False
    # entity rules applied after the model (ml.rules: the rules file's rules as dicts, carried with the
    # job so every worker, also on another machine, has them) and the entity filter (docs/rules.md)
    rules: tuple[dict, ...] = ()
    rules_mode: str = "override"
    min_score: float | None = None
    labels: tuple[str, ...] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BulkJob:
        values = dict(data)
        values["inputs"] = tuple(values["inputs"])
        values["options"] = ReadOptions(**values["options"])
        values["rules"] = tuple(values.get("rules", ()))
        if values.get("labels") is not None:
            values["labels"] = tuple(values["labels"])
        return cls(**values)

    def filters(self) -> dict | None:
        """The rules (by digest) and the filter, for the manifest: a rerun with others is another job."""
        if not self.rules and self.min_score is None and self.labels is None:
            return None
        digest = hashlib.sha256(json.dumps(list(self.rules), sort_keys=True).encode()).hexdigest() if self.rules else None
        return {"rules_sha256": digest, "rules": len(self.rules), "rules_mode": self.rules_mode, "min_score": self.min_score,
                "labels": list(self.labels) if self.labels is not None else None}

    def plan(self) -> tuple[int, list[ShardSpec]]:
        """The shard size (given, or chosen from the inputs) and the shards."""
        files = expand_inputs(self.inputs, self.input_format, exclude=self.out)
        size = self.shard_size if self.shard_size is not None else auto_shard_size(files)
        return size, list(plan_shards(files, size, self.options))

    def manifest(self, model: dict, shard_size: int, shards: list[ShardSpec]) -> dict:
        """What makes two runs the same job (the output of one can be completed by the other)."""
        manifest = {
            "format": 1, "inputs": list(self.inputs), "input_format": self.input_format, "output_format": self.output_format,
            "options": asdict(self.options), "shard_size": shard_size, "model": model,
            "shards": [{k: v for k, v in s.to_dict().items() if k != "path"} for s in shards],
        }
        filters = self.filters()
        if filters is not None:  # (absent without rules or filters: manifests of earlier jobs stay valid)
            manifest["filters"] = filters
        return manifest


def model_identity(folder: str | Path) -> dict:
    """``{"name", "version"}`` from a model folder's meta.json, without loading its weights."""
    from ml.artifact import ModelLoadError

    path = Path(folder) / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        return {"name": str(meta["name"]), "version": str(meta["version"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{folder} is not a readable model folder ({path}: {e})") from None


@dataclass
class ShardResult:
    index: int
    documents: int
    rejects: int
    tokens: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


# (documents, tokens) tagged since the last call: progress within a shard
BatchCallback = Callable[[int, int], None]


class ShardWorker:
    """The loaded model and the job's output folder: ``run(spec)`` reads, checks, tags and writes a shard."""

    def __init__(self, job: BulkJob, tagger: TextTagger, model: dict):
        self.job = job
        self.tagger = tagger
        self.model = model
        self.out = OutputFolder(job.out, job.output_format)
        rules = parse_rules(enumerate(job.rules, 1))
        self.rules = RuleSet(rules, job.rules_mode, tokenize=PhraseTokenizer.for_language(tagger.tokenizer.language)) if rules else None
        self.keep = EntityFilter.of(job.min_score, job.labels)

    @classmethod
    def load(cls, job: BulkJob) -> ShardWorker:
        """Load the model (on the CPU: the fast path, as the service) and the tokenizer, and tag one
        text, so that a broken model fails here and every lazily built table exists before a fork.
        The word table is mapped from the shared cache file (ml.mapped): Ray's actors on one machine,
        which each load the model, then share it too."""
        from ml.mapped import default_cache_dir
        from ml.predictor import Predictor

        predictor = Predictor.load(job.model, "cpu", mapped_cache=default_cache_dir())
        assert predictor.loaded is not None
        tagger = TextTagger(predictor)
        tagger.tag(["Smoke test, please ignore."])
        meta = predictor.loaded.meta
        worker = cls(job, tagger, {"name": meta.name, "version": meta.version})
        worker.out.warm()
        return worker

    def rows(self, docs: list[Document], on_batch: BatchCallback | None = None) -> tuple[list[dict], int]:
        """Output rows of ``docs`` in order, and the number of tokens tagged."""
        rows: list[dict] = []
        tokens = 0
        size = self.job.batch_size
        name, version = self.model["name"], self.model["version"]
        for lo in range(0, len(docs), size):
            batch = docs[lo : lo + size]
            results = self.tagger.tag([d.text for d in batch], size, rules=self.rules)
            count = 0
            for doc, result in zip(batch, results, strict=True):
                rows.append({"id": doc.id, "entities": entity_dicts(result, self.keep), "min_score": min_token_score(result),
                             "model_name": name, "model_version": version})
                count += len(result.tokens)
            tokens += count
            if on_batch is not None:
                on_batch(len(batch), count)
        return rows, tokens

    def run(self, spec: ShardSpec, on_batch: BatchCallback | None = None) -> ShardResult:
        started = time.perf_counter()
        docs, rejects = read_shard(spec, self.job.options)
        if self.job.strict and rejects:
            raise RejectedRecord(rejects[0])
        rows, tokens = self.rows(docs, on_batch)
        self.out.write_shard(spec, rows, rejects)
        return ShardResult(spec.index, len(docs), len(rejects), tokens, time.perf_counter() - started)
