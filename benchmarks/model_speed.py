"""In-process speed of two model folders in the same process, interleaved: tagging throughput
(tokens/s over a CoNLL file, sentences of one document tagged as one text, as ``evaluate`` does)
and one-sentence latency (median of single ``predict`` calls per round, the best round reported: the machine is shared), one torch thread.

    python benchmarks/model_speed.py --data ../shared/data/conll2003/test.orig.txt \\
        --baseline-ref main --model models/en-conll03

``--baseline-ref REF`` takes the baseline from ``git show REF:models/en-conll03/...`` (the
model shipped at REF); ``--baseline FOLDER`` takes a folder. The constraint on a new model: it
may be at most 20 % slower than the baseline on both numbers."""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SENTENCE = ["Angela", "Merkel", "met", "Emmanuel", "Macron", "in", "Paris", "on", "Tuesday", "to", "discuss", "the", "European", "Union", "budget", "."]


def extract(ref: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    for name in ("meta.json", "config.json", "vocab.json", "weights.safetensors", "metrics.json"):
        blob = subprocess.run(["git", "show", f"{ref}:models/en-conll03/{name}"], cwd=ROOT, check=True, capture_output=True).stdout
        (into / name).write_bytes(blob)
    return into


def main() -> int:
    import torch

    from ml.data import read_corpus
    from ml.predictor import Predictor
    from ml.windows import group_texts

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a CoNLL file to tag for throughput")
    p.add_argument("--model", type=Path, default=ROOT / "models" / "en-conll03")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--baseline", type=Path)
    g.add_argument("--baseline-ref")
    p.add_argument("--rounds", type=int, default=3, help="throughput passes per model, interleaved")
    p.add_argument("--calls", type=int, default=300, help="one-sentence calls per model and round")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        baseline = args.baseline or extract(args.baseline_ref, Path(tmp) / "baseline")
        models = {"baseline": Predictor.load(baseline, backend="script"), "model": Predictor.load(args.model, backend="script")}  # as served
        sentences = read_corpus(args.data)
        texts = [[sentences[i].tokens for i in grp] for grp in group_texts([s.doc_id for s in sentences])]
        tokens = sum(len(s.tokens) for s in sentences)
        speed: dict[str, list[float]] = {k: [] for k in models}
        latency: dict[str, list[float]] = {k: [] for k in models}  # per round: median ms of its calls
        for predictor in models.values():  # warm-up
            predictor.predict_texts(texts[:20])
            for _ in range(20):
                predictor.predict([SENTENCE])
        for _ in range(args.rounds):
            for name, predictor in models.items():
                started = time.perf_counter()
                predictor.predict_texts(texts, 64)
                speed[name].append(tokens / (time.perf_counter() - started))
                calls = []
                for _ in range(args.calls):
                    started = time.perf_counter()
                    predictor.predict([SENTENCE])
                    calls.append(1000 * (time.perf_counter() - started))
                latency[name].append(statistics.median(calls))
    print(f"| model | tokens/s ({args.data.name}), best of {args.rounds} rounds | one sentence ({len(SENTENCE)} tokens): median ms, best round of {args.rounds} | rounds' medians |")
    print("|---|---|---|---|")
    for name in models:
        label = f"baseline ({args.baseline or args.baseline_ref})" if name == "baseline" else f"model ({args.model})"
        print(f"| {label} | {max(speed[name]):.0f} | {min(latency[name]):.2f} | {', '.join(f'{x:.2f}' for x in latency[name])} |")
    ratio_speed = max(speed["model"]) / max(speed["baseline"])
    ratio_latency = min(latency["model"]) / min(latency["baseline"])
    print(f"\nthroughput model/baseline {ratio_speed:.2f}; one-sentence latency model/baseline {ratio_latency:.2f} (limit: throughput >= 0.80, latency <= 1.20)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
