"""ner bulk (ml.bulk): readers, rejects, the output folder, resuming, the local engine."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from ml.bulk.driver import run_job
from ml.bulk.job import BulkError, BulkJob, ShardWorker
from ml.bulk.output import OutputError, OutputFolder, atomic_write, read_rejects, read_rows
from ml.bulk.progress import Progress
from ml.bulk.sources import BulkInputError, ReadOptions, RejectedRecord, expand_inputs, plan_shards, read_shard

TEXTS = ["Anna Berg visited Paris .", "Globex hired Tom yesterday .", "nothing happened today .", "Olga works for Initech in Oslo .",
         "Chen Wei and Maria Lopez met .", "the office of Red Cross is in Lagos ."]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict, row_group_size: int = 2) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def job(tmp_path: Path, model: Path, inputs: list, **kw) -> BulkJob:
    return BulkJob(tuple(str(p) for p in inputs), str(kw.pop("out", tmp_path / "out")), str(model), **kw)


def run(j: BulkJob, workers: int = 1, **kw) -> dict:
    return run_job(j, workers=workers, progress=False, **kw)


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    """The six texts as a text file, a JSONL file with ids and a Parquet file with ids, in a folder tree."""
    root = tmp_path / "corpus"
    write_lines(root / "a.txt", TEXTS[:2])
    write_lines(root / "sub" / "b.jsonl", [json.dumps({"id": f"b{i}", "text": t}) for i, t in enumerate(TEXTS[2:4])])
    write_parquet(root / "sub" / "c.parquet", {"id": ["c0", "c1"], "text": TEXTS[4:]}, row_group_size=1)
    (root / "_notes.txt").write_text("skipped: starts with _\n")
    (root / "README.md").write_text("skipped: unknown suffix\n")
    return root


def test_folders_globs_and_files_expand_once_in_order(corpus_dir):
    files = expand_inputs([str(corpus_dir), str(corpus_dir / "**" / "*.jsonl"), str(corpus_dir / "a.txt")])
    assert [(Path(f.path).relative_to(corpus_dir).as_posix(), f.format) for f in files] == [
        ("a.txt", "text"), ("sub/b.jsonl", "jsonl"), ("sub/c.parquet", "parquet")]
    with pytest.raises(BulkInputError, match="matches no file"):
        expand_inputs([str(corpus_dir / "*.csv")])
    with pytest.raises(BulkInputError, match="does not exist"):
        expand_inputs([str(corpus_dir / "missing.txt")])


def test_all_three_formats_are_read_with_their_ids(tmp_path, small_model_dir, corpus_dir):
    summary = run(job(tmp_path, small_model_dir, [corpus_dir], shard_size=1))
    rows = read_rows(tmp_path / "out")
    assert [r["id"] for r in rows] == [f"{corpus_dir}/a.txt:1", f"{corpus_dir}/a.txt:2", "b0", "b1", "c0", "c1"]
    assert summary["documents"] == 6 and summary["rejects"] == 0
    assert summary["shards"] == 6  # one line / one row group each
    assert {r["model_name"] for r in rows} == {"small"} and {r["model_version"] for r in rows} == {"1.0.0"}
    # every entity's text is the text at its offsets
    for row, text in zip(rows, TEXTS, strict=True):
        assert all(text[e["start"] : e["end"]] == e["text"] for e in row["entities"])
    assert [e["text"] for e in rows[0]["entities"]] == ["Anna Berg", "Paris"]


def test_output_folder_reads_as_one_parquet_dataset(tmp_path, small_model_dir, corpus_dir):
    import pyarrow.parquet as pq

    bad = write_lines(tmp_path / "bad.jsonl", ["not json"])
    run(job(tmp_path, small_model_dir, [corpus_dir / "a.txt", bad], shard_size=1))
    table = pq.read_table(tmp_path / "out")  # _job.json, _rejects/ and _summary.json are not read
    assert table.num_rows == 2
    assert table.column_names == ["id", "entities", "min_score", "model_name", "model_version"]


def test_bad_records_are_rejected_with_their_reason_and_the_rest_tagged(tmp_path, small_model_dir):
    jsonl = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"id": 1, "text": TEXTS[0]}),
        "{not json",
        "",
        json.dumps(["a", "list"]),
        json.dumps({"id": 4, "body": "no text field"}),
        json.dumps({"id": 5, "text": 17}),
        json.dumps({"id": 6, "text": "   "}),
        json.dumps({"id": 7, "text": "x" * 101}),
        json.dumps({"id": 8, "text": "NUL \u0000 inside"}),
        json.dumps({"id": 9, "text": "lone \ud800 surrogate"}),
        json.dumps({"id": [9], "text": "an id that is a list"}),
        json.dumps({"id": 11, "text": TEXTS[1]}),
    ]
    write_lines(jsonl, lines)
    with open(jsonl, "ab") as f:
        f.write(b"caf\xe9 is latin-1\n")
    summary = run(job(tmp_path, small_model_dir, [jsonl], options=ReadOptions(max_chars=100), shard_size=5))
    rejects = read_rejects(tmp_path / "out")
    assert [(r["record"], r["reason"]) for r in rejects] == [
        (2, "not_json"), (3, "not_json"), (4, "not_an_object"), (5, "missing_text"), (6, "text_not_a_string"), (7, "empty_text"),
        (8, "text_too_long"), (9, "invalid_character"), (10, "invalid_character"), (11, "bad_id"), (13, "invalid_utf8")]
    assert all(r["source"] == str(jsonl) and r["detail"] for r in rejects)
    assert rejects[3]["id"] == "4"  # the id is kept where the record had one
    assert [r["id"] for r in read_rows(tmp_path / "out")] == ["1", "11"]
    assert summary["documents"] + summary["rejects"] == len(lines) + 1


def test_blank_and_over_long_lines_of_a_text_file_are_rejects_not_dropped(tmp_path, small_model_dir):
    path = write_lines(tmp_path / "in.txt", [TEXTS[0], "", "y" * 50, TEXTS[1]])
    run(job(tmp_path, small_model_dir, [path], options=ReadOptions(max_chars=40)))
    assert [(r["record"], r["reason"]) for r in read_rejects(tmp_path / "out")] == [(2, "empty_text"), (3, "text_too_long")]
    assert [r["id"] for r in read_rows(tmp_path / "out")] == [f"{path}:1", f"{path}:4"]


def test_strict_stops_at_the_first_reject(tmp_path, small_model_dir):
    path = write_lines(tmp_path / "in.jsonl", [json.dumps({"text": TEXTS[0]}), json.dumps({"txt": "x"})])
    with pytest.raises(RejectedRecord, match=r"in.jsonl:2: .*no 'text' field"):
        run(job(tmp_path, small_model_dir, [path], strict=True))
    with pytest.raises(RejectedRecord, match=r"in.jsonl:2: .*no 'text' field"):  # raised in a worker process
        run(job(tmp_path, small_model_dir, [path], strict=True, shard_size=1, out=tmp_path / "two"), workers=2)
    assert not list((tmp_path / "out").glob("part-*"))


def test_parquet_without_the_text_column_fails_before_tagging(tmp_path, small_model_dir):
    path = write_parquet(tmp_path / "in.parquet", {"body": ["x"]})
    with pytest.raises(BulkInputError, match=r"no column 'text'.*--text-field"):
        run(job(tmp_path, small_model_dir, [path]))
    nulls = write_parquet(tmp_path / "n.parquet", {"text": [TEXTS[0], None]})
    run(job(tmp_path, small_model_dir, [nulls], out=tmp_path / "n"))
    assert [(r["record"], r["reason"]) for r in read_rejects(tmp_path / "n")] == [(2, "missing_text")]


def test_parquet_shards_are_whole_row_groups(tmp_path):
    path = write_parquet(tmp_path / "in.parquet", {"text": [f"t{i}" for i in range(7)]}, row_group_size=2)
    files = expand_inputs([str(path)])
    specs = list(plan_shards(files, 3, ReadOptions()))
    assert [(s.start, s.stop, s.first, s.count) for s in specs] == [(0, 1, 1, 2), (1, 2, 3, 2), (2, 4, 5, 3)]
    specs = list(plan_shards(files, 4, ReadOptions()))
    assert [(s.first, s.count) for s in specs] == [(1, 4), (5, 3)]
    assert [d.text for s in specs for d in read_shard(s, ReadOptions())[0]] == [f"t{i}" for i in range(7)]


def test_text_shards_cut_every_shard_size_lines(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(b"\xef\xbb\xbfone\r\ntwo\nthree\nfour\nfive")  # BOM, CRLF, no final newline
    specs = list(plan_shards(expand_inputs([str(path)]), 2, ReadOptions()))
    assert [(s.first, s.count) for s in specs] == [(1, 2), (3, 2), (5, 1)]
    assert [(d.id, d.text) for s in specs for d in read_shard(s, ReadOptions())[0]] == [
        (f"{path}:1", "one"), (f"{path}:2", "two"), (f"{path}:3", "three"), (f"{path}:4", "four"), (f"{path}:5", "five")]


def test_a_rerun_skips_complete_shards_and_redoes_missing_ones(tmp_path, small_model_dir):
    path = write_lines(tmp_path / "in.txt", TEXTS * 3)
    j = job(tmp_path, small_model_dir, [path], shard_size=4)
    first = run(j)
    assert first["shards"] == first["shards_run"] == 5
    before = read_rows(tmp_path / "out")
    parts = sorted((tmp_path / "out").glob("part-*.parquet"))
    inodes = {p.name: p.stat().st_ino for p in parts}
    parts[2].unlink()
    second = run(j)
    assert second["shards_run"] == 1 and second["documents"] == len(TEXTS) * 3
    after = sorted((tmp_path / "out").glob("part-*.parquet"))
    assert [p.name for p in after] == [p.name for p in parts]
    assert {p.name: p.stat().st_ino for p in after if p.name != parts[2].name} == {k: v for k, v in inodes.items() if k != parts[2].name}
    assert read_rows(tmp_path / "out") == before
    assert run(j)["shards_run"] == 0


def test_an_interrupted_write_leaves_no_partial_shard_file(tmp_path, small_model_dir, monkeypatch):
    path = write_lines(tmp_path / "in.txt", TEXTS)
    j = job(tmp_path, small_model_dir, [path], shard_size=2, output_format="jsonl")
    out = tmp_path / "out"
    real = OutputFolder.write_shard

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text('{"id": "the first row only"}\n')
        raise ZeroDivisionError("the writer fails half-way")

    def crash_on_second(self, spec, rows, rejects):
        if spec.index == 1:
            atomic_write(self.shard_path(spec), half_then_fail)
        real(self, spec, rows, rejects)

    monkeypatch.setattr(OutputFolder, "write_shard", crash_on_second)
    with pytest.raises(ZeroDivisionError):
        run(j)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("part-")) == ["part-00000.jsonl"]
    # a killed writer leaves its temporary file behind: never taken for a shard, removed by the rerun
    (out / ".part-00001.jsonl.999.deadbeef.tmp").write_text('{"id": "half"}\n')
    monkeypatch.setattr(OutputFolder, "write_shard", real)
    summary = run(j)
    assert summary["shards_run"] == 2 and summary["documents"] == len(TEXTS)
    assert not list(out.glob(".*.tmp"))
    assert [r["id"] for r in read_rows(out)] == [f"{path}:{i}" for i in range(1, 7)]


def test_another_job_into_the_same_folder_is_refused(tmp_path, small_model_dir):
    path = write_lines(tmp_path / "in.txt", TEXTS)
    run(job(tmp_path, small_model_dir, [path], shard_size=2))
    with pytest.raises(OutputError, match=r"another job.*shard_size was 2, now 3"):
        run(job(tmp_path, small_model_dir, [path], shard_size=3))
    write_lines(path, [*TEXTS, "one more line"])
    with pytest.raises(OutputError, match="the inputs changed"):
        run(job(tmp_path, small_model_dir, [path], shard_size=2))
    with OutputFolder(tmp_path / "out").locked(), pytest.raises(OutputError, match="in use by another"):
        run(job(tmp_path, small_model_dir, [path], shard_size=2))


def test_workers_give_the_same_rows_as_one_process(tmp_path, small_model_dir):
    path = write_lines(tmp_path / "in.txt", TEXTS * 4)
    one = run(job(tmp_path, small_model_dir, [path], shard_size=5, out=tmp_path / "one"), workers=1)
    two = run(job(tmp_path, small_model_dir, [path], shard_size=5, out=tmp_path / "two"), workers=2)
    assert one["documents"] == two["documents"] == len(TEXTS) * 4
    assert read_rows(tmp_path / "one") == read_rows(tmp_path / "two")


def test_a_dead_worker_stops_the_job_and_a_rerun_completes_it(tmp_path, small_model_dir, monkeypatch):
    path = write_lines(tmp_path / "in.txt", TEXTS * 2)
    j = job(tmp_path, small_model_dir, [path], shard_size=3)
    real = ShardWorker.run

    def die_on_shard_2(self, spec, on_batch=None):
        if spec.index == 2:
            os._exit(9)  # the forked worker inherits this patch: killed mid-job
        return real(self, spec, on_batch)

    monkeypatch.setattr(ShardWorker, "run", die_on_shard_2)
    with pytest.raises(BulkError, match=r"worker process died.*run the same command again"):
        run(j, workers=2)
    monkeypatch.setattr(ShardWorker, "run", real)
    summary = run(j, workers=2)
    assert summary["documents"] == len(TEXTS) * 2
    ids = [r["id"] for r in read_rows(tmp_path / "out")]
    assert ids == [f"{path}:{i}" for i in range(1, 13)]  # each document once


def test_progress_writes_log_lines_when_not_a_terminal():
    stream = io.StringIO()
    progress = Progress(10, 2, stream=stream, interval_s=0)
    progress.add(4, 100, 1)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("bulk: 6/10 documents (60%)") and "tokens/s, 1 rejects" in lines[0] and "s left" in lines[0]
    assert lines[-1].startswith("bulk: 6/10 documents") and lines[-1].endswith("(stopped)")
    stream = io.StringIO()
    progress = Progress(3, 1, stream=stream, interval_s=3600)
    progress.add(2, 10)
    progress.close()
    assert stream.getvalue().splitlines() == [stream.getvalue().splitlines()[0]] and stream.getvalue().rstrip().endswith("(done)")


def test_cli_bulk_writes_jsonl_and_prints_the_summary(tmp_path, small_model_dir, capsys):
    from ml.cli import main

    path = write_lines(tmp_path / "in.txt", TEXTS[:3])
    out = tmp_path / "out"
    code = main(["bulk", str(path), "--out", str(out), "--model", str(small_model_dir), "--output-format", "jsonl", "--workers", "1", "--quiet"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["documents"] == 3 and summary["model"] == {"name": "small", "version": "1.0.0"}
    assert [json.loads(line)["id"] for line in (out / "part-00000.jsonl").read_text().splitlines()] == [f"{path}:{i}" for i in (1, 2, 3)]
    assert main(["bulk", str(tmp_path / "nothing.txt"), "--out", str(out), "--model", str(small_model_dir)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bulk", str(path), "--out", str(tmp_path / "s"), "--model", str(small_model_dir), "--strict", "--max-chars", "5", "--quiet"]) == 2
    assert "text_too_long" in capsys.readouterr().err


def test_the_automatic_shard_size_depends_on_the_inputs_alone(tmp_path, small_model_dir):
    from ml.bulk.sources import MAX_SHARD_SIZE, MIN_SHARD_SIZE, auto_shard_size

    small = write_lines(tmp_path / "small.txt", ["x"] * 250)
    assert auto_shard_size(expand_inputs([str(small)])) == MIN_SHARD_SIZE
    big = write_parquet(tmp_path / "big.parquet", {"text": ["x"] * (64 * MAX_SHARD_SIZE + 1)}, row_group_size=64 * MAX_SHARD_SIZE + 1)
    assert auto_shard_size(expand_inputs([str(big)])) == MAX_SHARD_SIZE
    middle = write_lines(tmp_path / "middle.txt", ["x"] * (64 * 300 - 1))  # with the count's +1 per file: 300 a shard
    assert auto_shard_size(expand_inputs([str(middle)])) == 300
    summary = run(job(tmp_path, small_model_dir, [small]), workers=2)
    assert summary["shards"] == 3 and json.loads((tmp_path / "out" / "_job.json").read_text())["shard_size"] == MIN_SHARD_SIZE


def test_engine_ray_without_ray_installed_says_what_to_install(tmp_path, small_model_dir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    path = write_lines(tmp_path / "in.txt", TEXTS[:1])
    with pytest.raises(BulkError, match=r"pip install '\.\[ray\]'"):
        run(job(tmp_path, small_model_dir, [path]), engine="ray")


def test_an_output_folder_inside_the_input_folder_is_not_read_back(tmp_path, small_model_dir):
    import pyarrow as pa

    root = tmp_path / "corpus"
    write_lines(root / "a.txt", TEXTS[:2])
    write_parquet(root / "d.parquet", {"text": pa.array(TEXTS[2:4]).dictionary_encode()})  # a dictionary-encoded text column
    j = job(tmp_path, small_model_dir, [root], out=root / "tagged")
    assert run(j)["documents"] == 4
    assert run(j)["shards_run"] == 0  # its own part files did not become inputs


def test_an_empty_input_is_a_job_of_no_documents(tmp_path, small_model_dir):
    path = tmp_path / "empty.txt"
    path.write_text("")
    summary = run(job(tmp_path, small_model_dir, [path]))
    assert (summary["shards"], summary["documents"], summary["rejects"]) == (0, 0, 0)
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["documents"] == 0
