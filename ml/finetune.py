"""Fine-tuning a served model on stored corrections: minutes, not a from-scratch training.

* **Start** from a model folder: its config, vocabularies and weights.
* **Grow** what the corrections need: new word keys join the vocabulary (with their pretrained
  vector when the base was trained with one and it is installed, else a copy of the ``<unk>`` row,
  so the grown model first predicts exactly what the base did); new characters likewise; a label
  the base lacks adds its tags to the tag set, rows to the projection and rows/columns to the CRF,
  with the scheme's constraints recomputed. Every old weight keeps its value.
* **Hold out** one document in ``holdout_every`` (by a hash of the document key, so the same
  documents stay held out for every later version) and measure before (the base) and after.
* **Against forgetting** (see README, Feedback loop): an L2 pull toward the base weights
  (``l2_to_base``), a low learning rate, optional frozen parts (``freeze``), pseudo-rehearsal on
  stored texts tagged by the base model (``rehearsal_ratio``), and the base corpus mixed in when
  given (``base_ratio``).

Torch only: the service exports the corrections (``service.cli``) and calls this module.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ml.artifact import LoadedModel, ModelMeta, build_model, check_version, entity_types, load_model, save_model
from ml.config import Config, ConfigError, TrainConfig
from ml.data import DataFormatError, Sentence
from ml.evaluate import Scores
from ml.labels import Span, tag_set
from ml.model import Tagger
from ml.predictor import Predictor, evaluate
from ml.train import Callback, EpochLog, TrainData, Trainer
from ml.vocab import UNK_ID, Vocab, Vocabularies, word_key

FREEZABLE = ("word_embedding", "char_encoder", "case_embedding", "encoder", "projection", "head")


class Cancelled(RuntimeError):
    """Raised from inside the loop when ``should_stop`` says so (e.g. the job was taken over)."""


@dataclass
class FinetuneConfig:
    # defaults chosen on the WikiGold benchmark's own held-out split and CoNLL-2003 dev (README)
    epochs: int = 8
    batch_size: int = 16  # sentences
    lr: float = 0.001  # Adam
    clip_norm: float = 5.0
    l2_to_base: float = 0.0  # weight of sum((theta - theta_base)^2) over the base's parameters, added to the loss
    pull_to_base: float = 0.002  # after each step, this fraction of (theta - theta_base) is undone (decoupled, as AdamW's decay)
    freeze: list[str] = field(default_factory=list)  # parts of FREEZABLE whose old weights stay fixed
    rehearsal_ratio: float = 0.0  # silver sentences (stored texts tagged by the base) per correction sentence and epoch
    base_ratio: float = 1.0  # base-corpus sentences per correction sentence and epoch, when --data is given
    correction_weight: int = 1  # times each training correction is seen per epoch
    holdout_every: int = 5  # one document in N is held out (0: none)
    seed: int = 1
    threads: int = 0  # torch CPU threads; 0 = torch's default
    pretrained_max_words: int = 400000  # pretrained vectors searched for new words

    def validate(self) -> FinetuneConfig:
        for name in ("epochs", "batch_size", "lr", "correction_weight"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"finetune.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.pull_to_base < 1.0:
            raise ConfigError(f"finetune.pull_to_base must lie in [0, 1), got {self.pull_to_base}")
        for name in ("clip_norm", "l2_to_base", "rehearsal_ratio", "base_ratio", "holdout_every", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"finetune.{name} must be non-negative, got {getattr(self, name)}")
        if self.holdout_every == 1:
            raise ConfigError("finetune.holdout_every = 1 would hold out every document; use 0 (none) or 2 and more")
        unknown = sorted(set(self.freeze) - set(FREEZABLE))
        if unknown:
            raise ConfigError(f"finetune.freeze: unknown parts {unknown}; known: {list(FREEZABLE)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "finetune") -> FinetuneConfig:
        """Validated settings from a mapping (unknown keys and wrong types are errors)."""
        defaults = cls().to_dict()
        unknown = sorted(set(data) - set(defaults))
        if unknown:
            raise ConfigError(f"{source}: unknown settings {unknown}; known: {sorted(defaults)}")
        values = dict(defaults)
        for key, value in data.items():
            expected = type(defaults[key])
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if expected is list:
                ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            else:
                ok = isinstance(value, expected) and not isinstance(value, bool)
            if not ok:
                raise ConfigError(f"{source}: {key} = {value!r} should be {'a list of strings' if expected is list else expected.__name__}")
            values[key] = value
        return cls(**values).validate()

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


# --- corrections and the held-out split ---------------------------------------------------------


@dataclass
class Correction:
    key: str  # the document's identity (database id, else a hash of the text): decides the split
    text: str
    entities: list[tuple[int, int, str]]


def is_held_out(key: str, every: int) -> bool:
    """Deterministic 1-in-``every`` split by document: stable across runs, versions and machines."""
    if every <= 0:
        return False
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % every == 0


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
    train: list[Correction] = []
    held: list[Correction] = []
    for c in corrections:
        (held if is_held_out(c.key, every) else train).append(c)
    return train, held


# --- growing the base model ---------------------------------------------------------------------


@dataclass
class Growth:
    new_words: list[str]
    new_chars: list[str]
    new_labels: list[str]
    pretrained_words: int  # new words initialised from pretrained vectors


def grow(loaded: LoadedModel, sentences: Sequence[Sentence], pretrained: tuple[list[str], Any] | None) -> tuple[Tagger, Vocabularies, Growth]:
    """A model whose vocabularies cover ``sentences`` and whose tag set covers their labels, with
    every base weight copied over. New ids are appended, so old ids (and weights) do not move."""
    vocab, config = loaded.vocab, loaded.config
    scheme = config.model.tag_scheme
    new_words = sorted({word_key(t) for s in sentences for t in s.tokens} - set(vocab.words.stoi))
    new_chars = sorted({ch for s in sentences for t in s.tokens for ch in t} - set(vocab.chars.stoi))
    old_labels = set(entity_types(vocab))
    new_labels = sorted({sp.label for s in sentences for sp in s.spans} - old_labels)
    new_tags = [t for t in tag_set(new_labels, scheme) if t != "O"] if new_labels else []
    grown = Vocabularies(
        Vocab(vocab.words.itos[2:] + new_words),
        Vocab(vocab.chars.itos[2:] + new_chars),
        Vocab(vocab.tags.itos + new_tags, specials=False),
    )
    model = build_model(config, grown, generator=torch.Generator().manual_seed(0))
    base = loaded.model.state_dict()
    state = model.state_dict()
    k_old = len(vocab.tags)
    with torch.no_grad():
        for name, target in state.items():
            if name not in base:
                continue  # the auxiliary LM head is training-only and not saved
            source = base[name]
            if source.shape == target.shape:
                target.copy_(source)
                continue
            if name == "word_embedding.weight" or name == "char_encoder.embedding.weight":
                target[: source.size(0)] = source
                target[source.size(0) :] = source[UNK_ID]  # new keys start as <unk> did
            elif name == "projection.weight":
                target[:k_old] = source
                target[k_old:].normal_(0.0, 0.01)
            elif name == "projection.bias":
                target[:k_old] = source
                # new tags start unlikely: the grown model predicts what the base did until trained
                target[k_old:] = source.min() - 2.0
            elif name == "head.transitions":
                target.zero_()
                target[:k_old, :k_old] = source
            elif name in ("head.start", "head.end"):
                target.zero_()
                target[:k_old] = source
            elif name.startswith("head.") and name.endswith("_penalty"):
                continue  # rebuilt by build_model from the grown tag set and the scheme
            else:
                raise ValueError(f"cannot grow parameter {name} from {tuple(source.shape)} to {tuple(target.shape)}")
    covered = 0
    if pretrained is not None and new_words:
        words, vectors = pretrained
        index: dict[str, int] = {}
        for row, w in enumerate(words):
            index.setdefault(word_key(w), row)
        emb = model.word_embedding.weight
        with torch.no_grad():
            for key in new_words:
                if key in index and vectors.shape[1] == emb.size(1):
                    emb[grown.words.stoi[key]] = torch.from_numpy(vectors[index[key]].copy()).to(emb)
                    covered += 1
    return model, grown, Growth(new_words, new_chars, new_labels, covered)


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


def _l2_anchor(model: Tagger, base: dict[str, Tensor]) -> list[tuple[nn.Parameter, Tensor]]:
    """(parameter, base value) pairs over every trainable parameter, matched by parameter name
    (``base`` from ``named_parameters``: state-dict keys differ, the recurrence saves torch.nn names)."""
    return [(p, base[name]) for name, p in model.named_parameters() if p.requires_grad and name in base]


def _l2_penalty(pairs: Sequence[tuple[nn.Parameter, Tensor]]) -> Tensor:
    total = torch.zeros(())
    for p, b in pairs:
        if p.shape == b.shape:
            total = total + (p - b).pow(2).sum()
        else:
            # grown tensors: only the base's block is pulled back
            idx = tuple(slice(0, n) for n in b.shape)
            total = total + (p[idx] - b).pow(2).sum()
    return total


@torch.no_grad()
def _pull(pairs: Sequence[tuple[nn.Parameter, Tensor]], fraction: float) -> None:
    """theta <- theta - fraction * (theta - theta_base) on the base's part of each parameter. Adam
    rescales gradients, so a penalty in the loss barely holds the weights; this does, whatever the
    gradient's scale (decoupled, like AdamW's weight decay, but toward the base instead of zero)."""
    for p, b in pairs:
        idx = tuple(slice(0, n) for n in b.shape)
        p[idx] -= fraction * (p[idx] - b)


class _FinetuneHooks(Callback):
    """The Trainer's hooks of a fine-tune: the pull toward the base after each step, the stop
    request, progress after each epoch."""

    def __init__(self, anchor, pull: float, epochs: int, progress: Callable[[float, str], None], should_stop: Callable[[], bool]):
        self.anchor, self.pull, self.epochs, self.progress, self.should_stop = anchor, pull, epochs, progress, should_stop

    def on_batch_end(self, trainer: Trainer, loss: float, sequences: int, tokens: int) -> None:
        if self.pull:
            _pull(self.anchor, self.pull)
        if self.should_stop():
            raise Cancelled("fine-tuning stopped on request")

    def on_epoch_end(self, trainer: Trainer, log: EpochLog) -> None:
        self.progress(log.epoch / self.epochs, f"epoch {log.epoch}/{self.epochs}: loss {log.loss:.3f} ({log.seconds:.1f}s)")


# --- the loop -----------------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    path: Path | None
    metrics: dict[str, Any]
    meta: ModelMeta


def scores_dict(scores: Scores) -> dict[str, Any]:
    return scores.to_dict()


def finetune(
    base_dir: str | Path,
    corrections: Sequence[Correction],
    out: Path | None,
    version: str,
    config: FinetuneConfig | None = None,
    name: str | None = None,
    base_data: tuple[Sequence[Sentence], Sequence[Sentence]] | None = None,
    rehearsal_texts: Sequence[str] = (),
    lineage: dict[str, Any] | None = None,
    pretrained: tuple[list[str], Any] | bool | None = True,
    progress: Callable[[float, str], None] = lambda fraction, message: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> FinetuneResult:
    """Fine-tune the model in ``base_dir`` on ``corrections`` and save version ``version`` to ``out``.

    ``base_data`` is (train, dev) of the base corpus (mixed in, and dev measured before and after);
    ``rehearsal_texts`` are unlabelled texts the base model tags for pseudo-rehearsal; ``pretrained``
    True loads the base config's vectors when installed, or pass (words, vectors), or None/False.
    ``progress(fraction, message)`` is called after each epoch; ``should_stop()`` before each batch."""
    cfg = (config or FinetuneConfig()).validate()
    check_version(version)
    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    loaded = load_model(base_dir, "cpu")
    language = loaded.config.language
    scheme = loaded.config.model.tag_scheme
    train_docs, held_docs = split_corrections(corrections, cfg.holdout_every)
    if not train_docs:
        raise ValueError(f"all {len(corrections)} corrections fall in the held-out part; fine-tuning needs more corrections")
    train_sents = to_sentences(train_docs, language)
    held_sents = to_sentences(held_docs, language)
    progress(0.0, f"{len(train_docs)} training documents ({len(train_sents)} sentences), {len(held_docs)} held out ({len(held_sents)} sentences)")

    base_predictor = Predictor(loaded.model, loaded.vocab, loaded.config.model.max_word_length)
    silver: list[Sentence] = []
    if rehearsal_texts and cfg.rehearsal_ratio > 0:
        from ml.data.tokenizer import get_tokenizer

        tokenizer = get_tokenizer(language)
        token_lists = [[t.text for t in sent] for sents in tokenizer.pipe_sentences(list(rehearsal_texts)) for sent in sents]
        predictions = base_predictor.predict(token_lists) if token_lists else []
        silver = [Sentence(tokens, [Span(p.start, p.end, p.label) for p in r.spans]) for tokens, r in zip(token_lists, predictions, strict=True)]
    base_train, base_dev = (list(base_data[0]), list(base_data[1])) if base_data is not None else ([], [])

    # before: the base on the held-out corrections (and on the base's dev set)
    before_held = evaluate(base_predictor, held_sents) if held_sents else None
    before_dev = evaluate(base_predictor, base_dev) if base_dev else None

    vectors = None
    if pretrained is True:
        source = loaded.config.train.pretrained
        if source:
            try:
                from ml.embeddings import load_vectors

                vectors = load_vectors(source, cfg.pretrained_max_words)
            except (RuntimeError, FileNotFoundError) as e:
                progress(0.0, f"pretrained vectors {source!r} not available ({e}); new words start as <unk>")
    elif pretrained:
        vectors = pretrained
    model, vocab, growth = grow(loaded, train_sents + held_sents + silver + base_train, vectors)
    progress(0.0, f"vocabulary +{len(growth.new_words)} word keys ({growth.pretrained_words} with pretrained vectors), +{len(growth.new_chars)} characters; new labels {growth.new_labels or 'none'}")
    base_state = {k: v.detach().clone() for k, v in loaded.model.named_parameters()}
    old_rows = {k: v.size(0) for k, v in base_state.items()}
    _freeze_old(model, cfg.freeze, old_rows)
    anchor = _l2_anchor(model, base_state) if cfg.l2_to_base or cfg.pull_to_base else []
    # the training set: the corrections, plus silver and base-corpus sentences drawn once
    n = len(train_sents)
    mixture: list[Sentence] = list(train_sents) * cfg.correction_weight
    if silver and cfg.rehearsal_ratio:
        mixture += rng.sample(silver, min(len(silver), round(cfg.rehearsal_ratio * n)))
    if base_train and cfg.base_ratio:
        mixture += rng.sample(base_train, min(len(base_train), round(cfg.base_ratio * n)))
    base_dict = loaded.config.to_dict()
    train_config = Config.from_dict({**base_dict, "train": {
        **base_dict["train"], "epochs": cfg.epochs, "batch_size": cfg.batch_size, "optimizer": "adam", "lr": cfg.lr, "lr_decay": 0.0,
        "weight_decay": 0.0, "clip_norm": cfg.clip_norm, "seed": cfg.seed, "device": "cpu", "threads": cfg.threads,
        "average_last": 0,  # the base recipe's checkpoint averaging is not the fine-tune's (its own callbacks run)
    }})

    def adam(m: Tagger, tc: TrainConfig) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=tc.lr)

    l2_terms = [lambda m: cfg.l2_to_base * _l2_penalty(anchor)] if cfg.l2_to_base else []
    hooks = _FinetuneHooks(anchor, cfg.pull_to_base, cfg.epochs, progress, should_stop)
    fitted = Trainer(model, vocab, TrainData(mixture, None), train_config, [hooks], device=torch.device("cpu"), optimizer_factory=adam, loss_terms=l2_terms).fit()
    history = [{"epoch": h.epoch, "loss": h.loss, "sentences": len(mixture), "seconds": round(h.seconds, 2)} for h in fitted.history]
    model.eval()

    meta = ModelMeta(
        name or loaded.meta.name, version, language, scheme, entity_types(vocab),
        lineage={
            **(lineage or {}),
            "method": "finetune",
            "base_model": f"{loaded.meta.name} {loaded.meta.version}",
            "base_path": str(Path(base_dir)),
            "corrections": len(corrections),
            "train_documents": len(train_docs),
            "heldout_documents": len(held_docs),
            "train_sentences": len(train_sents),
            "heldout_sentences": len(held_sents),
            "holdout_every": cfg.holdout_every,
            "corrections_fingerprint": _fingerprint(corrections),
            "rehearsal_sentences": len(silver),
            "base_corpus_sentences": len(base_train),
            "new_words": len(growth.new_words),
            "new_words_pretrained": growth.pretrained_words,
            "new_labels": growth.new_labels,
            "finetune": cfg.to_dict(),
        },
    )
    if out is not None:
        save_model(out, model, loaded.config, vocab, meta, {})  # rounds the embedding: measure after
    predictor = Predictor(model, vocab, loaded.config.model.max_word_length)
    after_held = evaluate(predictor, held_sents) if held_sents else None
    after_dev = evaluate(predictor, base_dev) if base_dev else None
    seconds = time.perf_counter() - started
    metrics: dict[str, Any] = {
        "heldout": {
            "documents": len(held_docs),
            "sentences": len(held_sents),
            "before": scores_dict(before_held) if before_held else None,
            "after": scores_dict(after_held) if after_held else None,
        },
        "train_seconds": round(seconds, 1),
        "history": history,
    }
    if after_dev is not None and before_dev is not None:
        metrics["dev"] = scores_dict(after_dev)
        metrics["dev_before"] = scores_dict(before_dev)
    if out is not None:
        (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return FinetuneResult(Path(out) if out is not None else None, metrics, meta)


def _fingerprint(corrections: Sequence[Correction]) -> str:
    h = hashlib.sha256()
    for c in corrections:
        h.update(json.dumps([c.key, c.text, c.entities], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


# --- the promotion gate -------------------------------------------------------------------------


@dataclass
class Decision:
    promote: bool
    reason: str
    gain: float | None = None  # held-out F1 after - before
    worst_label: str | None = None
    worst_drop: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def promotion_decision(before: dict | None, after: dict | None, min_gain: float, max_label_drop: float, min_label_support: int = 1) -> Decision:
    """Promote only when held-out F1 beats the active model's by ``min_gain`` and no label with at
    least ``min_label_support`` held-out entities loses more than ``max_label_drop`` F1.
    ``before``/``after`` are ``Scores.to_dict()`` of the active and the new model on the same texts."""
    if before is None or after is None:
        return Decision(False, "no held-out corrections to compare on: kept as a candidate")
    gain = after["f1"] - before["f1"]
    worst, worst_drop = None, 0.0
    for label, s in before.get("per_type", {}).items():
        if s.get("support", 0) < min_label_support:
            continue
        drop = s["f1"] - after.get("per_type", {}).get(label, {}).get("f1", 0.0)
        if drop > worst_drop:
            worst, worst_drop = label, drop
    if gain < min_gain:
        return Decision(False, f"held-out F1 {100 * after['f1']:.2f} vs {100 * before['f1']:.2f} of the active model: gain {100 * gain:+.2f} is below the required {100 * min_gain:.2f}", gain, worst, worst_drop)
    if worst is not None and worst_drop > max_label_drop:
        return Decision(False, f"label {worst} loses {100 * worst_drop:.2f} F1 on the held-out corrections (at most {100 * max_label_drop:.2f} allowed)", gain, worst, worst_drop)
    return Decision(True, f"held-out F1 {100 * after['f1']:.2f} vs {100 * before['f1']:.2f} ({100 * gain:+.2f}); no label loses more than {100 * max_label_drop:.2f}", gain, worst, worst_drop)

