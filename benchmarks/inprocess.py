"""In-process speed against a spaCy NER pipeline, in one run on one machine.

    python benchmarks/inprocess.py                                   # bundled model vs spaCy
    python benchmarks/inprocess.py --model models/en-conll03 --model /tmp/old-model --repeats 3

Both sides tag the same pre-tokenized CoNLL++ test sentences (the tokenizer is not timed on either
side): ours through ``Predictor.predict``, spaCy through ``nlp.pipe`` over ``Doc``s built from the same
words. The spaCy peer is the stock ``spacy init config --pipeline ner --optimize efficiency``
architecture with the four CoNLL labels and randomly initialised weights (which run at the speed of
trained ones). Prints a Markdown table: tokens/s at batch 128 on ``--threads`` threads (min-max over
``--repeats`` runs) and the p50/p90 of one sentence of 12-20 tokens at a time on one thread (on a
freshly loaded predictor, so that no cache holds the words of the batch run), with the ratio to spaCy. Nothing here is a test: numbers depend on the machine and what else runs on it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "conll2003" / "test.txt"


def read_sentences(path: Path) -> list[list[str]]:
    from ml.data import read_corpus

    return [s.tokens for s in read_corpus(path, fmt="conll")]


def throughput(run_batch: Callable[[Sequence[Sequence[str]]], object], sentences: list[list[str]], repeats: int) -> list[float]:
    tokens = sum(len(s) for s in sentences)
    run_batch(sentences[:256])  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_batch(sentences)
        rates.append(tokens / (time.perf_counter() - start))
    return rates


def latency(run_one: Callable[[Sequence[str]], object], sentences: list[list[str]]) -> tuple[float, float]:
    for s in sentences[:20]:
        run_one(s)
    times = []
    for s in sentences:
        start = time.perf_counter()
        run_one(s)
        times.append(time.perf_counter() - start)
    q = statistics.quantiles(times, n=10)
    return statistics.median(times) * 1000, q[8] * 1000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="model folder (repeatable; default: the bundled model)")
    parser.add_argument("--backend", choices=["script", "native", "cudnn"], action="append", help="recurrence backend(s) to time (default: script)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CoNLL file of sentences (default: CoNLL++ test)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the batch-128 run")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--single", type=int, default=300, help="sentences of 12-20 tokens timed one at a time")
    parser.add_argument("--no-spacy", action="store_true")
    args = parser.parse_args(argv)

    from ml.artifact import default_model_path
    from ml.predictor import Predictor

    sentences = read_sentences(args.data)
    singles = [s for s in sentences if 12 <= len(s) <= 20][: args.single]
    tokens = sum(len(s) for s in sentences)
    rows: list[tuple[str, list[float], tuple[float, float]]] = []

    def measure(name: str, batch_fn, one_fn, fresh=None) -> None:
        torch.set_num_threads(args.threads)
        rates = throughput(batch_fn, sentences, args.repeats)
        torch.set_num_threads(1)
        rows.append((name, rates, latency(fresh() if fresh else one_fn, singles)))

    for folder in args.model or [str(default_model_path())]:
        for backend in args.backend or ["script"]:
            predictor = Predictor.load(folder, backend=backend)
            meta = predictor.loaded.meta if predictor.loaded else None
            path = "ml.fast" if getattr(predictor, "fast", None) is not None else f"{backend} backend"
            name = f"{meta.name} {meta.version} ({path})" if meta else f"{folder} ({path})"

            def fresh(folder=folder, backend=backend):
                # one sentence on a freshly loaded predictor: any cache it keeps starts as after
                # loading, not filled with the words of the batch run
                again = Predictor.load(folder, backend=backend)
                return lambda s: again.predict([s])

            measure(name, lambda b, p=predictor: p.predict(b, args.batch_size), None, fresh)

    if not args.no_spacy:
        from spacy.tokens import Doc

        sys.path.insert(0, str(ROOT))  # the peer pipeline is the one benchmarks/spacy_service.py serves
        from benchmarks.spacy_service import spacy_peer

        nlp = spacy_peer()

        def spacy_batch(batch):
            for _ in nlp.pipe((Doc(nlp.vocab, words=list(s)) for s in batch), batch_size=args.batch_size):
                pass

        def spacy_one(s):
            nlp(Doc(nlp.vocab, words=list(s)))

        measure("spaCy efficiency NER (peer)", spacy_batch, spacy_one)

    peer = rows[-1] if not args.no_spacy else None
    print(f"\n{len(sentences)} sentences, {tokens} tokens ({args.data.name}); batch {args.batch_size} on {args.threads} thread(s), "
          f"{args.repeats} runs; one sentence: {len(singles)} sentences of 12-20 tokens on 1 thread\n")
    print("| system | tokens/s, batch (min-max) | ratio to spaCy | one sentence p50 / p90 (ms) | ratio to spaCy (p50) |")
    print("|---|---|---|---|---|")
    for name, rates, (p50, p90) in rows:
        ratio_t = f"{min(rates) / max(peer[1]):.2f}-{max(rates) / min(peer[1]):.2f}x" if peer else ""
        ratio_l = f"{peer[2][0] / p50:.2f}x" if peer else ""
        print(f"| {name} | {min(rates):,.0f}-{max(rates):,.0f} | {ratio_t} | {p50:.2f} / {p90:.2f} | {ratio_l} |")


if __name__ == "__main__":
    main()
