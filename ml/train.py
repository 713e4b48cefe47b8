"""Training: minimise the tagging loss (CRF negative log-likelihood, or the seed's per-step
cross-entropy summed over time) by backpropagation through time, with gradient-norm clipping and
a decaying learning rate.

``Trainer(model, vocab, data, config, callbacks)`` runs only the loop: batches, loss, backward,
step, and (with dev data) one dev evaluation per epoch. Everything else is a ``Callback`` on its
hooks: ``KeepBest`` (the best dev-F1 weights), ``EarlyStopping``, ``ProgressBar`` (tqdm),
``LogProgress``, ``SaveModel`` and ``WriteMetrics``. What a fine-tune or a train+dev fit changes is
passed in, not edited in: an already-built model, ``optimizer_factory`` (param groups, frozen
layers), ``loss_terms`` (e.g. an L2 pull toward base weights), ``data.dev = None`` with no
dev-selecting callbacks (a fixed epoch count), and examples that are any objects with ``tokens``
and ``spans`` (sentences, or whole documents).

``train(...)`` is the one-call front end: vocabularies, model, the default callbacks.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from ml import word_tuning
from ml.artifact import ModelMeta, build_model, check_version, entity_types, save_model
from ml.config import Config, TrainConfig
from ml.data import Example, Sentence
from ml.data.augment import CaseAugmenter, MentionReplacer, drop_words, recase
from ml.data.tensorize import Batch, tensorize
from ml.device import resolve_device
from ml.distill import distill_casings, load_teachers, pad_targets, teacher_marginals
from ml.embeddings import initialise_embedding, load_vectors, pretrained_keys
from ml.evaluate import Scores
from ml.labels import spans_to_tags, tag_set
from ml.model import Tagger
from ml.predictor import Predictor, evaluate
from ml.vocab import Vocabularies, casing, word_key
from ml.windows import training_windows, with_dev


@dataclass
class TrainData:
    train: Sequence[Example]
    dev: Sequence[Example] | None = None  # None: no dev evaluation (a fixed-epoch fit, e.g. on train+dev)


@dataclass
class EpochLog:
    epoch: int
    loss: float
    lr: float
    tokens_per_second: float
    dev_f1: float  # -1.0 where not measured (no dev data, or a rank other than 0)
    seconds: float


@dataclass
class TrainResult:
    best_epoch: int
    dev: Scores
    history: list[EpochLog] = field(default_factory=list)
    seconds: float = 0.0
    path: Path | None = None


LossTerm = Callable[[Tagger], Tensor]  # an extra scalar added to every batch's loss


def truecase_targets(token_lists: Sequence[Sequence[str]], width: int) -> Tensor:
    """(B, width) casing classes (``ml.vocab.casing``) of the tokens as given, 0 past each end."""
    out = torch.zeros(len(token_lists), width, dtype=torch.long)
    for i, tokens in enumerate(token_lists):
        if tokens:
            out[i, : len(tokens)] = torch.tensor([casing(t) for t in tokens], dtype=torch.long)
    return out


class Objective(nn.Module):
    """The training loss as a module's forward, so DistributedDataParallel sees (and syncs) it,
    extra terms included."""

    def __init__(self, tagger: Tagger, lm_weight: float, loss_terms: Sequence[LossTerm] = (), truecase_weight: float = 0.0, distill_weight: float = 0.0):
        super().__init__()
        self.tagger = tagger
        self.lm_weight = lm_weight
        self.truecase_weight = truecase_weight
        self.distill_weight = distill_weight
        self.loss_terms = list(loss_terms)

    def forward(
        self, words: Tensor, chars: Tensor, cases: Tensor, mask: Tensor, tags: Tensor, lm_targets: Tensor | None,
        truecase: Tensor | None = None, soft: Tensor | None = None,
    ) -> Tensor:
        loss = self.tagger.loss(words, chars, cases, mask, tags, lm_targets, self.lm_weight, truecase, self.truecase_weight, soft, self.distill_weight)
        for term in self.loss_terms:
            loss = loss + term(self.tagger)
        return loss


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def pick_device(spec: str, local_rank: int = 0) -> torch.device:
    """train.device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (ml.device.resolve_device)."""
    return resolve_device(spec, local_rank)


def data_fingerprint(sentences: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for s in sentences:
        h.update(json.dumps([s.tokens, [tuple(x) for x in s.spans]], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def make_batches(sentences: Sequence[Example], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, then sort within pools of 50 batches by length so a batch holds similar lengths
    (little padding), then shuffle the batches."""
    order = list(range(len(sentences)))
    rng.shuffle(order)
    pool = 50 * batch_size
    batches: list[list[int]] = []
    for lo in range(0, len(order), pool):
        chunk = sorted(order[lo : lo + pool], key=lambda i: len(sentences[i].tokens))
        batches.extend(chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


_T = TypeVar("_T")


class _Distributed:
    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.active = self.world > 1

    def start(self, device: torch.device) -> None:
        if self.active and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def broadcast(self, value: _T) -> _T:
        if not self.active:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def stop(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def build_vocab(config: Config, train: Sequence[Example]) -> tuple[Vocabularies, tuple | None]:
    types = {s.label for sent in train for s in sent.spans}
    if not types:
        raise ValueError("the training data has no entities; nothing to learn")
    vectors = None
    extra: list[str] = []
    if config.train.pretrained:
        vectors = load_vectors(config.train.pretrained, config.train.pretrained_max_words)
        extra = pretrained_keys(vectors[0])
    vocab = Vocabularies.build((s.tokens for s in train), tag_set(types, config.model.tag_scheme), extra_words=extra,
                                   fold_char_case=config.model.char_fold_case)
    return vocab, vectors


def build_optimizer(model: Tagger, tc: TrainConfig) -> torch.optim.Optimizer:
    """The default ``optimizer_factory``: one parameter group of every trainable parameter. A
    fine-tune passes its own (param groups with their own lr, some parameters left out)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if tc.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    if tc.optimizer == "nadam":
        return torch.optim.NAdam(params, lr=tc.lr, weight_decay=tc.weight_decay)
    return torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, tc: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """The default ``scheduler_factory``: lr at epoch e = lr / (1 + lr_decay * e), stepped per epoch."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0 / (1.0 + tc.lr_decay * epoch))


class Callback:
    """Hooks the Trainer calls, in the order the callbacks are listed, on every process (check
    ``trainer.is_main`` for what only rank 0 should do). A callback stops training by setting
    ``trainer.should_stop``; rank 0's decision is the one all processes follow."""

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None: ...

    def on_batch_end(self, trainer: Trainer, loss: float, sequences: int, tokens: int) -> None: ...

    def on_epoch_end(self, trainer: Trainer, log: EpochLog) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None:
        """The loop is over; the model's weights may still change here (restored, rounded on save)."""

    def on_result(self, trainer: Trainer, result: TrainResult) -> None:
        """The final weights are measured: ``result.dev`` holds their dev scores (when there is dev data)."""


class Trainer:
    """The training loop over an already-built model (fresh, or loaded to fine-tune) and its vocabularies."""

    def __init__(
        self,
        model: Tagger,
        vocab: Vocabularies,
        data: TrainData,
        config: Config,
        callbacks: Sequence[Callback] = (),
        *,
        device: torch.device | None = None,
        optimizer_factory: Callable[[Tagger, TrainConfig], torch.optim.Optimizer] = build_optimizer,
        scheduler_factory: Callable[[torch.optim.Optimizer, TrainConfig], torch.optim.lr_scheduler.LRScheduler] = build_scheduler,
        loss_terms: Sequence[LossTerm] = (),
        distributed: _Distributed | None = None,
        soft_targets: Mapping[str, Sequence[Tensor]] | None = None,
    ):
        if not data.train:
            raise ValueError("training needs non-empty train data")
        if data.dev is not None and not data.dev:
            raise ValueError("the dev data is empty; pass dev=None to train without a dev set")
        if soft_targets is not None:
            if "as_is" not in soft_targets:
                raise ValueError("the distillation targets need the sequences as they are ('as_is')")
            for casing_, targets in soft_targets.items():
                if len(targets) != len(data.train):
                    raise ValueError(f"{len(targets)} distillation targets ({casing_}) for {len(data.train)} training sequences")
        self.config = config
        self.tc, self.mc = config.train, config.model
        self.dist = distributed or _Distributed()
        self.device = device or pick_device(self.tc.device, self.dist.local_rank)
        self.model = model.to(self.device)
        self.vocab = vocab
        self.data = data
        self.callbacks = list(callbacks)
        # per casing ("as_is", and with train.distill_view = "same" each recasing drawn), per training
        # sequence, the teachers' (len, K) marginals (ml.distill); a casing without its own reads "as_is"
        self.soft_targets = soft_targets
        objective: nn.Module = Objective(self.model, self.mc.lm_weight, loss_terms, self.mc.truecase_weight, self.tc.distill_weight if soft_targets is not None else 0.0)
        if self.dist.active:
            objective = nn.parallel.DistributedDataParallel(objective, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.objective = objective
        self.optimizer = optimizer_factory(self.model, self.tc)
        self.scheduler = scheduler_factory(self.optimizer, self.tc)
        self.predictor = Predictor(self.model, vocab, self.mc.max_word_length, self.device, window_tokens=self.mc.window_tokens, document=self.mc.context == "document")
        self.history: list[EpochLog] = []
        self.epoch = 0
        self.batches_in_epoch = 0  # on this process
        self.selected_epoch = 0  # the epoch whose weights the model ends with (a callback may restore an earlier one)
        self.should_stop = False
        self.started = 0.0
        self.recase = CaseAugmenter()
        self.unk_draws = torch.Generator()
        self.replace = MentionReplacer((), 0.0)

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]

    def evaluate(self) -> Scores:
        assert self.data.dev is not None, "evaluate needs dev data"
        return evaluate(self.predictor, self.data.dev, self.tc.eval_batch_size)

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def fit(self) -> TrainResult:
        self.started = time.perf_counter()
        train_data = self.data.train
        tag_lists = [spans_to_tags(s.spans, len(s.tokens), self.mc.tag_scheme) for s in train_data]
        lm_size = min(self.mc.lm_vocab, len(self.vocab.words)) if self.mc.lm_weight else 0
        rng = random.Random(self.tc.seed)
        # their own generators, so turning augmentation on leaves the batch order unchanged
        self.recase = CaseAugmenter(self.tc.case_lower, self.tc.case_upper, self.tc.case_title, seed=self.tc.seed + 1)
        self.unk_draws = torch.Generator().manual_seed(self.tc.seed + 2)
        self.replace = MentionReplacer(((s.tokens, s.spans) for s in train_data), self.tc.mention_replace, seed=self.tc.seed + 3)
        self._call("on_train_start")
        for epoch in range(1, self.tc.epochs + 1):
            self.epoch = epoch
            epoch_start = time.perf_counter()
            self.model.train()
            batches = make_batches(train_data, self.tc.batch_size, rng)
            if self.dist.active:
                per_rank = math.ceil(len(batches) / self.dist.world)
                batches = (batches + batches[: per_rank * self.dist.world - len(batches)])[self.dist.rank :: self.dist.world]
            self.batches_in_epoch = len(batches)
            self._call("on_epoch_start", epoch)
            total_loss, total_tokens, n_seq = 0.0, 0, 0
            for indices in batches:
                batch = self._batch(*self._sequences(train_data, tag_lists, indices), lm_size, indices)
                value = self._step(batch)
                tokens = int(batch.mask.sum())
                total_loss += value * len(indices)
                total_tokens += tokens
                n_seq += len(indices)
                self._call("on_batch_end", value, len(indices), tokens)
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            seconds = time.perf_counter() - epoch_start
            dev_f1 = self.evaluate().f1 if self.is_main and self.data.dev is not None else -1.0
            log = EpochLog(epoch, total_loss / max(n_seq, 1), lr, total_tokens * self.dist.world / seconds, dev_f1, seconds)
            self.history.append(log)
            self.selected_epoch = epoch
            self._call("on_epoch_end", log)
            if self.dist.broadcast(self.should_stop):
                break
        self._call("on_train_end")
        self.model.eval()
        result = TrainResult(self.selected_epoch, Scores(0, 0, 0, 0, 0, 0), self.history)
        if self.is_main and self.data.dev is not None:
            result.dev = self.evaluate()
        result.seconds = time.perf_counter() - self.started
        self._call("on_result", result)
        return result

    def _sequences(self, data: Sequence[Example], tag_lists: list[list[str]], indices: Sequence[int]) -> tuple[list[Sequence[str]], list[list[str]]]:
        """The tokens and tags of one batch, with the mention replacement of ``train.mention_replace``."""
        if not self.replace.active:
            return [data[i].tokens for i in indices], [tag_lists[i] for i in indices]
        replaced = [self.replace(data[i].tokens, data[i].spans) for i in indices]
        return [tokens for tokens, _ in replaced], [spans_to_tags(spans, len(tokens), self.mc.tag_scheme) for tokens, spans in replaced]

    def _batch(self, token_lists: Sequence[Sequence[str]], tag_lists: list[list[str]], lm_size: int, indices: Sequence[int] = ()) -> Batch:
        """One training batch on the device, with the casing augmentation and word dropout of train.*,
        and the distillation targets of the sequences ``indices`` in the casing each was drawn in."""
        casings = [self.recase.draw() if self.recase.active else "as_is" for _ in token_lists]
        batch = tensorize([recase(tokens, c) for tokens, c in zip(token_lists, casings, strict=True)], self.vocab, self.mc.max_word_length, tag_lists, lm_size)
        if self.soft_targets is not None:
            targets = self.soft_targets
            batch.soft = pad_targets([targets[c if c in targets else "as_is"][i] for i, c in zip(indices, casings, strict=True)], batch.mask.shape[1])
        if self.mc.truecase_weight:  # the casing each token had before recasing: what the truecasing head predicts
            batch.truecase = truecase_targets(token_lists, batch.mask.shape[1])
        if self.tc.word_dropout:
            batch.words = drop_words(batch.words, batch.mask, self.tc.word_dropout, self.unk_draws)
        return batch.to(self.device)

    def _step(self, batch: Batch) -> float:
        loss = self.objective(*batch.inputs, batch.tags, batch.lm_targets, batch.truecase, batch.soft)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.tc.clip_norm:
            nn.utils.clip_grad_norm_(self.trainable, self.tc.clip_norm)
        self.optimizer.step()
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"epoch {self.epoch}: the loss became {value}; lower train.lr or set train.clip_norm")
        return value


class KeepBest(Callback):
    """Selects on dev: keeps a CPU copy of the weights with the best dev F1, restores them at the end."""

    def __init__(self) -> None:
        self.best_f1, self.best_epoch = -1.0, 0
        self.state: dict[str, Tensor] | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.data.dev is None:
            raise ValueError("KeepBest selects weights on dev F1 but the Trainer has no dev data")

    def on_epoch_end(self, trainer: Trainer, log: EpochLog) -> None:
        if trainer.is_main and log.dev_f1 > self.best_f1:
            self.best_f1, self.best_epoch = log.dev_f1, log.epoch
            self.state = copy.deepcopy({k: v.detach().cpu() for k, v in trainer.model.state_dict().items()})

    def on_train_end(self, trainer: Trainer) -> None:
        if trainer.is_main and self.state is not None:
            trainer.model.load_state_dict(self.state)
            trainer.selected_epoch = self.best_epoch


class EarlyStopping(Callback):
    """Stops after ``patience`` epochs without a better dev F1 (0: never)."""

    def __init__(self, patience: int, log: Callable[[str], None] | None = None):
        self.patience = patience
        self.log = log
        self.best_f1, self.stale = -1.0, 0

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.data.dev is None:
            raise ValueError("EarlyStopping watches dev F1 but the Trainer has no dev data")

    def on_epoch_end(self, trainer: Trainer, log: EpochLog) -> None:
        if not trainer.is_main:
            return
        if log.dev_f1 > self.best_f1:
            self.best_f1, self.stale = log.dev_f1, 0
        else:
            self.stale += 1
        if self.patience > 0 and self.stale >= self.patience:
            trainer.should_stop = True
            if self.log is not None:
                self.log(f"early stop: no better dev F1 for {self.patience} epochs")


class ProgressBar(Callback):
    """A tqdm bar per epoch on rank 0: batches done, last loss, tokens per second."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.tokens, self.start = 0, 0.0

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        if trainer.is_main:
            from tqdm import tqdm

            self.bar = tqdm(total=trainer.batches_in_epoch, desc=f"epoch {epoch}/{trainer.tc.epochs}", unit="batch", leave=False, dynamic_ncols=True)
            self.tokens, self.start = 0, time.perf_counter()

    def on_batch_end(self, trainer: Trainer, loss: float, sequences: int, tokens: int) -> None:
        if self.bar is not None:
            self.tokens += tokens
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{self.tokens / (time.perf_counter() - self.start):.0f}")

    def on_epoch_end(self, trainer: Trainer, log: EpochLog) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LogProgress(Callback):
    """One line at the start, one per epoch, one at the end (rank 0)."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.best_f1 = -1.0

    def on_train_start(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        mc, data = trainer.mc, trainer.data
        self.log(
            f"training {mc.cell} ({'bi' if mc.bidirectional else 'uni'}directional, {mc.num_layers} layer(s), {mc.backend}) + {mc.head} "
            f"on {len(data.train)} sequences, dev {len(data.dev) if data.dev is not None else 'none'}, {len(trainer.vocab.words)} word keys, "
            f"{len(trainer.vocab.tags)} tags, {sum(p.numel() for p in trainer.trainable)} trainable parameters, device {trainer.device}, "
            f"{trainer.dist.world} process(es)"
        )

    def on_epoch_end(self, trainer: Trainer, log: EpochLog) -> None:
        if not trainer.is_main:
            return
        line = f"epoch {log.epoch:3d}  loss {log.loss:8.3f}  lr {log.lr:.5f}  {log.tokens_per_second:7.0f} tok/s"
        if trainer.data.dev is not None:
            improved = log.dev_f1 > self.best_f1
            self.best_f1 = max(self.best_f1, log.dev_f1)
            line += f"  dev F1 {100 * log.dev_f1:6.2f}{'  *' if improved else ''}"
        self.log(f"{line}  ({log.seconds:.0f}s)")

    def on_result(self, trainer: Trainer, result: TrainResult) -> None:
        if trainer.is_main:
            dev = f": dev F1 {100 * result.dev.f1:.2f}" if trainer.data.dev is not None else ""
            saved = f"; saved to {result.path}" if result.path else ""
            self.log(f"{'best' if trainer.data.dev is not None else 'last'} epoch {result.best_epoch}{dev}; {result.seconds:.0f}s{saved}")


class AverageWeights(Callback):
    """The model ends with the mean of its weights at the ends of the last ``last`` epochs
    (checkpoint averaging: a flatter point than any single epoch's, and less dependent on where the
    last batches happened to leave the weights). Runs before the word correction is merged, so the
    correction's rows are averaged like every other tensor. Early stopping would cut the window
    short: the epochs actually run are averaged."""

    def __init__(self, last: int):
        if last < 1:
            raise ValueError(f"AverageWeights needs at least one epoch to average, got {last}")
        self.last = last
        self.sum: dict[str, Tensor] = {}
        self.count = 0

    def on_epoch_end(self, trainer: Trainer, log: EpochLog) -> None:
        if log.epoch <= trainer.tc.epochs - self.last:
            return
        with torch.no_grad():  # trained parameters only: a frozen one (the GloVe table) is its own mean
            for key, value in trainer.model.named_parameters():
                if value.requires_grad:
                    copy = value.detach().to("cpu", torch.float64, copy=True)
                    if key in self.sum:
                        self.sum[key] += copy
                    else:
                        self.sum[key] = copy
        self.count += 1

    def on_train_end(self, trainer: Trainer) -> None:
        if not self.count:
            return
        parameters = dict(trainer.model.named_parameters())
        with torch.no_grad():
            for key, total in self.sum.items():
                parameters[key].copy_((total / self.count).to(parameters[key].dtype))
        trainer.selected_epoch = trainer.epoch  # the run's last epoch; config.json records average_last


class SaveModel(Callback):
    """Writes the model folder on rank 0 once the final weights are chosen. Saving rounds the word
    embedding to its stored precision, so the dev scores are then measured on what was saved."""

    def __init__(self, out: Path, name: str, version: str, lineage: dict | None = None):
        self.out = Path(out)
        self.name, self.version = name, version
        self.lineage = dict(lineage or {})

    def on_train_end(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        data, mc = trainer.data, trainer.mc
        meta = ModelMeta(self.name, self.version, trainer.config.language, mc.tag_scheme, entity_types(trainer.vocab), lineage=dict(self.lineage))
        meta.lineage.setdefault("train_sentences", len(data.train))
        meta.lineage.setdefault("train_fingerprint", data_fingerprint(data.train))
        if data.dev is not None:
            meta.lineage.setdefault("dev_fingerprint", data_fingerprint(data.dev))
        config = trainer.config
        if config.train.save_backend:  # e.g. trained on the native recurrence, served by the scripted one (same weights)
            config = config.override([f"model.backend='{config.train.save_backend}'"])
        save_model(self.out, trainer.model, config, trainer.vocab, meta, {})

    def on_result(self, trainer: Trainer, result: TrainResult) -> None:
        if trainer.is_main:
            result.path = self.out


class MergeWordCorrection(Callback):
    """Folds the trained correction of the training words' rows back into one embedding table
    (``ml.word_tuning``) once the final weights are chosen, before they are saved."""

    def on_train_end(self, trainer: Trainer) -> None:
        word_tuning.merge(trainer.model)


class WriteMetrics(Callback):
    """metrics.json in the model folder: dev scores of the saved weights, selected epoch, history."""

    def __init__(self, out: Path):
        self.out = Path(out)

    def on_result(self, trainer: Trainer, result: TrainResult) -> None:
        if not trainer.is_main:
            return
        metrics = {
            "dev": result.dev.to_dict() if trainer.data.dev is not None else None,
            "best_epoch": result.best_epoch,
            "train_seconds": round(result.seconds, 1),
            "device": str(trainer.device),
            "processes": trainer.dist.world,
            "history": [h.__dict__ for h in result.history],
        }
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2))


def default_callbacks(
    config: Config, out: Path | None, name: str, version: str, lineage: dict | None, progress: bool, log: Callable[[str], None], select_on_dev: bool = True
) -> list[Callback]:
    """What ``train`` uses: dev selection and early stopping (unless ``select_on_dev`` is off, for a
    fixed-epoch fit), progress and log lines, then saving and metrics. The order matters: the best
    weights are restored before they are saved."""
    callbacks: list[Callback] = []
    if config.train.average_last:  # the average of the last epochs instead of the best one (dev still scores each)
        callbacks.append(AverageWeights(config.train.average_last))
    elif select_on_dev:
        callbacks += [KeepBest(), EarlyStopping(config.train.patience, log)]
    if progress:
        callbacks.append(ProgressBar())
    callbacks.append(LogProgress(log))
    if out is not None:
        callbacks += [SaveModel(out, name, version, lineage), WriteMetrics(out)]
    return callbacks


def _merge_before_save(callbacks: list[Callback]) -> list[Callback]:
    """Put a ``MergeWordCorrection`` before the first ``SaveModel`` (after ``KeepBest`` restores)."""
    at = next((i for i, c in enumerate(callbacks) if isinstance(c, SaveModel)), len(callbacks))
    return [*callbacks[:at], MergeWordCorrection(), *callbacks[at:]]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train(
    config: Config,
    train_data: Sequence[Example],
    dev_data: Sequence[Example] | None,
    out: Path | None,
    name: str = "model",
    version: str = "0.1.0",
    lineage: dict | None = None,
    progress: bool = True,
    log: Callable[[str], None] = _stderr,
    callbacks: Sequence[Callback] | None = None,
) -> TrainResult:
    """Build the vocabularies and a fresh model from ``config`` and train it with the default
    callbacks (or the given ones). ``dev_data=None`` trains for exactly ``train.epochs`` epochs with
    no dev selection (e.g. a final fit on train+dev)."""
    config.validate()
    if out is not None:
        check_version(version)  # before the epochs, not when the folder is written at the end
    tc = config.train
    dist = _Distributed()
    device = pick_device(tc.device, dist.local_rank)
    dist.start(device)
    try:
        if tc.threads:
            torch.set_num_threads(tc.threads)
        seed_everything(tc.seed)
        if tc.max_train_sentences:
            train_data = list(train_data)[: tc.max_train_sentences]
        if not train_data or (dev_data is not None and not dev_data):
            raise ValueError("training needs non-empty train and dev data (dev_data=None trains without dev)")
        lineage = dict(lineage or {})
        if tc.fit_dev:  # the final fit: dev joins the training data, a fixed epoch count, nothing selected on dev
            if dev_data is None:
                raise ValueError("train.fit_dev needs the dev data to train on")
            lineage.setdefault("dev_fingerprint", data_fingerprint(dev_data))
            lineage.setdefault("fit_dev", True)
            train_data, dev_data = with_dev(train_data, dev_data), None
        vocab, vectors = build_vocab(config, train_data)
        model = build_model(config, vocab, generator=torch.Generator().manual_seed(tc.seed))
        if vectors is not None:
            covered = initialise_embedding(model.word_embedding, vocab.words, *vectors)
            if dist.rank == 0:
                log(f"pretrained {tc.pretrained}: {covered} of {len(vocab.words)} word keys initialised")
        if tc.freeze_embeddings:
            model.word_embedding.weight.requires_grad_(False)
        else:  # only training words get gradients: train a correction of their rows only (ml.word_tuning)
            word_tuning.attach(model, 2 + len({word_key(t) for s in train_data for t in s.tokens}))
        # what one forward pass sees: sentences, or windows of consecutive sentences of a document (ml.windows)
        sequences = training_windows(train_data, config.model.window_tokens, config.model.context == "document")
        soft_targets = None
        if tc.distill_from:  # the teachers' marginals on every training sequence, once (ml.distill)
            teachers = load_teachers(tc.distill_from, vocab)
            lineage.setdefault("teachers", [{"name": t.meta.name, "version": t.meta.version, "path": str(t.path)} for t in teachers])
            soft_targets = {}
            for casing_ in distill_casings(tc):
                if dist.rank == 0:
                    log(f"distillation: the teachers read the training sequences {casing_.replace('_', ' ')}")
                soft_targets[casing_] = teacher_marginals(teachers, [Sentence(recase(s.tokens, casing_)) for s in sequences], log=log if dist.rank == 0 else None)
            del teachers
        lineage.setdefault("train_sentences", len(train_data))
        lineage.setdefault("train_fingerprint", data_fingerprint(train_data))
        if callbacks is None:
            callbacks = default_callbacks(config, out, name, version, lineage, progress, log, select_on_dev=dev_data is not None)
        callbacks = _merge_before_save(list(callbacks))
        trainer = Trainer(model, vocab, TrainData(sequences, dev_data), config, callbacks, device=device, distributed=dist, soft_targets=soft_targets)
        return trainer.fit()
    finally:
        dist.stop()
