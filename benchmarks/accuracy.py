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

# The recipe search of issue 11: each one change to the reference, on the native (torch.nn) recurrence
# for training speed, same seed and schedule for every row.
# 1.0.0's configuration (the search ran before configs/en-conll03.toml became the 1.1.0, then the 1.2.0 recipe)
SEARCH_BASE = ["model.backend='native'", "train.seed=1", "train.pretrained_max_words=100000", "train.fit_dev=false", "train.average_last=0"]
RECIPE = {
    "reference": ("1.0.0's configuration (GloVe: 100,000 most frequent words, fine-tuned)", []),
    "all GloVe words": ("all 400,000 GloVe words; training words fine-tuned", ["train.pretrained_max_words=400000"]),
    "all GloVe words, frozen": ("all 400,000 GloVe words, none fine-tuned", ["train.pretrained_max_words=400000", "train.freeze_embeddings=true"]),
    "document context": ("consecutive sentences of a document in windows of up to 256 tokens (batches of 4 windows)", ["model.context='document'", "train.batch_size=4"]),
    "two layers": ("two BiLSTM layers", ["model.num_layers=2"]),
    "nadam": ("Nadam instead of Adam", ["train.optimizer='nadam'"]),
    "clip 1": ("gradient-norm clipping at 1 instead of 5", ["train.clip_norm=1.0"]),
    # the second round: one change each to the 1.1.0 recipe, compared with its row ("all GloVe words")
    "all words + two layers": ("1.1.0 recipe (all GloVe words) with two BiLSTM layers", ["train.pretrained_max_words=400000", "model.num_layers=2"]),
    "all words + nadam": ("1.1.0 recipe (all GloVe words) with Nadam instead of Adam", ["train.pretrained_max_words=400000", "train.optimizer='nadam'"]),
    "all words + clip 1": ("1.1.0 recipe (all GloVe words) with gradient-norm clipping at 1 instead of 5", ["train.pretrained_max_words=400000", "train.clip_norm=1.0"]),
    "all words + average last 5": ("1.1.0 recipe (all GloVe words), the model ends with the mean of its weights after the last 5 epochs (6-10 of 10; no epoch selected on dev)", ["train.pretrained_max_words=400000", "train.average_last=5"]),
    "all words + average last 8": ("1.1.0 recipe (all GloVe words), the model ends with the mean of its weights after the last 8 epochs", ["train.pretrained_max_words=400000", "train.average_last=8"]),
    "all words + document context": ("1.1.0 recipe (all GloVe words) with document context (windows of up to 256 tokens, batches of 4 windows)", ["train.pretrained_max_words=400000", "model.context='document'", "train.batch_size=4"]),
    "locked dropout": ("variational (locked) dropout on the inputs and outputs of the recurrence", ["model.locked_dropout=true"]),
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
    out = subprocess.run([sys.executable, __file__, "--data", str(data), "score", str(folder)], check=True, capture_output=True, text=True, cwd=ROOT)
    scores.update(json.loads(out.stdout))
    result_file.write_text(json.dumps(scores, indent=2))
    lock.unlink(missing_ok=True)
    return scores


def wikigold_path(data: Path) -> Path:
    return data.parent / "wikigold" / "wikigold.conll.txt"


def score(folder: Path, data: Path) -> dict:
    """F1 of a model folder on dev, both CoNLL-2003 test sets and WikiGold (documents tagged as
    texts, as the service does), per type on the original test set, and inference tokens/s (the
    whole original test set, in-process, batches of 256 sentences, one thread)."""
    import time

    import torch

    sys.path.insert(0, str(ROOT))
    from ml.data import read_corpus
    from ml.predictor import Predictor, evaluate

    torch.set_num_threads(1)
    predictor = Predictor.load(folder, backend="script")  # as served, whatever trained it
    out: dict = {}
    for split, path in (("dev", data / "dev.txt"), ("test_orig", data / "test.orig.txt"), ("test_conllpp", data / "test.txt"), ("wikigold", wikigold_path(data))):
        sentences = read_corpus(path)
        started = time.perf_counter()
        s = evaluate(predictor, sentences, 256)
        seconds = time.perf_counter() - started
        out[split] = s.f1
        if split == "test_orig":
            out["per_type"] = {label: v["f1"] for label, v in s.per_type.items()}
            out["precision"], out["recall"] = s.precision, s.recall
            out["tokens_per_second"] = s.tokens / seconds
    return out


def fmt(x: float | None) -> str:
    if x is None:
        return ""
    return f"{100 * x:.2f}"


def print_table(rows: list, title: str) -> None:
    print(f"\n{title}\n")
    print("| configuration | dev F1 | test F1 (original) | test F1 (CoNLL++) | WikiGold F1 | PER / LOC / ORG / MISC (original test) | best epoch | train time | tokens/s tagging |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        per_type = " / ".join(fmt(r["per_type"].get(t)) for t in ("PER", "LOC", "ORG", "MISC")) if "per_type" in r else ""
        speed = f"{r['tokens_per_second']:.0f}" if "tokens_per_second" in r else ""
        print(
            f"| {r['name']} | {fmt(r['dev'])} | {fmt(r['test_orig'])} | {fmt(r['test_conllpp'])} | {fmt(r.get('wikigold'))} | {per_type} "
            f"| {r['best_epoch']} | {r['train_seconds'] / 60:.0f} min | {speed} |"
        )


def summary(rows: list) -> None:
    if len(rows) < 2:
        return
    print("\n| over seeds | dev F1 | test F1 (original) | test F1 (CoNLL++) | WikiGold F1 | PER / LOC / ORG / MISC (original test, means) |\n|---|---|---|---|---|---|")
    cells = []
    for key in ("dev", "test_orig", "test_conllpp", "wikigold"):
        values = [100 * r[key] for r in rows if r.get(key) is not None]
        cells.append(f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (min {min(values):.2f}, max {max(values):.2f})" if len(values) > 1 else "")
    cells.append(" / ".join(f"{statistics.mean(100 * r['per_type'][t] for r in rows):.2f}" for t in ("PER", "LOC", "ORG", "MISC")) if all("per_type" in r for r in rows) else "")
    print(f"| mean ± sd, {len(rows)} seeds | " + " | ".join(cells) + " |")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder with train.txt, dev.txt, test.orig.txt, test.txt")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "accuracy")
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("seeds", help="the shipped configuration fitted on train only (dev selects the epoch), several seeds")
    s.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    a = sub.add_parser("ablations", help="one run per ablation on a shorter schedule")
    a.add_argument("--epochs", type=int, default=8)
    a.add_argument("--only", nargs="+", help="run only these ablation names")
    r = sub.add_parser("recipe", help="the recipe search (native recurrence, seed 1, short schedule)")
    r.add_argument("--epochs", type=int, default=8)
    r.add_argument("--only", nargs="+", help="run only these recipe names")
    f = sub.add_parser("final", help="the shipped recipe (configs/en-conll03.toml): train+dev fit and train-only fit, per seed")
    f.add_argument("--seeds", type=int, nargs="+", default=[1])
    f.add_argument("--fits", nargs="+", choices=["train+dev", "train-only"], default=["train+dev", "train-only"])
    sub.add_parser("table", help="print the tables of finished runs")
    sc = sub.add_parser("score", help="print the scores of one model folder as JSON")
    sc.add_argument("model", type=Path)
    return p


def run_seeds(args: argparse.Namespace) -> None:
    for seed in args.seeds:
        run_one(f"shipped config, seed {seed}", [f"train.seed={seed}", "train.fit_dev=false"], args.data, args.out, None)


def run_ablations(args: argparse.Namespace) -> None:
    base = ["model.backend='script'", "train.pretrained_max_words=100000", "train.fit_dev=false", "train.average_last=0"]  # 1.0.0's configuration
    for name, (_, overrides) in ABLATIONS.items():
        if not args.only or name in args.only:
            run_one(f"ablation: {name}", [*base, *overrides, "train.seed=1"], args.data, args.out, args.epochs)


def run_final(args: argparse.Namespace) -> None:
    for seed in args.seeds:
        for fit in args.fits:
            run_one(f"final {fit}, seed {seed}", [f"train.seed={seed}", f"train.fit_dev={'true' if fit == 'train+dev' else 'false'}"], args.data, args.out, None)


def run_recipe(args: argparse.Namespace) -> None:
    for name, (_, overrides) in RECIPE.items():
        if not args.only or name in args.only:
            run_one(f"recipe: {name}", SEARCH_BASE + overrides, args.data, args.out, args.epochs)


RUNS = {"seeds": run_seeds, "ablations": run_ablations, "final": run_final, "recipe": run_recipe, "table": lambda args: None}


def report_final(final: list[dict]) -> None:
    print_table(sorted(final, key=lambda r: r["name"]), "Shipped recipe (configs/en-conll03.toml); the train+dev rows trained on dev, so their dev F1 is not a measurement")
    for fit in ("train+dev", "train-only"):
        rows = [r for r in final if r["name"].startswith(f"final {fit},")]
        if len(rows) > 1:
            summary(rows)


def report_recipe(recipe: dict[str, dict]) -> None:
    rows = [dict(recipe[n], name=f"{n}: {RECIPE[n][0]}") for n in RECIPE if n in recipe]
    print_table(rows, f"Recipe search, {'/'.join(str(e) for e in {r['epochs'] for r in rows})} epochs each, seed 1, native recurrence in training")
    if "reference" not in recipe and "all GloVe words" not in recipe:
        return
    print("\n| change | against | Δ dev | Δ test (original) | Δ CoNLL++ | Δ WikiGold |\n|---|---|---|---|---|---|")
    for n in RECIPE:
        against = "all GloVe words" if n.startswith("all words + ") else "reference"
        if n != "reference" and n in recipe and against in recipe and recipe[n]["epochs"] == recipe[against]["epochs"]:
            r, ref = recipe[n], recipe[against]
            d = [100 * (r[k] - ref[k]) if r.get(k) is not None and ref.get(k) is not None else None for k in ("dev", "test_orig", "test_conllpp", "wikigold")]
            print(f"| {n} | {against} | " + " | ".join("" if x is None else f"{x:+.2f}" for x in d) + " |")


def report_ablations(ablations: dict[str, dict]) -> None:
    rows = [dict(ablations[n], name=f"{n}: {ABLATIONS[n][0]}") for n in ABLATIONS if n in ablations]
    epochs = {r["epochs"] for r in rows}
    print_table(rows, f"Ablations, {'/'.join(str(e) for e in epochs)} epochs each (shorter than the shipped schedule), seed 1")


def report(out: Path) -> None:
    """The tables of every finished run under ``out``."""
    results = [json.loads(f.read_text()) for f in sorted(out.glob("*.json"))]
    final = [r for r in results if r["name"].startswith("final ")]
    if final:
        report_final(final)
    seeds = [r for r in results if r["name"].startswith("shipped config")]
    if seeds:
        print_table(seeds, "Shipped configuration (configs/en-conll03.toml), full schedule")
        summary(seeds)
    recipe = {r["name"][len("recipe: "):]: r for r in results if r["name"].startswith("recipe: ")}
    if recipe:
        report_recipe(recipe)
    ablations = {r["name"][len("ablation: "):]: r for r in results if r["name"].startswith("ablation: ")}
    if ablations:
        report_ablations(ablations)


def main() -> int:
    args = build_parser().parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.what == "score":
        print(json.dumps(score(args.model, args.data)))
        return 0
    RUNS[args.what](args)
    report(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
