"""Memory of `ner serve --workers N`: what each worker beyond the first adds (PSS, from /proc).

    python benchmarks/memory.py                      # --workers 1, 2 and 3, the word table mapped
    python benchmarks/memory.py --workers 1 2 --compare-private   # and again with MODEL_CACHE_DIR=off

For each N it starts the service on a free port with a fresh SQLite database and a fresh model cache
folder, waits until every worker has started its application (uvicorn's "Application startup complete", after the model is loaded), sends a few
/tag requests (each on a new connection, so they spread over the workers), and reads each process's
smaps_rollup: PSS (shared pages divided among the processes that map them; the sum over processes is
what the service costs the machine), RSS and Private_Dirty. The table gives the total PSS of the
service (supervisor and workers), the PSS of each worker, and the total's increase per added worker.
Memory is not a timing: a busy machine changes it little. Nothing here is a test.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.support: free ports and readiness, shared with the tests

from tests.support import free_port, wait_ready, wait_until  # noqa: E402

TEXTS = ["Angela Merkel met Emmanuel Macron in Paris on Tuesday.", "The European Commission disagreed with German advice on British lamb.",
         "Shares of Apple Inc. rose 3 % in New York after the results.", "Ronaldo scored twice as Real Madrid beat Barcelona 3-1 at the Bernabeu."]
FIELDS = ("Pss", "Rss", "Private_Dirty")


def rollup(pid: int) -> dict[str, int]:
    """MB of each of FIELDS for one process (smaps_rollup, Linux 4.14+)."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split()[:2]
        if name.rstrip(":") in FIELDS:
            values[name.rstrip(":")] = int(value) // 1024
    return values


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s children (the supervisor's: its workers; the kernel's own list)."""
    return sorted(int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())


def role(pid: int) -> str:
    """"worker", or "helper" for multiprocessing's resource tracker (started beside spawned workers)."""
    return "helper" if b"resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes() else "worker"


def measure(workers: int, tmp: Path, requests: int, mapped: bool, model: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(DATABASE_URL=f"sqlite:///{tmp / f'memory-{workers}-{mapped}.db'}", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               MODEL_CACHE_DIR=str(tmp / "model-cache") if mapped else "off")
    if model:
        env["NER_MODEL"] = model
    subprocess.run([sys.executable, "-m", "service.cli", "db", "upgrade"], env=env, cwd=ROOT, check=True, capture_output=True)
    port = free_port()
    log = tmp / f"serve-{workers}-{mapped}.log"
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--workers", str(workers), "--log-level", "info"]
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, server, timeout=300, details=lambda: log.read_text()[-2000:])
        wait_until(lambda: log.read_text().count("Application startup complete") >= workers, timeout=300, what=f"{workers} workers loading the model", interval=0.5, process=server)
        for i in range(requests):  # a new connection each: the kernel spreads them over the workers
            response = httpx.post(base + "/tag", json={"text": TEXTS[i % len(TEXTS)]}, timeout=60)
            response.raise_for_status()
        time.sleep(1.0)
        pids = children(server.pid) if workers > 1 else []
        processes = {"supervisor" if pids else "worker": rollup(server.pid)} | {f"{role(pid)} {n}": rollup(pid) for n, pid in enumerate(pids, 1)}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
    return {"workers": workers, "mapped": mapped, "processes": processes, "total_pss": sum(p["Pss"] for p in processes.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3], help="worker counts to measure, ascending")
    parser.add_argument("--requests", type=int, default=24, help="POST /tag requests before measuring")
    parser.add_argument("--compare-private", action="store_true", help="also measure with MODEL_CACHE_DIR=off (each worker its own word table)")
    parser.add_argument("--model", default=None, help="model folder to serve (default: the bundled one)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ner-memory-") as tmp:
        for mapped in [True, False] if args.compare_private else [True]:
            for workers in sorted(args.workers):
                rows.append(measure(workers, Path(tmp), args.requests, mapped, args.model))
                print(f"measured --workers {workers} ({'mapped' if mapped else 'private'} word table)", file=sys.stderr, flush=True)
    print("\n| word table | workers | total PSS MB | added per worker beyond the previous row MB | each worker PSS / RSS / Private_Dirty MB | supervisor (+ helper) PSS MB |")
    print("|---|---|---|---|---|---|")
    previous: dict | None = None
    for row in rows:
        procs = row["processes"]
        each = ", ".join(f"{p['Pss']} / {p['Rss']} / {p['Private_Dirty']}" for name, p in procs.items() if name.startswith("worker"))
        supervisor = " + ".join(str(p["Pss"]) for name, p in procs.items() if not name.startswith("worker")) if row["workers"] > 1 else "-"
        added = "-"
        if previous is not None and previous["mapped"] == row["mapped"]:
            added = str(round((row["total_pss"] - previous["total_pss"]) / (row["workers"] - previous["workers"])))
        print(f"| {'mapped' if row['mapped'] else 'private'} | {row['workers']} | {row['total_pss']} | {added} | {each} | {supervisor} |")
        previous = row
    return 0


if __name__ == "__main__":
    sys.exit(main())
