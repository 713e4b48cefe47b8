"""The inputs of a bulk job: files, folders and globs of plain text (one document a line), JSONL (a
text field and an optional id field) or Parquet (a text column and an optional id column); the
shard plan over them; reading one shard into documents and rejects.

A shard is a run of consecutive records of one file: ``shard_size`` lines of a text or JSONL file
(found by one pass over its bytes, nothing parsed), or whole row groups of a Parquet file (read from
its footer), so any worker can read any shard on its own and a shard's records never change between
two runs over the same inputs. Every record comes out as a ``Document`` or as a ``Reject`` with its
reason: nothing is dropped silently."""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ml.texts import text_problem

FORMATS = ("text", "jsonl", "parquet")
# the automatic shard size: about AUTO_SHARDS shards (work for every worker, and progress at a fine
# grain), each of MIN_SHARD_SIZE to MAX_SHARD_SIZE records (per-shard costs amortised; memory bounded)
AUTO_SHARDS, MIN_SHARD_SIZE, MAX_SHARD_SIZE = 64, 100, 10_000
SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


class BulkInputError(ValueError):
    """An input that cannot be read at all: no such file, a glob that matches nothing, a Parquet file
    without the text column. The job stops before tagging anything."""


@dataclass(frozen=True)
class InputFile:
    path: str  # as the user named it: ids and messages use it
    format: str


@dataclass(frozen=True)
class ReadOptions:
    text_field: str = "text"
    id_field: str = "id"
    max_chars: int = 100_000  # the service's MAX_TEXT_CHARS default


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass(frozen=True)
class Reject:
    source: str
    record: int  # 1-based line (text, JSONL) or row (Parquet) of the source
    id: str | None
    reason: str  # a code: invalid_utf8, not_json, not_an_object, missing_text, text_not_a_string, bad_id, empty_text, text_too_long, invalid_character
    detail: str

    def describe(self) -> str:
        return f"{self.source}:{self.record}: {self.detail}"

    def to_dict(self) -> dict:
        return asdict(self)


class RejectedRecord(ValueError):
    """``--strict``: the first record that cannot be tagged stops the job."""

    def __init__(self, reject: Reject):
        super().__init__(f"{reject.describe()} ({reject.reason}; without --strict it goes to the rejects file)")
        self.reject = reject

    def __reduce__(self) -> tuple:  # raised in a Ray actor, unpickled in the driver
        return (RejectedRecord, (self.reject,))


@dataclass(frozen=True)
class ShardSpec:
    index: int
    source: str  # the input as named
    path: str  # absolute, for workers in other folders or on other machines (a shared file system)
    format: str
    start: int  # text/JSONL: byte offset of the first line; Parquet: first row group
    stop: int  # text/JSONL: byte offset after the last line; Parquet: the row group after the last
    first: int  # the number of the shard's first record in its source (1-based)
    count: int  # records: lines or rows

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ShardSpec:
        return cls(int(data["index"]), str(data["source"]), str(data["path"]), str(data["format"]), int(data["start"]), int(data["stop"]),
                   int(data["first"]), int(data["count"]))


def format_of(path: str | Path) -> str:
    return SUFFIXES.get(Path(path).suffix.lower(), "text")


def expand_inputs(inputs: Sequence[str], fmt: str = "auto", exclude: str | Path | None = None) -> list[InputFile]:
    """The files named by ``inputs`` (files, folders searched recursively, globs with ``**``), each
    once, in a stable order. A folder contributes its files with a known suffix (any file when
    ``fmt`` is given), skipping names that start with ``.`` or ``_``, and a folder or glob nothing
    under ``exclude`` (the job's output folder, should it lie inside an input folder)."""
    if fmt != "auto" and fmt not in FORMATS:
        raise BulkInputError(f"unknown input format {fmt!r}; use one of auto, {', '.join(FORMATS)}")
    if not inputs:
        raise BulkInputError("no input given")
    files: dict[str, InputFile] = {}
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                p for p in Path(item).rglob("*")
                if p.is_file() and not p.name.startswith((".", "_")) and (fmt != "auto" or p.suffix.lower() in SUFFIXES)
            )
            if not found:
                raise BulkInputError(f"folder {item} holds no input file (suffixes {', '.join(SUFFIXES)}; or give --format)")
        elif glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                raise BulkInputError(f"{item!r} matches no file")
        elif os.path.isfile(item):
            found = [Path(item)]
        else:
            raise BulkInputError(f"input {item} does not exist")
        if exclude is not None and (os.path.isdir(item) or glob.has_magic(item)):
            skip = Path(exclude).resolve()
            found = [p for p in found if not p.resolve().is_relative_to(skip)]
        for p in found:
            files.setdefault(str(p), InputFile(str(p), fmt if fmt != "auto" else format_of(p)))
    return list(files.values())


def count_lines(path: str | Path) -> int:
    """Newline characters in a file, read in 1 MiB blocks."""
    count = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            count += block.count(b"\n")
    return count


def auto_shard_size(files: Sequence[InputFile]) -> int:
    """A shard size from the number of records alone (so a rerun over the same inputs gets the same
    plan, whatever ``--workers``): one pass over the text files, the Parquet files' footers."""
    total = 0
    for f in files:
        if f.format == "parquet":
            total += int(_parquet_file(f.path).metadata.num_rows)
        else:
            total += count_lines(f.path) + 1
    return max(MIN_SHARD_SIZE, min(MAX_SHARD_SIZE, -(-total // AUTO_SHARDS)))


def plan_shards(files: Sequence[InputFile], shard_size: int, options: ReadOptions) -> Iterator[ShardSpec]:
    """The shards of ``files`` in order, numbered from 0 across files; a shard never spans two files."""
    if shard_size < 1:
        raise BulkInputError(f"shard size must be at least 1, got {shard_size}")
    index = 0
    for f in files:
        spans = _parquet_spans(f, shard_size, options) if f.format == "parquet" else _line_spans(f.path, shard_size)
        for start, stop, first, count in spans:
            yield ShardSpec(index, f.path, os.path.abspath(f.path), f.format, start, stop, first, count)
            index += 1


def _line_spans(path: str, shard_size: int) -> Iterator[tuple[int, int, int, int]]:
    start = offset = count = 0
    first = 1
    with open(path, "rb") as f:
        for line in f:
            offset += len(line)
            count += 1
            if count == shard_size:
                yield start, offset, first, count
                start, first, count = offset, first + count, 0
    if count:
        yield start, offset, first, count


def _parquet_file(path: str) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 (pyarrow raises ArrowInvalid, OSError, ...: all mean "not readable Parquet")
        raise BulkInputError(f"{path} is not a readable Parquet file: {e}") from None


def _parquet_spans(f: InputFile, shard_size: int, options: ReadOptions) -> Iterator[tuple[int, int, int, int]]:
    """Consecutive row groups packed up to ``shard_size`` rows (a larger row group is a shard of its own)."""
    import pyarrow as pa

    pf = _parquet_file(f.path)
    schema = pf.schema_arrow
    if options.text_field not in schema.names:
        raise BulkInputError(f"{f.path} has no column {options.text_field!r} (columns: {', '.join(schema.names)}); name the text column with --text-field")
    kind = schema.field(options.text_field).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type  # a dictionary-encoded column reads as its values
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise BulkInputError(f"{f.path}: column {options.text_field!r} is {kind}, not a string column")
    meta = pf.metadata
    start, rows, first = 0, 0, 1
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if rows and rows + n > shard_size:
            yield start, g, first, rows
            start, first, rows = g, first + rows, 0
        rows += n
    if rows:
        yield start, meta.num_row_groups, first, rows


def read_shard(spec: ShardSpec, options: ReadOptions) -> tuple[list[Document], list[Reject]]:
    """The shard's documents (in input order) and rejects, each record once."""
    docs: list[Document] = []
    rejects: list[Reject] = []
    if spec.format == "parquet":
        records: Iterator[tuple[int, str | None, object]] = _parquet_records(spec, options, rejects)
    else:
        records = _line_records(spec, options, rejects)
    for number, doc_id, text in records:
        if not isinstance(text, str):
            continue  # _line_records already rejected it
        problem = text_problem(text, options.max_chars)
        if problem is not None:
            rejects.append(Reject(spec.source, number, doc_id, problem[0], f"the text {problem[1]}"))
        else:
            docs.append(Document(doc_id if doc_id is not None else f"{spec.source}:{number}", text))
    return docs, rejects


def _lines(spec: ShardSpec) -> Iterator[tuple[int, bytes]]:
    with open(spec.path, "rb") as f:
        f.seek(spec.start)
        for k in range(spec.count):
            line = f.readline()
            if not line:
                raise BulkInputError(f"{spec.source} changed since the job was planned: it ends before line {spec.first + k}")
            if k == 0 and spec.start == 0 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a UTF-8 byte order mark
            if line.endswith(b"\r\n"):
                line = line[:-2]
            elif line.endswith(b"\n"):
                line = line[:-1]
            yield spec.first + k, line


def _line_records(spec: ShardSpec, options: ReadOptions, rejects: list[Reject]) -> Iterator[tuple[int, str | None, object]]:
    """(record number, id or None, text) per line; a line that cannot give a text is rejected here
    and yields None as its text."""
    for number, raw in _lines(spec):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            rejects.append(Reject(spec.source, number, None, "invalid_utf8", f"the line is not valid UTF-8 ({e.reason} at byte {e.start})"))
            continue
        if spec.format == "text":
            yield number, None, line
            continue
        record = _json_record(spec.source, number, line, options, rejects)
        if record is not None:
            yield number, record[0], record[1]


def _json_record(source: str, number: int, line: str, options: ReadOptions, rejects: list[Reject]) -> tuple[str | None, str] | None:
    def reject(reason: str, detail: str, doc_id: str | None = None) -> None:
        rejects.append(Reject(source, number, doc_id, reason, detail))

    try:
        record = json.loads(line)
    except ValueError as e:
        reject("not_json", f"the line is not JSON ({e})" if line.strip() else "the line is blank, not a JSON object")
        return None
    if not isinstance(record, dict):
        reject("not_an_object", f"the line is a JSON {type(record).__name__}, not an object")
        return None
    doc_id = record.get(options.id_field)
    if doc_id is not None:
        if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
            reject("bad_id", f"{options.id_field!r} must be a string or an integer, found {type(doc_id).__name__}")
            return None
        doc_id = str(doc_id)
    if options.text_field not in record or record[options.text_field] is None:
        reject("missing_text", f"the object has no {options.text_field!r} field (keys: {', '.join(sorted(record)) or 'none'})", doc_id)
        return None
    text = record[options.text_field]
    if not isinstance(text, str):
        reject("text_not_a_string", f"{options.text_field!r} is of type {type(text).__name__}, not a string", doc_id)
        return None
    return doc_id, text


def _parquet_records(spec: ShardSpec, options: ReadOptions, rejects: list[Reject]) -> Iterator[tuple[int, str | None, object]]:
    pf = _parquet_file(spec.path)
    columns = [options.text_field] + ([options.id_field] if options.id_field in pf.schema_arrow.names else [])
    table = pf.read_row_groups(list(range(spec.start, spec.stop)), columns=columns)
    texts = table.column(options.text_field).to_pylist()
    ids = table.column(options.id_field).to_pylist() if len(columns) == 2 else [None] * len(texts)
    if len(texts) != spec.count:
        raise BulkInputError(f"{spec.source} changed since the job was planned: row groups {spec.start}-{spec.stop - 1} hold {len(texts)} rows, not {spec.count}")
    for k, (doc_id, text) in enumerate(zip(ids, texts, strict=True)):
        number = spec.first + k
        shown = None if doc_id is None else str(doc_id)
        if text is None:
            rejects.append(Reject(spec.source, number, shown, "missing_text", f"the row's {options.text_field!r} is null"))
            continue
        yield number, shown, text
