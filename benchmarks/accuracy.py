"""Accuracy benchmark: retrain the shipped configuration (several seeds) and the ablations on
CoNLL-2003, evaluate each on dev, the original test set and CoNLL++, and print tables.

    python benchmarks/accuracy.py --data ../shared/data/conll2003 seeds --seeds 1 2 3
    python benchmarks/accuracy.py --data ../shared/data/conll2003 ablations --epochs 8
    python benchmarks/accuracy.py --data ../shared/data/conll2003 table      # print what is done

Each run writes runs/accuracy/<name>/ (a model folder) and <name>.json (scores); runs already
done are reused, so two processes may share the work (--only NAME ...). Model selection is on
dev.txt only; the test files are evaluated once per finished model.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "en-conll03.toml"

# name -> (what it shows, config overrides on top of configs/en-conll03.toml)
ABLATIONS = {
    "lstm (shipped config)": ("reference for this schedule", []),
    "gru": ("LSTM vs GRU", ["model.cell='gru'"]),
    "basic rnn (tanh)": ("gated vs basic RNN: vanishing gradients", ["model.cell='rnn_tanh'"]),
    "echo-state rnn": ("basic RNN with frozen random recurrent weights (radius 0.9)", ["model.cell='rnn_tanh'", "model.echo_state_radius=0.9"]),
    "unidirectional lstm": ("no backward direction (the 'Teddy Roosevelt' argument)", ["model.bidirectional=false"]),
    "softmax head": ("per-step softmax instead of the CRF", ["model.head='softmax'"]),
    "no char encoder": ("without character features", ["model.char_encoder='none'"]),
    "no pretrained vectors": ("random word embeddings instead of GloVe", ["train.pretrained=''"]),
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def run_one(name: str, overrides: list, data: Path, out_root: Path, epochs: int | None) -> dict:
    folder = out_root / slug(name)
    result_file = out_root / f"{slug(name)}.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    lock = out_root / f"{slug(name)}.lock"
    if not (folder / "metrics.json").exists():  # a finished model folder is evaluated, not retrained
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            print(f"skipping {name}: another process is training it ({lock})", file=sys.stderr)
            return {}
        sets = []
        for o in overrides + ([f"train.epochs={epochs}"] if epochs else []):
            sets += ["--set", o]
        subprocess.run(
            [sys.executable, "-m", "ml", "train", "--config", str(CONFIG), "--data", str(data), "--out", str(folder), "--name", slug(name), "--quiet", *sets],
            check=True, cwd=ROOT,
        )
    metrics = json.loads((folder / "metrics.json").read_text())
    scores = {"name": name, "overrides": overrides, "epochs": epochs, "train_seconds": metrics["train_seconds"], "best_epoch": metrics["best_epoch"]}
    for split, file in (("dev", "dev.txt"), ("test_orig", "test.orig.txt"), ("test_conllpp", "test.txt")):
        out = subprocess.run([sys.executable, "-m", "ml", "evaluate", "--model", str(folder), "--data", str(data / file), "--json"], check=True, capture_output=True, text=True, cwd=ROOT)
        scores[split] = json.loads(out.stdout)["f1"]
    result_file.write_text(json.dumps(scores, indent=2))
    lock.unlink(missing_ok=True)
    return scores


def fmt(x: float) -> str:
    return f"{100 * x:.2f}"


def print_table(rows: list, title: str) -> None:
    print(f"\n{title}\n")
    print("| configuration | dev F1 | test F1 (original) | test F1 (CoNLL++) | best epoch | train time |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {fmt(r['dev'])} | {fmt(r['test_orig'])} | {fmt(r['test_conllpp'])} | {r['best_epoch']} | {r['train_seconds'] / 60:.0f} min |")


def summary(rows: list) -> None:
    if len(rows) < 2:
        return
    print("\n| over seeds | dev F1 | test F1 (original) | test F1 (CoNLL++) |\n|---|---|---|---|")
    cells = []
    for key in ("dev", "test_orig", "test_conllpp"):
        values = [100 * r[key] for r in rows]
        cells.append(f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (min {min(values):.2f}, max {max(values):.2f})")
    print(f"| mean ± sd, {len(rows)} seeds | " + " | ".join(cells) + " |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder with train.txt, dev.txt, test.orig.txt, test.txt")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "accuracy")
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("seeds", help="the shipped configuration, full schedule, several seeds")
    s.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    a = sub.add_parser("ablations", help="one run per ablation on a shorter schedule")
    a.add_argument("--epochs", type=int, default=8)
    a.add_argument("--only", nargs="+", help="run only these ablation names")
    sub.add_parser("table", help="print the tables of finished runs")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    if args.what == "seeds":
        for seed in args.seeds:
            run_one(f"shipped config, seed {seed}", [f"train.seed={seed}"], args.data, args.out, None)
    elif args.what == "ablations":
        for name, (_, overrides) in ABLATIONS.items():
            if args.only and name not in args.only:
                continue
            run_one(f"ablation: {name}", [*overrides, "train.seed=1"], args.data, args.out, args.epochs)

    results = [json.loads(f.read_text()) for f in sorted(args.out.glob("*.json"))]
    seeds = [r for r in results if r["name"].startswith("shipped config")]
    ablations = {r["name"][len("ablation: "):]: r for r in results if r["name"].startswith("ablation: ")}
    if seeds:
        print_table(seeds, "Shipped configuration (configs/en-conll03.toml), full schedule")
        summary(seeds)
    if ablations:
        rows = [dict(ablations[n], name=f"{n}: {ABLATIONS[n][0]}") for n in ABLATIONS if n in ablations]
        epochs = {r["epochs"] for r in rows}
        print_table(rows, f"Ablations, {'/'.join(str(e) for e in epochs)} epochs each (shorter than the shipped schedule), seed 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
