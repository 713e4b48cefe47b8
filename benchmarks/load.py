"""Load benchmark: requests/s and p50/p95/p99 latency of POST /tag against a running server on
loopback, driven by wrk (Debian package `wrk`), with persistence on.

    python benchmarks/load.py                       # SQLite and PostgreSQL, concurrency 1/8/32
    python benchmarks/load.py --db sqlite --seconds 5 --concurrency 32
    python benchmarks/load.py --compare             # beside the spaCy wrapper, 1 and 2 workers each
    python benchmarks/load.py --compare --rounds 3  # three times in a row, and the median ratio

For each database it starts `ner serve --workers N` on a fresh database (a SQLite file, or a new
PostgreSQL database on 127.0.0.1:5432), warms it up, runs wrk per (text kind, concurrency), and
prints a Markdown table. With ``--compare`` it runs one sentence per request against this service
(SQLite, persistence on) and against ``benchmarks/spacy_service.py`` (FastAPI + spaCy NER, nothing
stored), each with 1 and 2 worker processes, and prints both side by side with the ratio of each
side's best, and the servers' CPU time per request (all their processes, from /proc: a measure that
other work on the machine barely moves). Nothing here is a test: numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.support: databases and readiness, shared with the tests

from tests.support import fresh_database, wait_ready  # noqa: E402

SENTENCE = "Angela Merkel met Emmanuel Macron in Paris on Tuesday to discuss the European Union budget."
PARAGRAPH_SOURCE = (
    "The European Commission said on Thursday it disagreed with German advice to consumers to shun British lamb until "
    "scientists determine whether mad cow disease can be transmitted to sheep. Germany's representative to the European "
    "Union's veterinary committee Werner Zwingmann said on Wednesday consumers should buy sheepmeat from countries other "
    "than Britain until the scientific advice was clearer. Peter Blackburn reported from Brussels for Reuters. "
)


def paragraph(chars: int = 2000) -> str:
    text = (PARAGRAPH_SOURCE * (chars // len(PARAGRAPH_SOURCE) + 1))[:chars]
    return text[: text.rfind(" ")]


def run_wrk(url: str, body_file: str, concurrency: int, seconds: int) -> dict:
    env = {**os.environ, "BODY_FILE": body_file}
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "10s", "-s", str(ROOT / "benchmarks" / "tag.lua"), url + "/tag"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU time of the live processes of a process group (the server and its
    workers), from /proc: unlike wall-clock rates, it barely moves when other work shares the CPU."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        if int(fields[2]) == pgid:  # fields after the command: state, ppid, pgrp, ...
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def start_server(cmd: list[str], env: dict, base: str) -> subprocess.Popen:
    server = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True)
    try:
        wait_ready(base, server, timeout=120)
    except BaseException:
        stop_server(server)
        raise
    return server


def stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(30)


def _workers(row: dict) -> str:
    return f"{row['workers']} worker{'s' if row['workers'] > 1 else ''}"


def compare(args, tmp: Path, body: Path) -> int:
    """This service (SQLite, storage on) beside the spaCy wrapper, best of 1 and 2 workers each;
    with ``--rounds N`` the whole comparison N times in a row, and the median of the rounds' ratios
    (runs minutes apart move each side by up to ±10 %, so one round's ratio is noisy)."""
    concurrency = args.concurrency if args.concurrency_given else [1, 32]
    base = f"http://127.0.0.1:{args.port}"
    sides = ("this service", "spaCy wrapper")
    rows = []
    for rnd in range(1, args.rounds + 1):
        for side in sides:
            for workers in args.workers_list:
                rows.extend(_compare_server(args, tmp, body, base, side, workers, concurrency, rnd))

    print(f"\nPOST /tag, one sentence ({len(SENTENCE.split())} words), wrk -t1, {args.seconds} s per row; this service on SQLite with "
          "persistence on, the spaCy wrapper stores nothing\n")
    print("| round | service | workers | concurrency | requests/s | p50 ms | p95 ms | p99 ms | server CPU ms per request | non-2xx |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['round']} | {r['side']} | {r['workers']} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} "
              f"| {r['cpu_ms']:.2f} | {r['non2xx']} |")
    print("\n| round | concurrency | this service, best | spaCy wrapper, best | ratio (requests/s) |")
    print("|---|---|---|---|---|")
    ratios: dict[int, list[float]] = {c: [] for c in concurrency}
    for rnd in range(1, args.rounds + 1):
        for c in concurrency:
            best = {side: max((r for r in rows if r["round"] == rnd and r["side"] == side and r["concurrency"] == c), key=lambda r: r["rps"]) for side in sides}
            ours, peer = best["this service"], best["spaCy wrapper"]
            ratios[c].append(ours["rps"] / peer["rps"])
            print(f"| {rnd} | {c} | {ours['rps']:.0f}/s, p50 {ours['p50_ms']:.1f} ms, p99 {ours['p99_ms']:.1f} ms ({_workers(ours)}) "
                  f"| {peer['rps']:.0f}/s, p50 {peer['p50_ms']:.1f} ms, p99 {peer['p99_ms']:.1f} ms ({_workers(peer)}) | {ratios[c][-1]:.2f}x |")
    if args.rounds > 1:
        print("\n| concurrency | ratio per round | median ratio |")
        print("|---|---|---|")
        for c in concurrency:
            print(f"| {c} | {', '.join(f'{x:.2f}x' for x in ratios[c])} | {statistics.median(ratios[c]):.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _compare_server(args, tmp: Path, body: Path, base: str, side: str, workers: int, concurrency: list[int], rnd: int) -> list[dict]:
    """Start one side with ``workers`` processes, warm it up, one wrk row per concurrency."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if side == "this service":
        env["DATABASE_URL"] = f"sqlite:///{tmp / f'compare-{workers}-{rnd}.db'}"
        if args.model:
            env["NER_MODEL"] = args.model
        subprocess.run([sys.executable, "-m", "service.cli", "db", "upgrade"], env=env, check=True, cwd=ROOT, capture_output=True)
        cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(args.port), "--workers", str(workers), "--log-level", "warning"]
    else:
        cmd = [sys.executable, "-m", "uvicorn", "benchmarks.spacy_service:create_app", "--factory", "--port", str(args.port),
               "--workers", str(workers), "--log-level", "warning", "--no-access-log"]
    rows = []
    server = start_server(cmd, env, base)
    try:
        if workers > 1:
            time.sleep(5)  # /readyz answered from one worker; let the others finish loading too
        run_wrk(base, str(body), 8, 3)  # warm-up
        for c in concurrency:
            cpu = group_cpu_seconds(server.pid)
            r = run_wrk(base, str(body), c, args.seconds)
            r["cpu_ms"] = 1000 * (group_cpu_seconds(server.pid) - cpu) / max(1, r["requests"])
            rows.append({"round": rnd, "side": side, "workers": workers, "concurrency": c, **r})
            print(f"round {rnd} {side:14s} workers={workers} c={c:<3d} {r['rps']:8.1f} req/s  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
                  f"CPU {r['cpu_ms']:.2f} ms/request  non-2xx {r['non2xx']}", file=sys.stderr)
    finally:
        stop_server(server)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    p.add_argument("--concurrency", type=int, nargs="+", default=None, help="default 1 8 32 (with --compare: 1 32)")
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--port", type=int, default=8731)
    p.add_argument("--model", help="model folder (default: the bundled one)")
    p.add_argument("--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--compare", action="store_true", help="this service (SQLite) beside benchmarks/spacy_service.py, one sentence")
    p.add_argument("--workers-list", type=int, nargs="+", default=[1, 2], help="with --compare: worker counts tried on each side")
    p.add_argument("--rounds", type=int, default=1, help="with --compare: the whole comparison this many times in a row, and the median ratio")
    args = p.parse_args()
    args.concurrency_given = args.concurrency is not None
    if args.concurrency is None:
        args.concurrency = [1, 8, 32]
    if shutil.which("wrk") is None:
        print("error: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="ner-bench-"))
    try:
        bodies = {"sentence": tmp / "sentence.json", "2000 chars": tmp / "paragraph.json"}
        bodies["sentence"].write_text(json.dumps({"text": SENTENCE}))
        bodies["2000 chars"].write_text(json.dumps({"text": paragraph()}))
        if args.compare:
            return compare(args, tmp, bodies["sentence"])
        return table(args, tmp, bodies)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def table(args, tmp: Path, bodies: dict[str, Path]) -> int:
    """Requests/s and latency of /tag per database, text size and concurrency (the default run)."""
    rows = []
    for db in (["sqlite", "postgres"] if args.db == "both" else [args.db]):
        with contextlib.ExitStack() as stack:
            url = f"sqlite:///{tmp / 'bench.db'}" if db == "sqlite" else stack.enter_context(fresh_database("ner_bench", args.pg_admin_url))
            rows += measure(args, db, url, bodies)

    print(f"\nPOST /tag, persistence on, `ner serve --workers {args.workers}`, wrk -t1, {args.seconds} s per row\n")
    print("| database | text | concurrency | requests/s | p50 ms | p95 ms | p99 ms | non-2xx |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['db']} | {r['text']} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['non2xx']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def measure(args, db: str, url: str, bodies: dict[str, Path]) -> list[dict]:
    """One database: migrate, serve, then wrk for each body and concurrency."""
    env = {**os.environ, "DATABASE_URL": url}
    if args.model:
        env["NER_MODEL"] = args.model
    subprocess.run([sys.executable, "-m", "service.cli", "db", "upgrade"], env=env, check=True, cwd=ROOT, capture_output=True)
    base = f"http://127.0.0.1:{args.port}"
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(args.port), "--workers", str(args.workers), "--log-level", "warning"]
    server = start_server(cmd, env, base)
    rows = []
    try:
        for kind, body in bodies.items():
            run_wrk(base, str(body), 8, 2)  # warm-up
            for c in args.concurrency:
                r = run_wrk(base, str(body), c, args.seconds)
                rows.append({"db": db, "text": kind, "concurrency": c, **r})
                print(f"{db:8s} {kind:10s} c={c:<3d} {r['rps']:8.1f} req/s  p50 {r['p50_ms']:7.1f} ms  p95 {r['p95_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  non-2xx {r['non2xx']}", file=sys.stderr)
    finally:
        stop_server(server)
    return rows


if __name__ == "__main__":
    sys.exit(main())
