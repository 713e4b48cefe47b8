"""Training speed of the two recurrence backends on the same batches (CPU, one thread by default):
the scripted loop (``script``) against torch.nn's fused kernels over packed sequences (``native``).

    python benchmarks/train_speed.py --data ../shared/data/conll2003 --batches 200

Both start from the same weights and see the same batches; the script prints seconds, training
tokens/s and the loss after the last batch of each (equal up to float rounding when the backends
agree)."""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ml.artifact import build_model  # noqa: E402
from ml.config import Config  # noqa: E402
from ml.data import read_corpus  # noqa: E402
from ml.data.tensorize import tensorize  # noqa: E402
from ml.labels import spans_to_tags  # noqa: E402
from ml.train import build_vocab, make_batches  # noqa: E402


def run(backend: str, config: Config, sentences, batches, vocab, threads: int) -> tuple[float, int, float]:
    torch.set_num_threads(threads)
    config = config.override([f"model.backend='{backend}'"])
    torch.manual_seed(1)
    model = build_model(config, vocab, generator=torch.Generator().manual_seed(1))
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    tags = {i: spans_to_tags(sentences[i].spans, len(sentences[i].tokens), config.model.tag_scheme) for b in batches for i in b}
    tokens, loss = 0, float("nan")
    start = time.perf_counter()
    for indices in batches:
        batch = tensorize([sentences[i].tokens for i in indices], vocab, config.model.max_word_length, [tags[i] for i in indices])
        assert batch.tags is not None
        torch.manual_seed(len(indices))  # the same dropout masks for both backends
        value = model.loss(*batch.inputs, batch.tags)
        optimizer.zero_grad()
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.clip_norm)
        optimizer.step()
        tokens += int(batch.mask.sum())
        loss = value.item()
    return time.perf_counter() - start, tokens, loss


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "en-conll03.toml")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], help="config overrides, e.g. model.num_layers=2")
    args = p.parse_args()
    config = Config.load(args.config).override(args.set) if args.set else Config.load(args.config)
    sentences = read_corpus(args.data / "train.txt")
    vocab, _ = build_vocab(config.override(["train.pretrained=''"]), sentences)
    batches = make_batches(sentences, config.train.batch_size, random.Random(1))[: args.batches]
    for backend in ("script", "native" if "native" in __import__("ml.modules.rnn", fromlist=["BACKENDS"]).BACKENDS else "cudnn"):
        seconds, tokens, loss = run(backend, config, sentences, batches, vocab, args.threads)
        print(f"{backend:7s} {len(batches)} batches  {seconds:7.1f} s  {tokens / seconds:7.0f} tok/s  last loss {loss:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
