"""Same outputs on a whole corpus: the CPU fast path (``ml.fast``) against the scripted model.

    python benchmarks/equivalence.py --data ../shared/data/conll2003/test.txt

Three runs of the same model folder over every sentence, batch 128:

* reference: the scripted ``Tagger.forward`` in float64 (the exact value of the model's computation);
* scripted: ``Tagger.forward`` as it serves without the fast path (float32, TorchScript);
* fast: ``Predictor.predict`` through ``ml.fast.FastTagger``, batched, then one sentence at a time.

Prints tag mismatches and the largest marginal difference of each against the reference. The
fast path computes the CRF in float64, so it is compared with the float64 reference; the float32
scripted run's own distance to that reference is printed beside it (its log-space recursions lose
precision on long sentences). Exits 1 if the fast path differs from the reference by more than
``--tolerance`` or in any tag.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "conll2003" / "test.txt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the bundled model)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CoNLL file (default: CoNLL++ test)")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)

    from ml.artifact import default_model_path, load_model
    from ml.data import read_corpus
    from ml.data.tensorize import tensorize
    from ml.predictor import Predictor

    folder = args.model or str(default_model_path())
    sentences = [s.tokens for s in read_corpus(args.data, fmt="conll")]
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))

    loaded = load_model(folder, backend="script")
    model = loaded.model.double()
    itos = loaded.vocab.tags.itos
    ref_tags: list[list[str]] = [[] for _ in sentences]
    ref_scores: list[list[float]] = [[] for _ in sentences]
    with torch.inference_mode():
        for lo in range(0, len(order), args.batch_size):
            chunk = order[lo : lo + args.batch_size]
            batch = tensorize([sentences[i] for i in chunk], loaded.vocab, loaded.config.model.max_word_length)
            tags, scores = model(*batch.inputs)
            for row, i in enumerate(chunk):
                n = len(sentences[i])
                ref_tags[i] = [itos[k] for k in tags[row, :n].tolist()]
                ref_scores[i] = scores[row, :n].tolist()

    def compare(name: str, results) -> tuple[int, float]:
        mismatches = sum(a != b for r, t in zip(results, ref_tags, strict=True) for a, b in zip(r.tags, t, strict=True))
        worst = max(abs(a - b) for r, s in zip(results, ref_scores, strict=True) for a, b in zip(r.scores, s, strict=True))
        print(f"| {name} | {mismatches} | {worst:.2e} |")
        return mismatches, worst

    scripted = Predictor.load(folder, fast=False)
    fast = Predictor.load(folder, fast=True)
    tokens = sum(len(s) for s in sentences)
    print(f"\n{args.data.name}: {len(sentences)} sentences, {tokens} tokens; reference: scripted Tagger.forward in float64\n")
    print("| path | tags differing from the reference | largest marginal difference |")
    print("|---|---|---|")
    compare(f"scripted, float32, batch {args.batch_size}", scripted.predict(sentences, args.batch_size))
    checks = [
        compare(f"fast, batch {args.batch_size}", fast.predict(sentences, args.batch_size)),
        compare("fast, one sentence at a time", [fast.predict([s])[0] for s in sentences]),
    ]
    ok = all(m == 0 and w <= args.tolerance for m, w in checks)
    print(f"\nfast path within {args.tolerance:g} of the reference with identical tags: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
