"""Fine-tuning a served model on stored corrections: minutes, not a from-scratch training.

``finetune(inputs, config)`` runs five steps, each its own function:

* **prepare**: load the base, split the corrections by document into the gate's held-out parts (one
  in ``holdout_every`` by a hash of the key, stable across versions; and the newest
  ``time_holdout`` fraction, the time split), an early-stopping part of the training documents (one
  in ``stop_every``; never the gate's), and the training part; tokenize; tag stored texts with the
  base (rehearsal, distillation) and keep the other half of them for the forgetting probe.
* **grow**: new word keys, characters and labels join the model; every base weight keeps its value
  and the grown model predicts what the base did (``grow``).
* **fit**: the ``ml.train.Trainer`` with the regularisers against forgetting: elastic weight
  consolidation with the base folder's Fisher diagonal (``ml.anchoring``; strength scaled by the
  base corpus's size over the corrections'), distillation toward the base's marginals on stored
  texts, the base corpus mixed in when an operator provides it, and an epoch count and learning
  rate chosen by the data's size (``schedule``), with early stopping on the stopping part.
* **measure**: the reference (the base, or the version being served) and the candidate on each
  held-out part: F1, and F1 on the mentions whose text never occurs among the training
  corrections' mentions (unseen names: what carries over, not what was memorised); the forgetting
  probe (does the candidate keep the base's confident predictions on stored texts nobody
  corrected?); base-corpus dev F1 when given.
* **record**: the model folder, its lineage and ``metrics.json``.

``ml.gate.promotion_decision`` is the gate over those measures. Torch only: the service exports
the corrections and calls this module.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ml import anchoring
from ml.artifact import LoadedModel, ModelMeta, build_model, check_version, entity_types, load_model, save_model
from ml.config import Config, ConfigError, TrainConfig, build_dataclass
from ml.data import DataFormatError, Sentence
from ml.data.tensorize import tensorize
from ml.evaluate import entity_scores
from ml.labels import Span, tag_set
from ml.model import Tagger
from ml.predictor import Predictor
from ml.train import Callback, EarlyStopping, EpochLog, KeepBest, TrainData, Trainer
from ml.vocab import UNK_ID, Vocab, Vocabularies, fold_char, word_key
from ml.windows import group_texts

FREEZABLE = ("word_embedding", "char_encoder", "case_embedding", "encoder", "projection", "head")
MIN_SPLIT_DOCUMENTS = 20  # below this many corrected documents there is no time split
MIN_STOP_DOCUMENTS = 50  # below this many training documents there is no early stopping (its part would be a few documents: noise)


class Cancelled(RuntimeError):
    """Raised from inside the loop when ``should_stop`` says so (e.g. the job was taken over)."""


@dataclass
class FinetuneConfig:
    # defaults chosen on the held-out parts of 100 posted WikiGold articles and CoNLL-2003 dev (docs/learning-loop.md)
    epochs: int = 0  # 0: by the data's size (about target_steps optimiser steps, within min_epochs..max_epochs)
    target_steps: int = 700
    unwatched_steps: int = 300  # the budget when there is no stopping part (too few documents): overfitting is not watched
    min_epochs: int = 3
    max_epochs: int = 30
    batch_size: int = 16  # sentences
    lr: float = 0.001  # Adam
    clip_norm: float = 5.0
    ewc: float = 100.0  # elastic weight consolidation: lambda = ewc * N_base / N_corrections (needs fisher.safetensors in the base folder)
    distill: float = 0.0  # weight of the KL divergence to the base's marginals on stored texts
    l2_to_base: float = 0.0  # weight of sum((theta - theta_base)^2), added to the loss (EWC without a Fisher)
    pull_to_base: float = 0.0  # after each step, this fraction of (theta - theta_base) is undone (decoupled)
    freeze: list[str] = field(default_factory=list)  # parts of FREEZABLE whose old weights stay fixed
    rehearsal_ratio: float = 0.0  # silver sentences (stored texts tagged by the base) per correction sentence and epoch
    base_ratio: float = 1.0  # base-corpus sentences per correction sentence and epoch, when the base corpus is given
    correction_weight: int = 1  # times each training correction is seen per epoch
    word_dropout: float = 0.2  # share of training words read as <unk> (the tag must come from context and characters, not a memorised name)
    mention_replace: float = 0.0  # probability that a training mention is swapped for another of its label (ml.data.augment.MentionReplacer)
    holdout_every: int = 5  # one document in N is held out for the gate, by hash (0: none)
    time_holdout: float = 0.1  # the newest fraction of the documents is held out for the gate (0: none)
    stop_every: int = 10  # one training document in N decides early stopping (0: a fixed epoch count)
    patience: int = 5  # epochs without a better F1 on the stopping part before stopping
    probe_confidence: float = 0.9  # the base's spans at least this sure are what the forgetting probe checks
    seed: int = 1
    threads: int = 0  # torch CPU threads; 0 = torch's default
    pretrained_max_words: int = 400000  # pretrained vectors searched for new words

    def validate(self) -> FinetuneConfig:
        ranges = [(n, "positive", lambda v: v > 0) for n in ("target_steps", "unwatched_steps", "min_epochs", "max_epochs", "batch_size", "lr", "correction_weight")]
        ranges += [(n, "non-negative", lambda v: v >= 0) for n in (
            "epochs", "clip_norm", "ewc", "distill", "l2_to_base", "rehearsal_ratio", "base_ratio", "holdout_every", "stop_every", "patience", "threads")]
        ranges += [(n, "in [0, 1)", lambda v: 0.0 <= v < 1.0) for n in ("pull_to_base", "time_holdout", "probe_confidence", "word_dropout")]
        ranges += [("mention_replace", "in [0, 1]", lambda v: 0.0 <= v <= 1.0)]
        ranges += [(n, "0 (none) or at least 2 (1 would take every document)", lambda v: v != 1) for n in ("holdout_every", "stop_every")]
        for name, wanted, ok in ranges:
            if not ok(getattr(self, name)):
                raise ConfigError(f"finetune.{name} must be {wanted}, got {getattr(self, name)}")
        if self.min_epochs > self.max_epochs:
            raise ConfigError(f"finetune.min_epochs={self.min_epochs} is more than finetune.max_epochs={self.max_epochs}")
        if not all(isinstance(p, str) for p in self.freeze):
            raise ConfigError(f"finetune.freeze must be a list of part names, got {self.freeze!r}")
        unknown = sorted(set(self.freeze) - set(FREEZABLE))
        if unknown:
            raise ConfigError(f"finetune.freeze: unknown parts {unknown}; known: {list(FREEZABLE)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "finetune") -> FinetuneConfig:
        """Validated settings from a mapping (unknown keys and wrong types are errors: ml.config's builder)."""
        return build_dataclass(cls, dict(data), source).validate()

    def override(self, assignments: Sequence[str]) -> FinetuneConfig:
        """``key=value`` strings (numbers as JSON; freeze as a comma-separated list)."""
        data = self.to_dict()
        for item in assignments:
            key, sep, raw = item.partition("=")
            key = key.strip().removeprefix("finetune.")
            if not sep or key not in data:
                raise ConfigError(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(data)}")
            if key == "freeze":
                data[key] = [p.strip() for p in raw.split(",") if p.strip()]
                continue
            try:
                data[key] = json.loads(raw)
            except json.JSONDecodeError:
                raise ConfigError(f"--set {item!r}: {raw!r} is not a number") from None
        return FinetuneConfig.from_dict(data, "--set")


# --- corrections and the splits -----------------------------------------------------------------


@dataclass
class Correction:
    key: str  # the document's identity (database id, else a hash of the text): decides the split
    text: str
    entities: list[tuple[int, int, str]]


def _bucket(key: str, salt: str = "") -> int:
    return int.from_bytes(hashlib.sha256((salt + key).encode("utf-8")).digest()[:8], "big")


def is_held_out(key: str, every: int) -> bool:
    """Deterministic 1-in-``every`` split by document: stable across runs, versions and machines."""
    return every > 0 and _bucket(key) % every == 0


def read_corrections(path: str | Path) -> list[Correction]:
    """JSONL as ``GET /annotations?format=jsonl`` exports it; the key is ``meta.document_id`` when
    present, else the SHA-256 of the text (so any JSONL of texts and entities works too)."""
    from ml.data.jsonl import parse_record

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corrections file {path} does not exist")
    out: list[Correction] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text, entities = parse_record(record)
            except json.JSONDecodeError as e:
                raise DataFormatError(path, number, f"invalid JSON: {e.msg} at column {e.colno}") from None
            except ValueError as e:
                raise DataFormatError(path, number, str(e)) from None
            meta = record.get("meta") or {}
            key = meta.get("document_id") if isinstance(meta, dict) else None
            out.append(Correction(str(key) if key else hashlib.sha256(text.encode("utf-8")).hexdigest(), text, entities))
    if not out:
        raise DataFormatError(path, 1, "no corrections found")
    return out


def to_sentences(corrections: Sequence[Correction], language: str) -> list[Sentence]:
    from ml.data.jsonl import text_to_sentences

    out: list[Sentence] = []
    for k, c in enumerate(corrections):
        out.extend(text_to_sentences(c.text, c.entities, language, doc_id=k, allow_partial=True))
    return out


def split_corrections(corrections: Sequence[Correction], every: int) -> tuple[list[Correction], list[Correction]]:
    """(the rest, the hash-held-out part)."""
    train: list[Correction] = []
    held: list[Correction] = []
    for c in corrections:
        (held if is_held_out(c.key, every) else train).append(c)
    return train, held


@dataclass
class Splits:
    train: list[Correction]
    stop: list[Correction]  # early stopping (a part of the training corrections, never the gate's)
    heldout: list[Correction]  # the gate's, by hash
    time: list[Correction]  # the gate's: the newest documents (not already held out by hash)


def split_all(corrections: Sequence[Correction], cfg: FinetuneConfig) -> Splits:
    """The four parts. ``corrections`` come oldest first (as the service exports them); a later
    correction of the same document keeps its key and so its side of the hash split."""
    rest, held = split_corrections(corrections, cfg.holdout_every)
    newest = math.floor(cfg.time_holdout * len(corrections)) if len(corrections) >= MIN_SPLIT_DOCUMENTS else 0
    time_part = rest[len(rest) - newest :] if newest else []
    rest = rest[: len(rest) - newest]
    stop: list[Correction] = []
    if cfg.stop_every and len(rest) >= MIN_STOP_DOCUMENTS:
        stop = [c for c in rest if _bucket(c.key, "stop") % cfg.stop_every == 0]
        rest = [c for c in rest if _bucket(c.key, "stop") % cfg.stop_every != 0]
    return Splits(rest, stop, held, time_part)


# --- growing the base model ---------------------------------------------------------------------


@dataclass
class Growth:
    new_words: list[str]
    new_chars: list[str]
    new_labels: list[str]
    pretrained_words: int  # new words initialised from pretrained vectors


def _grown_vocab(vocab: Vocabularies, sentences: Sequence[Sentence], scheme: str) -> tuple[Vocabularies, Growth]:
    new_words = sorted({word_key(t) for s in sentences for t in s.tokens} - set(vocab.words.stoi))
    seen_chars = {ch for s in sentences for t in s.tokens for ch in t} - set(vocab.chars.stoi)
    fold = vocab.chars.fold_case  # a case-folded table grows by lower-case characters (and the others' aliases)
    new_chars = sorted({fold_char(ch) for ch in seen_chars} - set(vocab.chars.stoi) if fold else seen_chars)
    aliases = {**vocab.chars.aliases, **{ch: fold_char(ch) for ch in seen_chars if fold and fold_char(ch) != ch}}
    new_labels = sorted({sp.label for s in sentences for sp in s.spans} - set(entity_types(vocab)))
    new_tags = [t for t in tag_set(new_labels, scheme) if t != "O"] if new_labels else []
    grown = Vocabularies(
        Vocab(vocab.words.itos[2:] + new_words), Vocab(vocab.chars.itos[2:] + new_chars, fold_case=fold, aliases=aliases if fold else None), Vocab(vocab.tags.itos + new_tags, specials=False),
    )
    return grown, Growth(new_words, new_chars, new_labels, 0)


@torch.no_grad()
def _copy_grown(name: str, source: Tensor, target: Tensor, old_tags: int) -> None:
    """One base tensor into its grown counterpart; new rows start where they change nothing."""
    if source.shape == target.shape:
        target.copy_(source)
    elif name in ("word_embedding.weight", "char_encoder.embedding.weight"):
        target[: source.size(0)] = source
        target[source.size(0) :] = source[UNK_ID]  # new keys start as <unk> did
    elif name == "projection.weight":
        target[:old_tags] = source
        target[old_tags:].normal_(0.0, 0.01)
    elif name == "projection.bias":
        target[:old_tags] = source
        target[old_tags:] = source.min() - 2.0  # new tags start unlikely: the grown model predicts what the base did
    elif name == "head.transitions":
        target.zero_()
        target[:old_tags, :old_tags] = source
    elif name in ("head.start", "head.end"):
        target.zero_()
        target[:old_tags] = source
    elif not (name.startswith("head.") and name.endswith("_penalty")):  # penalties: rebuilt from the grown tag set
        raise ValueError(f"cannot grow parameter {name} from {tuple(source.shape)} to {tuple(target.shape)}")


def grow(loaded: LoadedModel, sentences: Sequence[Sentence], pretrained: tuple[list[str], Any] | None) -> tuple[Tagger, Vocabularies, Growth]:
    """A model whose vocabularies cover ``sentences`` and whose tag set covers their labels, with
    every base weight copied over. New ids are appended, so old ids (and weights) do not move."""
    grown, growth = _grown_vocab(loaded.vocab, sentences, loaded.config.model.tag_scheme)
    model = build_model(loaded.config, grown, generator=torch.Generator().manual_seed(0))
    base = loaded.model.state_dict()
    for name, target in model.state_dict().items():
        if name in base:  # the auxiliary LM head is training-only and not saved
            _copy_grown(name, base[name], target, len(loaded.vocab.tags))
    if pretrained is not None and growth.new_words:
        words, vectors = pretrained
        index: dict[str, int] = {}
        for row, w in enumerate(words):
            index.setdefault(word_key(w), row)
        emb = model.word_embedding.weight
        with torch.no_grad():
            for key in growth.new_words:
                if key in index and vectors.shape[1] == emb.size(1):
                    emb[grown.words.stoi[key]] = torch.from_numpy(vectors[index[key]].copy()).to(emb)
                    growth.pretrained_words += 1
    return model, grown, growth


def _freeze_old(model: Tagger, parts: Sequence[str], old_sizes: dict[str, int]) -> list[Any]:
    """Zero the gradients of the base's weights in ``parts``; rows added by ``grow`` stay trainable."""
    handles = []
    for name, p in model.named_parameters():
        if not any(name == part or name.startswith(part + ".") for part in parts):
            continue
        rows = old_sizes.get(name)
        if rows is None or rows >= p.size(0):
            p.requires_grad_(False)
            continue
        mask = torch.zeros_like(p)
        mask[rows:] = 1.0
        handles.append(p.register_hook(lambda g, m=mask: g * m))
    return handles


# --- the steps ----------------------------------------------------------------------------------


@dataclass
class FinetuneInputs:
    base_dir: str | Path
    corrections: Sequence[Correction]  # oldest first
    version: str
    out: Path | None = None  # None: nothing is saved (measured in memory)
    name: str | None = None  # default: the base's
    base_data: tuple[Sequence[Sentence], Sequence[Sentence]] | None = None  # (train, dev) of the base corpus, when an operator has it
    stored_texts: Sequence[str] = ()  # texts the service stored that nobody corrected: rehearsal, distillation, forgetting probe
    reference: str | Path | None = None  # the model the candidate is compared with (default: the base)
    lineage: dict[str, Any] = field(default_factory=dict)
    pretrained: tuple[list[str], Any] | bool | None = True  # True: the base config's vectors when installed


@dataclass
class Prepared:
    loaded: LoadedModel
    splits: Splits
    train: list[Sentence]
    stop: list[Sentence]
    heldout: list[Sentence]
    time: list[Sentence]
    silver: list[Sentence]  # stored texts tagged by the base (rehearsal / distillation)
    probe: list[list[list[str]]]  # stored texts (token lists per sentence) for the forgetting probe
    base_train: list[Sentence]
    base_dev: list[Sentence]
    fisher: anchoring.Fisher | None


@dataclass
class Schedule:
    epochs: int  # at most; early stopping may end sooner
    lr: float
    ewc_lambda: float  # 0 without a Fisher
    steps_per_epoch: int


def schedule(cfg: FinetuneConfig, train_sentences: int, fisher_sentences: int, stopping: bool = True) -> Schedule:
    """Epochs for about ``target_steps`` optimiser steps (10 texts get many passes, 5,000 few), or
    ``unwatched_steps`` when no stopping part watches for overfitting (few documents), and the
    EWC strength N_base / N_corrections (a small set of corrections moves the weights little)."""
    steps = max(1, math.ceil(train_sentences * cfg.correction_weight / cfg.batch_size))
    budget = cfg.target_steps if stopping else min(cfg.target_steps, cfg.unwatched_steps)
    epochs = cfg.epochs or min(cfg.max_epochs, max(cfg.min_epochs, math.ceil(budget / steps)))
    ewc = cfg.ewc * fisher_sentences / max(train_sentences, 1) if fisher_sentences else 0.0
    return Schedule(epochs, cfg.lr, ewc, steps)


def _tag_stored(predictor: Predictor, texts: Sequence[str], language: str) -> list[list[Sentence]]:
    """Stored texts tokenized and tagged by ``predictor``: one list of sentences per text."""
    from ml.data.tokenizer import get_tokenizer

    token_texts = [[[t.text for t in sent] for sent in sents if sent] for sents in get_tokenizer(language).pipe_sentences(list(texts))]
    token_texts = [t for t in token_texts if t]
    tagged = predictor.predict_texts(token_texts) if token_texts else []
    return [[Sentence(list(tokens), [Span(p.start, p.end, p.label) for p in r.spans]) for tokens, r in zip(text, results, strict=True)]
            for text, results in zip(token_texts, tagged, strict=True)]


def prepare(inputs: FinetuneInputs, cfg: FinetuneConfig, progress: Callable[[float, str], None]) -> Prepared:
    """Load the base, split and tokenize the corrections, tag the stored texts with the base."""
    loaded = load_model(inputs.base_dir, "cpu")
    language = loaded.config.language
    splits = split_all(inputs.corrections, cfg)
    if not splits.train:
        raise ValueError(f"all {len(inputs.corrections)} corrections fall in the held-out parts; fine-tuning needs more corrections")
    # the probe's texts and the training's (rehearsal, distillation) are disjoint halves of the stored texts
    probe_texts = [t for t in inputs.stored_texts if _bucket(t, "probe") % 2 == 0]
    train_texts = [t for t in inputs.stored_texts if _bucket(t, "probe") % 2 == 1] if cfg.rehearsal_ratio > 0 or cfg.distill > 0 else []
    base_predictor = Predictor(loaded.model, loaded.vocab, loaded.config.model.max_word_length)
    silver = [s for text in _tag_stored(base_predictor, train_texts, language) for s in text]
    fisher = _base_fisher(inputs.base_dir, loaded, cfg, progress)
    train_base, dev_base = (list(inputs.base_data[0]), list(inputs.base_data[1])) if inputs.base_data is not None else ([], [])
    prepared = Prepared(
        loaded, splits, to_sentences(splits.train, language), to_sentences(splits.stop, language), to_sentences(splits.heldout, language),
        to_sentences(splits.time, language), silver, [[s.tokens for s in text] for text in _tag_stored(base_predictor, probe_texts, language)],
        train_base, dev_base, fisher,
    )
    progress(0.0, f"{len(splits.train)} training documents ({len(prepared.train)} sentences), {len(splits.stop)} for early stopping, "
             f"{len(splits.heldout)} held out by hash and {len(splits.time)} newest held out ({len(prepared.heldout) + len(prepared.time)} sentences); "
             f"{len(inputs.stored_texts)} stored texts ({len(prepared.probe)} probe the forgetting)")
    return prepared


def _base_fisher(folder: str | Path, loaded: LoadedModel, cfg: FinetuneConfig, progress: Callable[[float, str], None]) -> anchoring.Fisher | None:
    """The base folder's Fisher diagonal when it belongs to these weights (measured on them, or on the
    model they were fine-tuned from, as the lineage says); else None, and the job's log says why.
    Loaded with ``ewc`` = 0 too: the new version carries it along for later fine-tunes."""
    fisher = anchoring.load_fisher(folder)
    if fisher is None:
        if cfg.ewc > 0:
            progress(0.0, f"the base folder has no {anchoring.FISHER_FILE}: no weight consolidation (ner fisher computes it from the base corpus)")
        return None
    if fisher.measured_on not in (anchoring.weights_digest(folder), loaded.meta.lineage.get("fisher_measured_on")):
        progress(0.0, f"the base folder's {anchoring.FISHER_FILE} was measured on other weights (a model replaced in place?): "
                      "no weight consolidation; recompute it with ner fisher")
        return None
    return fisher


def _vectors(inputs: FinetuneInputs, loaded: LoadedModel, cfg: FinetuneConfig, progress: Callable[[float, str], None]) -> tuple[list[str], Any] | None:
    if inputs.pretrained is True:
        source = loaded.config.train.pretrained
        if not source:
            return None
        try:
            from ml.embeddings import load_vectors

            return load_vectors(source, cfg.pretrained_max_words)
        except (RuntimeError, FileNotFoundError) as e:
            progress(0.0, f"pretrained vectors {source!r} not available ({e}); new words start as <unk>")
            return None
    return inputs.pretrained or None


class DistillTerm:
    """KL(base marginals || model marginals) on batches of stored sentences, one batch per step,
    cycling: the model keeps the base's view of the users' own texts. The batches are read with the
    base's vocabularies (old ids do not move in the grown model; a word new to it reads as <unk>, as
    the base read it) and the base's tags come first in the grown tag set."""

    def __init__(self, base: Tagger, vocab: Vocabularies, sentences: Sequence[Sentence], max_word_length: int, batch_size: int, weight: float):
        self.weight = weight
        self.batches = []
        with torch.no_grad():
            for lo in range(0, len(sentences), batch_size):
                batch = tensorize([s.tokens for s in sentences[lo : lo + batch_size]], vocab, max_word_length)
                self.batches.append((batch, base.marginals(*batch.inputs)))
        self.next = 0

    def __call__(self, model: Tagger) -> Tensor:
        batch, target = self.batches[self.next % len(self.batches)]
        self.next += 1
        mask = batch.inputs[3]
        model_marginals = model.marginals(*batch.inputs)
        k = target.size(2)  # the base's tags come first in the grown tag set
        kl = target * (target.clamp(min=1e-8).log() - model_marginals[:, :, :k].clamp(min=1e-8).log())
        return self.weight * kl.sum() / mask.size(0)


class _FinetuneHooks(Callback):
    """The pull toward the base after each step, the stop request, progress after each epoch."""

    def __init__(self, anchors: list[anchoring.Anchor], pull: float, epochs: int, progress: Callable[[float, str], None], should_stop: Callable[[], bool]):
        self.anchors, self.pull, self.epochs, self.progress, self.should_stop = anchors, pull, epochs, progress, should_stop

    def on_batch_end(self, trainer: Trainer, loss: float, sequences: int, tokens: int) -> None:
        if self.pull:
            anchoring.pull(self.anchors, self.pull)
        if self.should_stop():
            raise Cancelled("fine-tuning stopped on request")

    def on_epoch_end(self, trainer: Trainer, log: EpochLog) -> None:
        stop = f", early-stopping F1 {100 * log.dev_f1:.2f}" if log.dev_f1 >= 0 else ""
        self.progress(log.epoch / self.epochs, f"epoch {log.epoch}/{self.epochs}: loss {log.loss:.3f}{stop} ({log.seconds:.1f}s)")


def _train_config(loaded: LoadedModel, cfg: FinetuneConfig, plan: Schedule) -> Config:
    base = loaded.config.to_dict()
    return Config.from_dict({**base, "train": {
        **base["train"], "epochs": plan.epochs, "batch_size": cfg.batch_size, "optimizer": "adam", "lr": plan.lr, "lr_decay": 0.0,
        "weight_decay": 0.0, "clip_norm": cfg.clip_norm, "seed": cfg.seed, "device": "cpu", "threads": cfg.threads, "patience": cfg.patience,
        "average_last": 0,  # the base recipe's checkpoint averaging is not the fine-tune's (its own callbacks run)
        "mention_replace": cfg.mention_replace,
    }})


def _loss_terms(model: Tagger, prep: Prepared, cfg: FinetuneConfig, plan: Schedule, anchors: list[anchoring.Anchor]) -> list[Callable[[Tagger], Tensor]]:
    terms: list[Callable[[Tagger], Tensor]] = []
    if plan.ewc_lambda:
        fisher_anchors = anchors
        terms.append(lambda m: 0.5 * plan.ewc_lambda * anchoring.penalty(fisher_anchors))
    if cfg.l2_to_base:
        plain = [dataclasses.replace(a, fisher=torch.ones(())) for a in anchors]
        terms.append(lambda m: cfg.l2_to_base * anchoring.penalty(plain))
    if cfg.distill and prep.silver:
        loaded = prep.loaded
        terms.append(DistillTerm(loaded.model, loaded.vocab, prep.silver, loaded.config.model.max_word_length, cfg.batch_size, cfg.distill))
    return terms


@dataclass
class Fitted:
    model: Tagger
    vocab: Vocabularies
    growth: Growth
    plan: Schedule
    history: list[dict[str, Any]]
    best_epoch: int
    mixture: int  # sentences per epoch


def fit(prep: Prepared, inputs: FinetuneInputs, cfg: FinetuneConfig, progress: Callable[[float, str], None], should_stop: Callable[[], bool]) -> Fitted:
    """Grow the base, then train it on the corrections (plus rehearsal and base-corpus sentences)
    with the regularisers, for the scheduled epochs or until the stopping part stops improving."""
    loaded = prep.loaded
    model, vocab, growth = grow(loaded, prep.train + prep.stop + prep.heldout + prep.time + prep.silver + prep.base_train, _vectors(inputs, loaded, cfg, progress))
    progress(0.0, f"vocabulary +{len(growth.new_words)} word keys ({growth.pretrained_words} with pretrained vectors), "
             f"+{len(growth.new_chars)} characters; new labels {growth.new_labels or 'none'}")
    rng = random.Random(cfg.seed)
    mixture: list[Sentence] = list(prep.train) * cfg.correction_weight
    if prep.silver and cfg.rehearsal_ratio:
        mixture += rng.sample(prep.silver, min(len(prep.silver), round(cfg.rehearsal_ratio * len(prep.train))))
    if prep.base_train and cfg.base_ratio:
        mixture += rng.sample(prep.base_train, min(len(prep.base_train), round(cfg.base_ratio * len(prep.train))))
    base_state = {k: v.detach().clone() for k, v in loaded.model.named_parameters()}
    _freeze_old(model, [p for p in cfg.freeze if p != "word_embedding"], {k: v.size(0) for k, v in base_state.items()})
    rows = anchoring.word_rows(vocab, mixture)
    if "word_embedding" in cfg.freeze:  # only the new words' rows learn
        rows = [r for r in rows if r >= len(loaded.vocab.words)]
    anchoring.attach_rows(model, rows, cfg.word_dropout)
    anchors = anchoring.anchors(model, base_state, prep.fisher)
    plan = schedule(cfg, len(prep.train), prep.fisher.sentences if prep.fisher is not None else 0, stopping=bool(prep.stop))
    progress(0.0, f"schedule: up to {plan.epochs} epochs of {plan.steps_per_epoch} steps, lr {plan.lr:g}, EWC lambda {plan.ewc_lambda:.3g}"
             f"{'' if prep.stop else ' (no early stopping: too few documents)'}")
    torch.manual_seed(cfg.seed)
    callbacks: list[Callback] = [_FinetuneHooks(anchors, cfg.pull_to_base, plan.epochs, progress, should_stop)]
    if prep.stop:
        callbacks += [KeepBest(), EarlyStopping(cfg.patience)]

    def adam(m: Tagger, tc: TrainConfig) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=tc.lr)

    trainer = Trainer(model, vocab, TrainData(mixture, prep.stop or None), _train_config(loaded, cfg, plan), callbacks,
                      device=torch.device("cpu"), optimizer_factory=adam, loss_terms=_loss_terms(model, prep, cfg, plan, anchors))
    result = trainer.fit()
    anchoring.merge_rows(model)
    model.eval()
    history = [{"epoch": h.epoch, "loss": round(h.loss, 4), "stop_f1": h.dev_f1 if h.dev_f1 >= 0 else None, "seconds": round(h.seconds, 2)} for h in result.history]
    return Fitted(model, vocab, growth, plan, history, result.best_epoch, len(mixture))


# --- measuring ----------------------------------------------------------------------------------


def _predicted_spans(predictor: Predictor, sentences: Sequence[Sentence]) -> list[list[Span]]:
    groups = group_texts([s.doc_id for s in sentences])
    results = [r for text in predictor.predict_texts([[sentences[i].tokens for i in g] for g in groups]) for r in text]
    return [[Span(p.start, p.end, p.label) for p in r.spans] for r in results]


def mention_key(tokens: Sequence[str], span: Span) -> tuple[str, ...]:
    return tuple(t.lower() for t in tokens[span.start : span.end])


def seen_texts(sentences: Sequence[Sentence], longest: int) -> set[tuple[str, ...]]:
    """Every token sequence of up to ``longest`` tokens in ``sentences`` (lowercased): a held-out
    mention whose text is among them occurs somewhere in the training corrections."""
    out: set[tuple[str, ...]] = set()
    for s in sentences:
        lowered = [t.lower() for t in s.tokens]
        for n in range(1, longest + 1):
            out.update(tuple(lowered[i : i + n]) for i in range(len(lowered) - n + 1))
    return out


def _part_scores(sentences: Sequence[Sentence], before: list[list[Span]], after: list[list[Span]], seen: set[tuple[str, ...]]) -> dict[str, Any]:
    """F1 before/after on a held-out part, and on its unseen mentions only: gold and predicted
    mentions whose text occurs nowhere in the training corrections (``seen_texts``)."""

    def unseen(spans: list[list[Span]]) -> list[list[Span]]:
        return [[sp for sp in row if mention_key(s.tokens, sp) not in seen] for s, row in zip(sentences, spans, strict=True)]

    gold = [s.spans for s in sentences]
    unseen_gold = unseen(gold)
    return {
        "documents": len({s.doc_id for s in sentences}),
        "sentences": len(sentences),
        "before": entity_scores(gold, before).to_dict(),
        "after": entity_scores(gold, after).to_dict(),
        "unseen": {
            "mentions": sum(len(row) for row in unseen_gold),
            "before": entity_scores(unseen_gold, unseen(before)).to_dict(),
            "after": entity_scores(unseen_gold, unseen(after)).to_dict(),
        },
    }


def forgetting_probe(base: Predictor, candidate: Predictor, texts: Sequence[Sequence[Sequence[str]]], confidence: float) -> dict[str, Any] | None:
    """Of the base's spans at least ``confidence`` sure on ``texts`` (stored texts nobody corrected),
    the share the candidate predicts too (same tokens, same label). None without such spans."""
    if not texts:
        return None
    kept = total = 0
    for base_text, cand_text in zip(base.predict_texts(texts), candidate.predict_texts(texts), strict=True):
        for b, c in zip(base_text, cand_text, strict=True):
            cand = {(p.start, p.end, p.label) for p in c.spans}
            for p in b.spans:
                if p.score >= confidence:
                    total += 1
                    kept += (p.start, p.end, p.label) in cand
    if not total:
        return None
    return {"texts": len(texts), "confident_spans": total, "kept": kept, "agreement": kept / total, "confidence": confidence}


def measure(prep: Prepared, candidate: Predictor, reference: Predictor, cfg: FinetuneConfig) -> dict[str, Any]:
    """The candidate beside the reference on every held-out measure (None where a part is empty)."""
    longest = max((sp.end - sp.start for s in prep.heldout + prep.time for sp in s.spans), default=0)
    seen = seen_texts(prep.train + prep.stop, longest)
    out: dict[str, Any] = {}
    for part, sentences in (("heldout", prep.heldout), ("time", prep.time)):
        out[part] = _part_scores(sentences, _predicted_spans(reference, sentences), _predicted_spans(candidate, sentences), seen) if sentences else None
    out["probe"] = forgetting_probe(reference, candidate, prep.probe, cfg.probe_confidence)
    if prep.base_dev:
        gold = [s.spans for s in prep.base_dev]
        out["dev_before"] = entity_scores(gold, _predicted_spans(reference, prep.base_dev)).to_dict()
        out["dev"] = entity_scores(gold, _predicted_spans(candidate, prep.base_dev)).to_dict()
    return out


# --- recording ----------------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    path: Path | None
    metrics: dict[str, Any]
    meta: ModelMeta
    model: Tagger | None = None  # the fine-tuned model in memory (eval mode)


def _lineage(inputs: FinetuneInputs, prep: Prepared, fitted: Fitted, cfg: FinetuneConfig) -> dict[str, Any]:
    loaded, splits = prep.loaded, prep.splits
    return {
        **inputs.lineage,
        "method": "finetune",
        "base_model": f"{loaded.meta.name} {loaded.meta.version}",
        "base_path": str(Path(inputs.base_dir)),
        "corrections": len(inputs.corrections),
        "train_documents": len(splits.train),
        "stop_documents": len(splits.stop),
        "heldout_documents": len(splits.heldout),
        "time_documents": len(splits.time),
        "train_sentences": len(prep.train),
        "heldout_sentences": len(prep.heldout),
        "holdout_every": cfg.holdout_every,
        "corrections_fingerprint": _fingerprint(inputs.corrections),
        "rehearsal_sentences": len(prep.silver),
        "base_corpus_sentences": len(prep.base_train),
        "fisher_sentences": prep.fisher.sentences if prep.fisher is not None else 0,
        "fisher_measured_on": prep.fisher.measured_on if prep.fisher is not None else None,
        "new_words": len(fitted.growth.new_words),
        "new_words_pretrained": fitted.growth.pretrained_words,
        "new_labels": fitted.growth.new_labels,
        "finetune": cfg.to_dict(),
    }


def record(inputs: FinetuneInputs, prep: Prepared, fitted: Fitted, cfg: FinetuneConfig) -> tuple[ModelMeta, Predictor]:
    """Write the folder (and carry the base's Fisher diagonal along); the predictor of what was
    saved (saving rounds the word table, so measures come after)."""
    loaded = prep.loaded
    meta = ModelMeta(inputs.name or loaded.meta.name, inputs.version, loaded.config.language, loaded.config.model.tag_scheme,
                     entity_types(fitted.vocab), lineage=_lineage(inputs, prep, fitted, cfg))
    if inputs.out is not None:
        save_model(inputs.out, fitted.model, loaded.config, fitted.vocab, meta, {})
        if prep.fisher is not None:  # the next fine-tune (from this version) consolidates toward the same knowledge
            shutil.copyfile(Path(inputs.base_dir) / anchoring.FISHER_FILE, Path(inputs.out) / anchoring.FISHER_FILE)
    return meta, Predictor(fitted.model, fitted.vocab, loaded.config.model.max_word_length)


def _reference(inputs: FinetuneInputs, prep: Prepared) -> Predictor:
    """What the candidate is compared with: ``inputs.reference`` (the served version), else the base."""
    if inputs.reference is not None:
        return Predictor.load(inputs.reference, script=False, fast=False)
    return Predictor(prep.loaded.model, prep.loaded.vocab, prep.loaded.config.model.max_word_length)


def finetune(
    inputs: FinetuneInputs, config: FinetuneConfig | None = None,
    progress: Callable[[float, str], None] = lambda fraction, message: None, should_stop: Callable[[], bool] = lambda: False,
) -> FinetuneResult:
    """Fine-tune ``inputs.base_dir`` on ``inputs.corrections`` into version ``inputs.version``.
    ``progress(fraction, message)`` is called after each step and epoch; ``should_stop()`` after each batch."""
    cfg = (config or FinetuneConfig()).validate()
    check_version(inputs.version)
    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    prep = prepare(inputs, cfg, progress)
    fitted = fit(prep, inputs, cfg, progress, should_stop)
    meta, candidate = record(inputs, prep, fitted, cfg)
    metrics = measure(prep, candidate, _reference(inputs, prep), cfg)
    metrics.update({
        "train_seconds": round(time.perf_counter() - started, 1),
        "history": fitted.history,
        "schedule": {**dataclasses.asdict(fitted.plan), "best_epoch": fitted.best_epoch, "sentences_per_epoch": fitted.mixture},
    })
    if inputs.out is not None:
        (Path(inputs.out) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return FinetuneResult(Path(inputs.out) if inputs.out is not None else None, metrics, meta, fitted.model)


class _StopRequest(Callback):
    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def on_batch_end(self, trainer: Trainer, loss: float, sequences: int, tokens: int) -> None:
        if self.should_stop():
            raise Cancelled("training stopped on request")


def retrain(
    inputs: FinetuneInputs, config: FinetuneConfig | None = None,
    progress: Callable[[float, str], None] = lambda fraction, message: None, should_stop: Callable[[], bool] = lambda: False,
) -> FinetuneResult:
    """A training from scratch with the base model's own recipe (its config.json) on the base corpus
    plus the training corrections (``correction_weight`` times each), split, measured and recorded
    as a fine-tune is. Needs the base corpus (``inputs.base_data``) and an output folder."""
    from ml.train import default_callbacks, train

    cfg = (config or FinetuneConfig()).validate()
    check_version(inputs.version)
    if inputs.base_data is None or inputs.out is None:
        raise ValueError("a full retrain needs the base corpus (BASE_CORPUS, or --data) and an output folder")
    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    prep = prepare(inputs, cfg, progress)
    loaded = prep.loaded
    base = loaded.config.to_dict()
    # without the recipe's distillation teachers (train.distill_from): they are folders of the machine
    # that trained the base model, and they know nothing of the corrections
    recipe = Config.from_dict({**base, "train": {**base["train"], "device": "cpu", "threads": cfg.threads, "seed": cfg.seed, "distill_from": []}})
    lineage = {**inputs.lineage, "method": "retrain", "base_model": f"{loaded.meta.name} {loaded.meta.version}", "corrections": len(inputs.corrections),
               "train_documents": len(prep.splits.train), "heldout_documents": len(prep.splits.heldout), "time_documents": len(prep.splits.time),
               "correction_weight": cfg.correction_weight, "corrections_fingerprint": _fingerprint(inputs.corrections)}
    name = inputs.name or loaded.meta.name
    epochs = recipe.train.epochs

    def log(message: str) -> None:
        done = message.split()[1] if message.startswith("epoch") else "0"
        progress(int(done) / epochs if done.isdigit() else 0.0, message)

    callbacks = [*default_callbacks(recipe, inputs.out, name, inputs.version, lineage, False, log, select_on_dev=not recipe.train.fit_dev),
                 _StopRequest(should_stop)]
    progress(0.0, f"full retrain with {name} {loaded.meta.version}'s recipe ({epochs} epochs) on {len(prep.base_train)} base sentences "
                  f"and {len(prep.train)} correction sentences x {cfg.correction_weight}")
    train(recipe, prep.base_train + prep.train * cfg.correction_weight, prep.base_dev, inputs.out, name, inputs.version, lineage,
          progress=False, log=log, callbacks=callbacks)
    candidate = Predictor.load(inputs.out)
    metrics = measure(prep, candidate, _reference(inputs, prep), cfg)
    metrics.update({"train_seconds": round(time.perf_counter() - started, 1), "method": "retrain"})
    (Path(inputs.out) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    candidate_meta = load_model(inputs.out).meta
    return FinetuneResult(Path(inputs.out), metrics, candidate_meta)


def _fingerprint(corrections: Sequence[Correction]) -> str:
    h = hashlib.sha256()
    for c in corrections:
        h.update(json.dumps([c.key, c.text, c.entities], ensure_ascii=False).encode())
    return h.hexdigest()[:16]
