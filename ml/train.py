"""Training: minimise the tagging loss (CRF negative log-likelihood, or the seed's per-step
cross-entropy summed over time) by backpropagation through time, with gradient-norm clipping,
a decaying learning rate, early stopping on dev entity F1, and the best weights kept.

Runs on CPU or CUDA, and under ``torchrun`` as DistributedDataParallel (gloo on CPU, NCCL on CUDA)
without code changes: each process takes every WORLD_SIZE-th batch, rank 0 evaluates and saves.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ml import word_tuning
from ml.artifact import ModelMeta, build_model, entity_types, save_model
from ml.config import Config
from ml.data import Sentence
from ml.data.tensorize import Batch, tensorize
from ml.embeddings import initialise_embedding, load_vectors, pretrained_keys
from ml.evaluate import Scores
from ml.labels import spans_to_tags, tag_set
from ml.model import Tagger
from ml.predictor import Predictor, evaluate
from ml.vocab import Vocabularies, word_key
from ml.windows import training_windows, with_dev


@dataclass
class EpochLog:
    epoch: int
    loss: float
    lr: float
    tokens_per_second: float
    dev_f1: float
    seconds: float


@dataclass
class TrainResult:
    best_epoch: int
    dev: Scores
    history: list[EpochLog] = field(default_factory=list)
    seconds: float = 0.0
    path: Path | None = None


class Objective(nn.Module):
    """The training loss as a module's forward, so DistributedDataParallel sees (and syncs) it."""

    def __init__(self, tagger: Tagger, lm_weight: float):
        super().__init__()
        self.tagger = tagger
        self.lm_weight = lm_weight

    def forward(self, words: Tensor, chars: Tensor, cases: Tensor, mask: Tensor, tags: Tensor, lm_targets: Tensor | None) -> Tensor:
        return self.tagger.loss(words, chars, cases, mask, tags, lm_targets, self.lm_weight)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def pick_device(spec: str, local_rank: int = 0) -> torch.device:
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device = {spec!r} but CUDA is not available in this torch build ({torch.__version__})")
    return device


def data_fingerprint(sentences: Sequence[Sentence]) -> str:
    h = hashlib.sha256()
    for s in sentences:
        h.update(json.dumps([s.tokens, [tuple(x) for x in s.spans]], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def make_batches(sentences: Sequence[Sentence], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, then sort within pools of 50 batches by length so a batch holds similar lengths
    (little padding), then shuffle the batches."""
    order = list(range(len(sentences)))
    rng.shuffle(order)
    pool = 50 * batch_size
    batches = []
    for lo in range(0, len(order), pool):
        chunk = sorted(order[lo : lo + pool], key=lambda i: len(sentences[i].tokens))
        batches.extend(chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


class _Distributed:
    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.active = self.world > 1

    def start(self, device: torch.device) -> None:
        if self.active and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def broadcast(self, value):
        if not self.active:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def stop(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def build_vocab(config: Config, train: Sequence[Sentence]) -> tuple[Vocabularies, tuple | None]:
    types = {s.label for sent in train for s in sent.spans}
    if not types:
        raise ValueError("the training data has no entities; nothing to learn")
    vectors = None
    extra: list[str] = []
    if config.train.pretrained:
        vectors = load_vectors(config.train.pretrained, config.train.pretrained_max_words)
        extra = pretrained_keys(vectors[0])
    vocab = Vocabularies.build((s.tokens for s in train), tag_set(types, config.model.tag_scheme), extra_words=extra)
    return vocab, vectors


def train(
    config: Config,
    train_data: Sequence[Sentence],
    dev_data: Sequence[Sentence],
    out: Path | None,
    name: str = "model",
    version: str = "0.1.0",
    lineage: dict | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> TrainResult:
    config.validate()
    tc, mc = config.train, config.model
    dist = _Distributed()
    device = pick_device(tc.device, dist.local_rank)
    dist.start(device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    seed_everything(tc.seed)
    started = time.perf_counter()
    if tc.max_train_sentences:
        train_data = list(train_data)[: tc.max_train_sentences]
    if not train_data or not dev_data:
        raise ValueError("training needs non-empty train and dev data")
    if tc.fit_dev:  # the final fit: dev joins the training data, the last epoch is kept (ml.windows keeps documents apart)
        train_data = with_dev(train_data, dev_data)

    vocab, vectors = build_vocab(config, train_data)
    model = build_model(config, vocab, generator=torch.Generator().manual_seed(tc.seed))
    if vectors is not None:
        covered = initialise_embedding(model.word_embedding, vocab.words, *vectors)
        if dist.rank == 0:
            log(f"pretrained {tc.pretrained}: {covered} of {len(vocab.words)} word keys initialised")
    if tc.freeze_embeddings:
        model.word_embedding.weight.requires_grad_(False)
    else:  # only training words get gradients: train a correction of their rows (ml.word_tuning)
        word_tuning.attach(model, 2 + len({word_key(t) for s in train_data for t in s.tokens}))
    model.to(device)
    objective: nn.Module = Objective(model, mc.lm_weight)
    if dist.active:
        objective = nn.parallel.DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    if tc.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    elif tc.optimizer == "nadam":
        optimizer = torch.optim.NAdam(params, lr=tc.lr, weight_decay=tc.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0 / (1.0 + tc.lr_decay * epoch))
    sequences = training_windows(train_data, mc.window_tokens, mc.context == "document")  # what one forward pass sees
    tag_lists = [spans_to_tags(s.spans, len(s.tokens), mc.tag_scheme) for s in sequences]
    predictor = Predictor(model, vocab, mc.max_word_length, device, window_tokens=mc.window_tokens, document=mc.context == "document")
    rng = random.Random(tc.seed)
    lm_size = min(mc.lm_vocab, len(vocab.words)) if mc.lm_weight else 0
    if dist.rank == 0:
        n_params = sum(p.numel() for p in params)
        log(
            f"training {mc.cell} ({'bi' if mc.bidirectional else 'uni'}directional, {mc.num_layers} layer(s), {mc.backend}) + {mc.head} "
            f"on {len(train_data)} sentences ({len(sequences)} windows), dev {len(dev_data)}, {len(vocab.words)} word keys, {len(vocab.tags)} tags, "
            f"{n_params} trainable parameters, device {device}, {dist.world} process(es)"
        )

    best_f1, best_epoch, best_state, stale = -1.0, 0, None, 0
    history: list[EpochLog] = []
    for epoch in range(1, tc.epochs + 1):
        epoch_start = time.perf_counter()
        model.train()
        batches = make_batches(sequences, tc.batch_size, rng)
        if dist.active:
            per_rank = math.ceil(len(batches) / dist.world)
            batches = (batches + batches[: per_rank * dist.world - len(batches)])[dist.rank :: dist.world]
        bar = None
        if progress and dist.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=len(batches), desc=f"epoch {epoch}/{tc.epochs}", unit="batch", leave=False, dynamic_ncols=True)
        total_loss, total_tokens = 0.0, 0
        for indices in batches:
            batch: Batch = tensorize([sequences[i].tokens for i in indices], vocab, mc.max_word_length, [tag_lists[i] for i in indices], lm_size).to(device)
            loss = objective(*batch.inputs, batch.tags, batch.lm_targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.clip_norm:
                nn.utils.clip_grad_norm_(params, tc.clip_norm)
            optimizer.step()
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"epoch {epoch}: the loss became {value}; lower train.lr or set train.clip_norm")
            tokens = int(batch.mask.sum())
            total_loss += value * len(indices)
            total_tokens += tokens
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{total_tokens / (time.perf_counter() - epoch_start):.0f}")
        if bar is not None:
            bar.close()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        seconds = time.perf_counter() - epoch_start
        dev_f1 = -1.0
        if dist.rank == 0:
            dev_f1 = evaluate(predictor, dev_data, tc.eval_batch_size).f1
            n_sent = sum(len(b) for b in batches)
            history.append(EpochLog(epoch, total_loss / max(n_sent, 1), lr, total_tokens * dist.world / seconds, dev_f1, seconds))
            improved = dev_f1 > best_f1
            if improved or tc.fit_dev:
                best_f1, best_epoch, stale = max(dev_f1, best_f1), epoch, 0
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            else:
                stale += 1
            log(
                f"epoch {epoch:3d}  loss {history[-1].loss:8.3f}  lr {lr:.5f}  {history[-1].tokens_per_second:7.0f} tok/s  "
                f"dev F1 {100 * dev_f1:6.2f}{'  *' if improved else ''}  ({seconds:.0f}s)"
            )
        stop = dist.broadcast(tc.patience > 0 and stale >= tc.patience)
        if stop:
            if dist.rank == 0:
                log(f"early stop: no better dev F1 for {tc.patience} epochs")
            break

    result = TrainResult(best_epoch, Scores(0, 0, 0, 0, 0, 0), history)
    if dist.rank == 0:
        assert best_state is not None
        model.load_state_dict(best_state)
        word_tuning.merge(model)
        model.eval()
        if out is not None:
            # save first (rounds the embedding to its stored precision), then measure what was saved
            meta = ModelMeta(name, version, config.language, mc.tag_scheme, entity_types(vocab), lineage=dict(lineage or {}))
            meta.lineage.setdefault("train_sentences", len(train_data))
            meta.lineage.setdefault("train_fingerprint", data_fingerprint(train_data))
            meta.lineage.setdefault("dev_fingerprint", data_fingerprint(dev_data))
            saved = config.override([f"model.backend='{tc.save_backend}'"]) if tc.save_backend else config
            save_model(out, model, saved, vocab, meta, {})
            result.path = Path(out)
        result.dev = evaluate(predictor, dev_data, tc.eval_batch_size)
        result.seconds = time.perf_counter() - started
        if out is not None:
            metrics = {
                "dev": result.dev.to_dict(),
                "best_epoch": best_epoch,
                "train_seconds": round(result.seconds, 1),
                "device": str(device),
                "processes": dist.world,
                "history": [h.__dict__ for h in history],
            }
            (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=2))
        log(f"best epoch {best_epoch}: dev F1 {100 * result.dev.f1:.2f}; {result.seconds:.0f}s" + (f"; saved to {out}" if out else ""))
    dist.stop()
    return result
