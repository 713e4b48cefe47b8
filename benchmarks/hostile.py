"""Hostile-load benchmark: while 4 clients keep sending the worst texts inside the documented limits
(100,000 emoji; 16,000 "{"; 100,000 "("; 100,000 characters without a sentence end), measure the
latency of GET /healthz and of a one-sentence POST /tag from two other clients.

    python benchmarks/hostile.py                        # starts `ner serve` on a fresh SQLite file
    python benchmarks/hostile.py --url http://127.0.0.1:8000 --seconds 60

Targets (issue 12): /healthz p99 <= 50 ms, one-sentence /tag p99 <= 250 ms. Prints one JSON line.
Nothing here is a test: the numbers depend on the machine (the suite checks the same behaviour
with a generous bound in tests/service/test_hostile.py).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.support: readiness and ports, shared with the tests

from tests.support import WaitTimeout, free_port, wait_ready  # noqa: E402

SENTENCE = "Angela Merkel met Emmanuel Macron in Paris on Tuesday."


def worst_texts(scale: float = 1.0) -> dict[str, str]:
    n = int(100_000 * scale)
    words = ("Paris Berlin and Angela Merkel met " * (n // 35 + 1))[:n]
    return {
        "emoji": "\U0001f600" * n,
        "braces": "{" * int(16_000 * scale),
        "parens": "(" * n,
        "no_sentence_end": words,
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


class Hostile:
    """Runs the attackers and the probes against ``url`` for ``seconds``; collects latencies (ms)."""

    def __init__(self, url: str, seconds: float, clients: int = 4, scale: float = 1.0, headers: dict | None = None):
        self.url, self.seconds, self.clients, self.headers = url, seconds, clients, headers or {}
        self.texts = list(worst_texts(scale).values())
        self.stop = threading.Event()
        self.healthz: list[float] = []
        self.tag: list[float] = []
        self.attacks: list[tuple[int, float]] = []  # (status, seconds)
        self.errors: list[str] = []

    def _attacker(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=600, headers=self.headers) as c:
            k = i
            while not self.stop.is_set():
                text = self.texts[k % len(self.texts)]
                k += 1
                started = time.perf_counter()
                try:
                    r = c.post("/tag", json={"text": text, "store": False})
                    self.attacks.append((r.status_code, time.perf_counter() - started))
                except httpx.HTTPError as e:
                    self.errors.append(f"attack: {type(e).__name__}")

    def _probe(self, path: str, out: list[float], interval: float) -> None:
        with httpx.Client(base_url=self.url, timeout=30, headers=self.headers) as c:
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    r = c.get(path) if path == "/healthz" else c.post(path, json={"text": SENTENCE, "store": False})
                    if r.status_code == 200:
                        out.append((time.perf_counter() - started) * 1000)
                    else:
                        self.errors.append(f"{path}: {r.status_code}")
                except httpx.HTTPError as e:
                    self.errors.append(f"{path}: {type(e).__name__}")
                time.sleep(interval)

    def run(self) -> dict:
        threads = [threading.Thread(target=self._attacker, args=(i,), daemon=True) for i in range(self.clients)]
        threads += [
            threading.Thread(target=self._probe, args=("/healthz", self.healthz, 0.02), daemon=True),
            threading.Thread(target=self._probe, args=("/tag", self.tag, 0.05), daemon=True),
        ]
        for t in threads:
            t.start()
        time.sleep(self.seconds)
        self.stop.set()
        for t in threads:
            t.join(30)
        return self.summary()

    def summary(self) -> dict:
        def stats(values: list[float]) -> dict:
            return {"n": len(values), "p50_ms": round(percentile(values, 50), 1), "p99_ms": round(percentile(values, 99), 1), "max_ms": round(max(values, default=float("nan")), 1)}

        statuses: dict[str, int] = {}
        for status, _ in self.attacks:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        return {
            "healthz": stats(self.healthz),
            "one_sentence_tag": stats(self.tag),
            "hostile_requests": {"n": len(self.attacks), "statuses": statuses, "median_s": round(statistics.median([s for _, s in self.attacks]), 2) if self.attacks else None},
            "errors": self.errors[:10],
        }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (default: start `ner serve` on a fresh SQLite file)")
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--model", help="model folder (default: the bundled model)")
    args = p.parse_args()
    server = None
    url = args.url
    tmp = tempfile.mkdtemp(prefix="ner-hostile-")
    if url is None:
        port = free_port()
        env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp}/ner.db", "AUTO_MIGRATE": "true", "PYTHONPATH": str(ROOT)}
        if args.model:
            env["NER_MODEL"] = args.model
        server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--workers", str(args.workers), "--log-level", "warning"], env=env, cwd=tmp)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, server, timeout=180)
        except WaitTimeout as e:
            server.kill()
            raise SystemExit(f"the server did not start: {e}") from None
    try:
        result = Hostile(url, args.seconds, args.clients).run()
        result.update(seconds=args.seconds, clients=args.clients, workers=args.workers, cpus=os.cpu_count())
        print(json.dumps(result))
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
