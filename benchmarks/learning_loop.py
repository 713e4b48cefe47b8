"""The learning loop on another domain, end to end through the deployed pieces.

WikiGold (145 Wikipedia articles, CoNLL labels, IOB1) is split by a seeded shuffle into 100 articles
whose gold annotations are posted as corrections through ``POST /feedback`` of a running service
(``ner serve`` on PostgreSQL), and 45 articles that are only ever used for the report. After 10, 25,
50 and 100 posted articles a job is queued with ``POST /admin/retrain`` (fine-tuning the bundled
model, so the points of the curve are comparable) and run by ``ner worker --once``: one training
process at a time. Reported per point: F1 on the 45 articles and on CoNLL-2003 test before (the
bundled model) and after (forgetting), the job's wall time (from its row), the gains the job
measured on its own held-out parts (hash split, unseen names, newest corrections), the forgetting
probe, and the gate's decision. The last lines printed are the curve as a Markdown table (means over
``--repeats``, each repeat on its own seeded split and database).

    python benchmarks/learning_loop.py --wikigold ../shared/data/wikigold/wikigold.conll.txt \\
        --conll-test ../shared/data/conll2003/test.txt --repeats 3 --json runs/learning_loop.json

Needs PostgreSQL at 127.0.0.1:5432 (a fresh database is created and dropped) unless
``--database-url`` names one (its corrections must be only this benchmark's).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import WaitTimeout, free_port, fresh_database, wait_ready  # noqa: E402

ADMIN_KEY = "benchmark-admin-key-" + "0" * 8


def articles(path: Path):
    """WikiGold as a list of articles, each a list of gold sentences (tokens, spans)."""
    from ml.data.conll import read_conll

    docs: dict[int, list] = {}
    for s in read_conll(path):
        docs.setdefault(s.doc_id or 0, []).append(s)
    return [docs[k] for k in sorted(docs)]


def article_record(sentences) -> dict:
    """One text per article (sentences on their own lines, tokens joined by spaces) and its
    entities as character offsets: what an annotator would send to POST /feedback."""
    from ml.data.jsonl import sentence_to_record

    text, entities = "", []
    for s in sentences:
        r = sentence_to_record(s)
        entities += [{"start": e["start"] + len(text), "end": e["end"] + len(text), "label": e["label"]} for e in r["entities"]]
        text += r["text"] + "\n"
    return {"text": text, "entities": entities}


def posted_records(docs, k: int, unit: str) -> list[tuple[str, dict]]:
    """What is posted for article ``k``: one text for the article, or (``unit`` "sentence") one short
    text per sentence, as thousands of short corrected texts (messages, tickets) would come."""
    if unit == "sentence":
        return [(f"{k}-{i}", article_record([s])) for i, s in enumerate(docs[k])]
    return [(str(k), article_record(docs[k]))]


def evaluate_folder(folder: str | Path, sentences) -> dict:
    from ml.predictor import Predictor, evaluate

    scores = evaluate(Predictor.load(folder), sentences)
    return {"f1": scores.f1, "per_type": {k: round(v["f1"], 4) for k, v in scores.per_type.items()}}


def sweep(args, docs, posted) -> int:
    """Settings compared on one fine-tune each of the posted articles (in posting order), without the
    service: chosen on the job's own held-out parts and CoNLL dev only; F1 on the unposted articles
    is reported as the outcome, never to choose."""
    from ml.data.conll import read_conll
    from ml.finetune import Correction, FinetuneConfig, FinetuneInputs, finetune
    from ml.predictor import Predictor, evaluate

    corrections = []
    for k in posted:
        for key, record in posted_records(docs, k, args.unit):
            corrections.append(Correction(f"wikigold-{key}", record["text"], [(e["start"], e["end"], e["label"]) for e in record["entities"]]))
    dev = read_conll(args.conll_dev)[: args.dev_sentences or None]
    unposted = [s for k in sorted(set(range(len(docs))) - set(posted)) for s in docs[k]]
    before = evaluate(Predictor.load(args.model), unposted).f1
    rows = {}
    for name, settings in json.loads(args.sweep).items():
        config = FinetuneConfig.from_dict({"threads": args.threads, **settings})
        with tempfile.TemporaryDirectory(prefix="ner-sweep-") as folder:
            result = finetune(FinetuneInputs(args.model, corrections, "9.9.0", Path(folder) / "candidate", base_data=([], dev)), config)
            after = evaluate(Predictor.load(Path(folder) / "candidate"), unposted).f1
        m = result.metrics
        rows[name] = {"settings": settings, "heldout_gain": _gain(m["heldout"]), "unseen_gain": _gain(m["heldout"], "unseen"), "time_gain": _gain(m["time"]),
                      "dev_change": m["dev"]["f1"] - m["dev_before"]["f1"], "unposted_gain": after - before, "schedule": m["schedule"],
                      "train_seconds": m["train_seconds"]}
        print(f"{name}: " + ", ".join(f"{k} {100 * v:+.2f}" for k, v in rows[name].items() if k.endswith(("gain", "change")) and v is not None),
              file=sys.stderr, flush=True)
    print(json.dumps(rows, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def start_service(stack: contextlib.ExitStack, env: dict, args, models_dir: Path):
    """``ner serve`` on a free port; returns an httpx client once it is ready."""
    import httpx

    port = free_port()
    server_log = models_dir / "server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port)], cwd=ROOT, stdout=server_log.open("w"), stderr=subprocess.STDOUT,
        env={**env, "NER_MODEL": args.model, "ADMIN_KEY": ADMIN_KEY, "MODEL_POLL_S": "1", "MODELS_DIR": str(models_dir)},
    )
    stack.callback(server.wait, 30)
    stack.callback(server.terminate)
    client = stack.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120))
    try:
        wait_ready(str(client.base_url).rstrip("/"), server, timeout=180)
    except WaitTimeout as e:
        raise SystemExit(f"the service did not start: {e}\n{server_log.read_text()[-3000:]}") from None
    return client


def run_job(client, env: dict, args, base_id: int, models_dir: Path) -> dict:
    """One POST /admin/retrain and one ``ner worker --once``; the job's row."""
    admin = {"X-Admin-Key": ADMIN_KEY}
    body: dict = {"base_model_id": base_id}
    if args.method != "finetune":
        body["method"] = args.method
    r = client.post("/admin/retrain", json=body, headers=admin)
    if r.status_code != 202:
        raise SystemExit(f"POST /admin/retrain: {r.status_code} {r.text}")
    job_id = r.json()["id"]
    worker_env = {**env, "MODELS_DIR": str(models_dir), "FINETUNE": args.finetune}
    if args.base_corpus:
        worker_env["BASE_CORPUS"] = args.base_corpus
    worker = subprocess.run([sys.executable, "-m", "service.cli", "worker", "--once"], cwd=ROOT, capture_output=True, text=True, env=worker_env)
    job = client.get(f"/admin/jobs/{job_id}", headers=admin).json()
    if worker.returncode != 0 or job["status"] != "succeeded":
        raise SystemExit(f"job {job_id} {job['status']}: {job.get('error')}\n{worker.stderr[-3000:]}")
    return job


def _gain(part: dict | None, key: str = "") -> float | None:
    """after - before F1 of a held-out part (``key``: a sub-part such as "unseen")."""
    part = (part or {}).get(key) if key else part
    if not part or not part.get("before") or not part.get("after"):
        return None
    return part["after"]["f1"] - part["before"]["f1"]


def run_curve(args, docs, seed: int, eval_of, conll_test) -> list[dict]:
    """Post the articles of one seeded split through the service, retrain at each point of the curve."""
    from datetime import datetime

    posted = random.Random(seed).sample(range(len(docs)), args.posted)
    report = sorted(set(range(len(docs))) - set(posted))
    curve = sorted({min(int(n), args.posted) for n in args.curve.split(",")})
    eval_sentences = [s for k in report for s in docs[k]]
    base_wikigold = eval_of(args.model, eval_sentences)
    points = []
    with contextlib.ExitStack() as stack:
        db_url = args.database_url or stack.enter_context(fresh_database("ner_bench", args.pg_admin_url))
        models_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ner-loop-")))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": db_url, "TORCH_THREADS": str(args.threads),
               "TRAIN_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
        if args.base_corpus:  # the service refuses to queue a retrain job without it, the trainer reads it
            env["BASE_CORPUS"] = args.base_corpus
        subprocess.run([sys.executable, "-m", "service.cli", "db", "upgrade"], env=env, cwd=ROOT, check=True, capture_output=True)
        client = start_service(stack, env, args, models_dir)
        base_id = next(m["id"] for m in client.get("/admin/models", headers={"X-Admin-Key": ADMIN_KEY}).json() if m["active"])
        sent = 0
        for n in curve:
            for k in posted[sent:n]:
                for key, record in posted_records(docs, k, args.unit):
                    r = client.post("/feedback", json={**record, "author": "wikigold"}, headers={"Idempotency-Key": f"wikigold-{seed}-{key}"})
                    if r.status_code not in (200, 201):
                        raise SystemExit(f"POST /feedback of article {key}: {r.status_code} {r.text}")
            sent = n
            job = run_job(client, env, args, base_id, models_dir)
            metrics = job["metrics"]
            folder = metrics["model"]["path"]
            point = {
                "seed": seed, "articles": n, "job_id": job["id"], "version": metrics["model"]["version"],
                "job_seconds": round((datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])).total_seconds(), 1),
                "train_seconds": metrics["train_seconds"],
                "heldout_gain": _gain(metrics.get("heldout")), "unseen_gain": _gain(metrics.get("heldout"), "unseen"),
                "time_gain": _gain(metrics.get("time")), "probe": (metrics.get("probe") or {}).get("agreement"),
                "promoted": job["decision"]["promote"], "decision": job["decision"]["reason"],
                "wikigold_before": base_wikigold, "wikigold_report": eval_of(folder, eval_sentences), "conll_test": eval_of(folder, conll_test),
            }
            points.append(point)
            print(f"seed {seed}, {n:4d} articles: WikiGold-45 F1 {100 * base_wikigold['f1']:.2f} -> {100 * point['wikigold_report']['f1']:.2f}, "
                  f"CoNLL test -> {100 * point['conll_test']['f1']:.2f}, job {point['job_seconds']:.0f}s, "
                  f"{'promoted' if point['promoted'] else 'candidate'} ({point['decision']})", file=sys.stderr, flush=True)
    return points


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def curve_table(points: list[dict], base_conll: float) -> str:
    """The curve as a Markdown table: means over the repeats at each number of posted articles."""

    def pct(v: float | None, sign: bool = True) -> str:
        return "" if v is None else f"{100 * v:+.2f}" if sign else f"{100 * v:.2f}"

    rows = ["| posted articles | repeats | WikiGold F1 gain (unposted articles) | CoNLL-2003 test change | job time (s) | held-out gain | unseen-name gain | "
            "newest gain | probe agreement | promoted |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in sorted({p["articles"] for p in points}):
        at = [p for p in points if p["articles"] == n]
        gain = _mean(p["wikigold_report"]["f1"] - p["wikigold_before"]["f1"] for p in at)
        conll = _mean(p["conll_test"]["f1"] - base_conll for p in at)
        probe = _mean(p["probe"] for p in at)
        rows.append(f"| {n} | {len(at)} | {pct(gain)} | {pct(conll)} | {_mean(p['job_seconds'] for p in at):.0f} | {pct(_mean(p['heldout_gain'] for p in at))} | "
                    f"{pct(_mean(p['unseen_gain'] for p in at))} | {pct(_mean(p['time_gain'] for p in at))} | {pct(probe, sign=False)} | "
                    f"{sum(p['promoted'] for p in at)}/{len(at)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wikigold", default=str(ROOT.parent / "shared/data/wikigold/wikigold.conll.txt"))
    p.add_argument("--conll-test", default=str(ROOT.parent / "shared/data/conll2003/test.txt"), help="forgetting is measured here (never used to choose anything)")
    p.add_argument("--model", default=str(ROOT / "models/en-conll03"))
    p.add_argument("--posted", type=int, default=100, help="articles whose gold is posted as corrections")
    p.add_argument("--curve", default="10,25,50,100", help="retrain after this many posted articles")
    p.add_argument("--unit", choices=["article", "sentence"], default="article",
                   help="post each article as one text, or each of its sentences as its own short text (the same article split)")
    p.add_argument("--seed", type=int, default=2026, help="the article split (repeat r uses seed + r)")
    p.add_argument("--repeats", type=int, default=1, help="the whole curve this many times, each on its own split and database; the table shows means")
    p.add_argument("--finetune", default="{}", help="FINETUNE for the trainer (JSON), e.g. '{\"ewc\": 50}'")
    p.add_argument("--method", default="finetune", choices=["finetune", "retrain"], help="the job type (retrain needs --base-corpus)")
    p.add_argument("--base-corpus", help="BASE_CORPUS for the trainer: a folder with train.txt and dev.txt (the operator has the base corpus)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the service and the trainer")
    p.add_argument("--database-url", help="a PostgreSQL database to use (default: a fresh one on 127.0.0.1:5432; needs --repeats 1)")
    p.add_argument("--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--sweep", metavar="JSON", help='instead: fine-tune on the posted articles with each of {"name": {settings}, ...} and report the '
                   "held-out F1 of the split (1 in 5 posted articles) and CoNLL-2003 dev F1, before and after (no service, no test data)")
    p.add_argument("--conll-dev", default=str(ROOT.parent / "shared/data/conll2003/dev.txt"), help="forgetting, for --sweep")
    p.add_argument("--dev-sentences", type=int, default=0, help="with --sweep: the first N sentences of --conll-dev only (0: all)")
    args = p.parse_args(argv)
    if args.database_url and args.repeats > 1:
        p.error("--database-url holds one run's corrections: use it with --repeats 1")

    import torch

    torch.set_num_threads(args.threads)
    from ml.anchoring import FISHER_FILE
    from ml.data.conll import read_conll

    docs = articles(Path(args.wikigold))
    if args.sweep:
        return sweep(args, docs, random.Random(args.seed).sample(range(len(docs)), args.posted))
    if not (Path(args.model) / FISHER_FILE).is_file():
        print(f"note: {args.model} has no {FISHER_FILE}: fine-tunes run without weight consolidation (ner fisher --model ... --data train.txt)", file=sys.stderr)
    conll_test = read_conll(args.conll_test)
    cache: dict = {}

    def eval_of(folder, sentences) -> dict:
        key = (str(folder), id(sentences), len(sentences))
        if key not in cache:
            cache[key] = evaluate_folder(folder, sentences)
        return cache[key]

    base_conll = eval_of(args.model, conll_test)["f1"]
    print(f"WikiGold: {len(docs)} articles, {args.posted} posted; base model {100 * base_conll:.2f} on CoNLL-2003 test", file=sys.stderr)
    points = [p for r in range(args.repeats) for p in run_curve(args, docs, args.seed + r, eval_of, conll_test)]
    results = {"seed": args.seed, "repeats": args.repeats, "unit": args.unit, "posted": args.posted, "finetune": json.loads(args.finetune), "method": args.method,
               "base_corpus": args.base_corpus, "threads": args.threads, "base_conll_test": base_conll, "points": points}
    print(curve_table(points, base_conll))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
