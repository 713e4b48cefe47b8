"""F1 by casing variant: every token as it is, lower-cased, upper-cased, title-cased (``ml.data.augment.recase``;
the gold entities stay where they are) × data set, for one or more model folders side by side.

    python benchmarks/robustness.py --model models/en-conll03 --baseline-ref fc2b05a --baseline-ref 26039c1
    python benchmarks/robustness.py --model runs/candidate --sets dev          # selection: dev only
    python benchmarks/robustness.py --model runs/student --ensemble runs/t1 runs/t2 runs/t3 --sets dev   # beside its teachers' ensemble

The data sets come from ``--data-root`` (default ``../shared/data``): CoNLL-2003 dev (the one to select
on), the original test (``test.orig.txt``), CoNLL++ (``test.txt``) and WikiGold (another domain; never
used for selection). The recased copies are made in memory, never written. ``--write-metrics`` stores
the first model's table in its folder's ``metrics.json`` under ``robustness`` (what ``GET /model`` shows)."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETS = {
    "dev": "conll2003/dev.txt",
    "test": "conll2003/test.orig.txt",
    "conll++": "conll2003/test.txt",
    "wikigold": "wikigold/wikigold.conll.txt",
}
VARIANTS = ("as_is", "lower", "upper", "title")


def robustness(model: Path, data_root: Path, sets: list[str], variants: tuple[str, ...] = VARIANTS, batch_size: int = 256) -> dict[str, dict[str, float]]:
    """{set: {variant: F1 in percent}} for the model folder."""
    from ml.data import Sentence, read_corpus
    from ml.data.augment import recase
    from ml.predictor import Predictor, evaluate

    predictor = Predictor.load(model, backend="script")
    table: dict[str, dict[str, float]] = {}
    for name in sets:
        sentences = read_corpus(data_root / SETS[name])
        table[name] = {}
        for variant in variants:
            changed = [Sentence(recase(s.tokens, variant), list(s.spans), doc_id=s.doc_id) for s in sentences]
            table[name][variant] = round(100 * evaluate(predictor, changed, batch_size).f1, 2)
    return table


def ensemble_robustness(folders: list[Path], data_root: Path, sets: list[str], variants: tuple[str, ...] = VARIANTS) -> dict[str, dict[str, float]]:
    """The same table for an ensemble of model folders: their mean marginals, decoded (ml.distill.ensemble_spans)."""
    from ml.artifact import load_model
    from ml.data import read_corpus
    from ml.data.augment import recase
    from ml.distill import ensemble_spans
    from ml.evaluate import entity_scores

    members = [load_model(f) for f in folders]
    table: dict[str, dict[str, float]] = {}
    for name in sets:
        sentences = read_corpus(data_root / SETS[name])
        table[name] = {}
        for variant in variants:
            changed = [type(s)(recase(s.tokens, variant), list(s.spans)) for s in sentences]
            table[name][variant] = round(100 * entity_scores([s.spans for s in sentences], ensemble_spans(members, changed)).f1, 2)
    return table


def print_table(results: dict[str, dict[str, dict[str, float]]], variants: tuple[str, ...]) -> None:
    names = list(results)
    print("| data set | casing | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    first = results[names[0]]
    for data_set in first:
        for variant in variants:
            cells = [f"{results[n][data_set][variant]:.2f}" for n in names]
            print(f"| {data_set} | {variant} | " + " | ".join(cells) + " |")


def main() -> int:
    import torch

    from benchmarks.model_speed import extract

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, action="append", help="a model folder (repeatable; default models/en-conll03)")
    p.add_argument("--baseline-ref", action="append", default=[], help="also the model shipped at this git ref (repeatable; e.g. 26039c1 for en-conll03 1.2.0)")
    p.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--ensemble", type=Path, nargs="+", help="also the ensemble of these model folders (their mean tag marginals, decoded)")
    p.add_argument("--json", type=Path, help="also write the results to this file")
    p.add_argument("--write-metrics", action="store_true", help="store the first model's table in its metrics.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    models = [Path(m) for m in (args.model or [ROOT / "models" / "en-conll03"])]
    variants = tuple(args.variants)
    missing = [str(args.data_root / SETS[s]) for s in args.sets if not (args.data_root / SETS[s]).exists()]
    if missing:
        print(f"missing data files: {', '.join(missing)} (give --data-root)", file=sys.stderr)
        return 2
    results: dict[str, dict[str, dict[str, float]]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            results[str(model)] = robustness(model, args.data_root, args.sets, variants)
        if args.ensemble:
            results[f"ensemble of {len(args.ensemble)}"] = ensemble_robustness(args.ensemble, args.data_root, args.sets, variants)
        for n, ref in enumerate(args.baseline_ref):
            results[f"git {ref}"] = robustness(extract(ref, Path(tmp) / f"baseline{n}"), args.data_root, args.sets, variants)
    print_table(results, variants)
    print(f"\n({time.perf_counter() - started:.0f}s; F1 in percent, entity level, exact match)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.write_metrics:
        path = models[0] / "metrics.json"
        metrics = json.loads(path.read_text()) if path.exists() else {}
        metrics["robustness"] = {"f1": results[str(models[0])], "command": "python " + " ".join(["benchmarks/robustness.py", *sys.argv[1:]])}
        path.write_text(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
