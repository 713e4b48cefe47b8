"""Bulk tagging speed and memory: ``ner bulk`` on one process, ``--engine local`` with N workers,
``--engine ray`` with N actors, and spaCy's ``nlp.pipe(n_process=N)``, on the same texts.

    python benchmarks/bulk.py                                  # CoNLL dev articles x 10, every run
    python benchmarks/bulk.py --repeat 40 --workers 2 --runs one local ray spacy
    python benchmarks/bulk.py --repeat 1 --runs one local      # a quick check that it runs

The texts are the CoNLL-2003 dev articles (tokens joined by spaces, one article a document, the set
``--repeat`` times with new ids), written as one JSONL file. Each run is its own process (``python -m
ml bulk ... --quiet``, default shard size, OMP_NUM_THREADS=1; one process means ``--workers 1``, which
tags in the process itself on one torch thread), timed from start to exit; ``startup`` is the same command
on a one-document input, and the rates are taken over the time beyond it (so loading the model and
starting Ray count once, not per document). While a run goes, the memory of its processes is sampled
from /proc every 0.2 s: peak RSS and PSS (proportional set size: a page shared by k processes counts
1/k in each, so shared model weights are not counted twice) per worker, and the peak total PSS of all
its processes. "added per extra process" is (total PSS with N workers - total PSS of one process) / N.

The spaCy peer is ``benchmarks.spacy_service.spacy_peer()``: spaCy's ``--optimize efficiency`` NER
pipeline with the four CoNLL labels and untrained weights (no trained ``en_core_web_sm`` package is on
PyPI; untrained weights run at the speed of trained ones), ``nlp.pipe(texts, batch_size=64,
n_process=N)`` timed in its own process, startup excluded. Tokens are counted once with the project's
tokenizer for every row. Nothing here is a test: numbers depend on the machine and on what else runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "conll2003" / "dev.txt"
RUNS = ("one", "local", "ray", "spacy")


def corpus(path: Path, repeat: int) -> list[dict]:
    from ml.data.conll import read_conll

    articles: dict[int, list[str]] = {}
    for s in read_conll(path):
        articles.setdefault(int(s.doc_id or 0), []).extend(s.tokens)
    return [{"id": f"{r}-{d}", "text": " ".join(tokens)} for r in range(repeat) for d, tokens in sorted(articles.items())]


def count_tokens(texts: list[str]) -> int:
    from ml.data.tokenizer import get_tokenizer

    tokenizer = get_tokenizer("en")
    return sum(len(tokenizer.tokenize(t)) for t in texts)


def _memory(pid: int) -> tuple[int, int] | None:
    """(RSS, PSS) in bytes of a live process, from /proc/PID/smaps_rollup."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return None
    values = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines[1:] if line.split()[-1] == "kB"}
    return values.get("Rss", 0), values.get("Pss", 0)


def _tree() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            out[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    return out


@dataclass
class Sampler:
    """Peak memory of a process and its descendants while it runs, per process and in total."""

    root: int
    worker_marker: str  # a worker is a descendant whose command line holds this ("": a child of the root)
    peak: dict[int, tuple[int, int]] = field(default_factory=dict)
    total_pss: int = 0
    workers: set[int] = field(default_factory=set)
    stop: threading.Event = field(default_factory=threading.Event)

    def is_worker(self, pid: int, tree: dict[int, tuple[int, str]]) -> bool:
        parent, cmd = tree.get(pid, (0, ""))
        if self.worker_marker:
            return self.worker_marker in cmd
        return parent == self.root and "resource_tracker" not in cmd  # multiprocessing's helper is no worker

    def run(self) -> None:
        while not self.stop.is_set():
            tree = _tree()
            members = {self.root}
            for _ in range(6):  # descendants, a few generations deep (Ray: driver -> raylet -> workers)
                members |= {pid for pid, (parent, _) in tree.items() if parent in members}
            total = 0
            for pid in members:
                mem = _memory(pid)
                if mem is None:
                    continue
                total += mem[1]
                old = self.peak.get(pid, (0, 0))
                self.peak[pid] = (max(old[0], mem[0]), max(old[1], mem[1]))
                if self.is_worker(pid, tree):
                    self.workers.add(pid)
            self.total_pss = max(self.total_pss, total)
            self.stop.wait(0.2)


def measured(command: list[str], worker_marker: str) -> tuple[float, Sampler, str]:
    """Run ``command``; its wall time, its memory sampler and its standard output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    sampler = Sampler(process.pid, worker_marker)
    thread = threading.Thread(target=sampler.run, daemon=True)
    thread.start()
    out, _ = process.communicate()
    seconds = time.perf_counter() - started
    sampler.stop.set()
    thread.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {process.returncode}")
    return seconds, sampler, out


def bulk_command(inp: Path, out: Path, model: str, engine: str, workers: int) -> list[str]:
    return [sys.executable, "-m", "ml", "bulk", str(inp), "--out", str(out), "--model", model, "--engine", engine,
            "--workers", str(workers), "--quiet"]  # the default shard size, as a user gets it


def spacy_worker(inp: Path, processes: int) -> None:
    """Run inside the child process: the spaCy peer over the texts; prints the pipe's seconds."""
    from benchmarks.spacy_service import spacy_peer

    texts = [json.loads(line)["text"] for line in inp.read_text(encoding="utf-8").splitlines()]
    nlp = spacy_peer()
    started = time.perf_counter()
    entities = sum(len(doc.ents) for doc in nlp.pipe(texts, batch_size=64, n_process=processes))
    print(json.dumps({"seconds": time.perf_counter() - started, "entities": entities}))


@dataclass
class Row:
    name: str
    processes: int
    seconds: float  # the work beyond startup
    wall: float
    startup: float
    sampler: Sampler


def run_bulk(name: str, work: Path, big: Path, tiny: Path, model: str, engine: str, workers: int) -> Row:
    marker = {"ray": "ShardTagger", "local": ""}.get(engine, "")
    startup, _, _ = measured(bulk_command(tiny, work / f"{name}-tiny", model, engine, workers), marker)
    wall, sampler, _ = measured(bulk_command(big, work / name, model, engine, workers), marker)
    if engine == "local" and workers == 1:
        sampler.workers = {sampler.root}  # the one process tags in itself
    return Row(name, workers, max(wall - startup, 1e-9), wall, startup, sampler)


def run_spacy(big: Path, workers: int) -> Row:
    wall, sampler, out = measured([sys.executable, str(Path(__file__).resolve()), "--spacy-worker", str(big), "--workers", str(workers)], "")
    seconds = json.loads(out.strip().splitlines()[-1])["seconds"]
    return Row(f"spaCy nlp.pipe(n_process={workers})", workers, seconds, wall, wall - seconds, sampler)


def table(rows: list[Row], documents: int, tokens: int) -> str:
    mb = 1 << 20
    base = next((r for r in rows if r.name == "one process"), None)
    lines = ["| run | processes | documents/s | tokens/s | × one process | wall s (startup s) | peak RSS / worker MB | peak PSS / worker MB | peak total PSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        peaks = [r.sampler.peak[p] for p in r.sampler.workers if p in r.sampler.peak]
        rss = max((p[0] for p in peaks), default=0) / mb
        pss = max((p[1] for p in peaks), default=0) / mb
        ratio = f"{base.seconds / r.seconds:.2f}" if base is not None else "-"
        lines.append(f"| {r.name} | {r.processes} | {documents / r.seconds:,.0f} | {tokens / r.seconds:,.0f} | {ratio} | {r.wall:.1f} ({r.startup:.1f}) "
                     f"| {rss:,.0f} | {pss:,.0f} | {r.sampler.total_pss / mb:,.0f} |")
    local = next((r for r in rows if r.name.startswith("--engine local")), None)
    if base is not None and local is not None:
        added = (local.sampler.total_pss - base.sampler.total_pss) / local.processes / mb
        lines.append(f"\nadded per extra process (--engine local, PSS): {added:,.0f} MB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CoNLL file whose articles are the documents")
    parser.add_argument("--repeat", type=int, default=10, help="copies of the articles (CoNLL dev: 216 articles, about 51k tokens a copy)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--model", default=str(ROOT / "models" / "en-conll03"))
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--spacy-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.spacy_worker is not None:
        spacy_worker(args.spacy_worker, args.workers)
        return
    docs = corpus(args.data, args.repeat)
    tokens = count_tokens([d["text"] for d in docs])
    with tempfile.TemporaryDirectory(prefix="bench-bulk-") as tmp:
        work = Path(tmp)
        big, tiny = work / "corpus.jsonl", work / "tiny.jsonl"
        big.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
        tiny.write_text(json.dumps(docs[0]) + "\n", encoding="utf-8")
        print(f"{len(docs)} documents, {tokens:,} tokens; {args.workers} workers; {os.cpu_count()} cores", file=sys.stderr)
        rows = []
        for run in args.runs:
            print(f"running: {run}", file=sys.stderr)
            if run == "one":
                rows.append(run_bulk("one process", work, big, tiny, args.model, "local", 1))
            elif run == "local":
                rows.append(run_bulk(f"--engine local --workers {args.workers}", work, big, tiny, args.model, "local", args.workers))
            elif run == "ray":
                rows.append(run_bulk(f"--engine ray --workers {args.workers}", work, big, tiny, args.model, "ray", args.workers))
            else:
                rows.append(run_spacy(big, args.workers))
    print(table(rows, len(docs), tokens))


if __name__ == "__main__":
    main()
