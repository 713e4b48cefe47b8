"""A model is a folder that describes itself:

    meta.json             format, name, version, language (spaCy code), tag scheme, labels, lineage
    config.json           the Config it was trained with
    vocab.json            word keys, characters, tags
    weights.safetensors   the state dict (torch.nn.LSTM/GRU/RNN names for the recurrence)
    metrics.json          dev (and other) scores measured on the saved weights

Loading a folder of another format fails with a message that says what to do.
"""
from __future__ import annotations

import datetime as _dt
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ml.config import Config
from ml.labels import allowed_transitions, split_tag
from ml.model import Tagger
from ml.vocab import Vocabularies

FORMAT = 1
FILES = ("meta.json", "config.json", "vocab.json", "weights.safetensors")
# the word embedding dominates the size; float16 halves it (and the in-memory copy is rounded
# the same way before saving, so a reloaded model predicts exactly what was evaluated)
HALF_PRECISION = ("word_embedding.weight",)
_VERSION = re.compile(r"^\d+\.\d+\.\d+([-+.][0-9A-Za-z.-]+)?$")


class ModelLoadError(RuntimeError):
    pass


@dataclass
class ModelMeta:
    name: str
    version: str
    language: str
    tag_scheme: str
    labels: list[str]  # entity types
    format: int = FORMAT
    created: str = ""
    lineage: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def check_version(version: str) -> str:
    if not _VERSION.match(version):
        raise ValueError(f"model version {version!r} is not of the form MAJOR.MINOR.PATCH")
    return version


def entity_types(vocab: Vocabularies) -> list[str]:
    return sorted({split_tag(t)[1] for t in vocab.tags.itos if t != "O"})


def build_model(config: Config, vocab: Vocabularies, with_lm: bool = True, generator: torch.Generator | None = None) -> Tagger:
    """The one place a Tagger is assembled from a config and vocabularies."""
    transitions = allowed_transitions(vocab.tags.itos, config.model.tag_scheme)
    model_config = config.model
    if not with_lm and model_config.lm_weight:
        model_config = Config.from_dict({**config.to_dict(), "model": {**config.to_dict()["model"], "lm_weight": 0.0}}).model
    return Tagger.from_config(model_config, len(vocab.words), len(vocab.chars), len(vocab.tags), transitions, generator)


def round_half_precision_(model: Tagger) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in HALF_PRECISION:
                p.copy_(p.half().float())


def save_model(folder: str | Path, model: Tagger, config: Config, vocab: Vocabularies, meta: ModelMeta, metrics: dict | None = None) -> Path:
    """Write the folder atomically (a temporary sibling renamed into place)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    check_version(meta.version)
    meta.created = meta.created or _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    round_half_precision_(model)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("lm_head."):
            continue  # training-only
        value = value.detach().cpu().contiguous().clone()
        state[key] = value.half() if key in HALF_PRECISION else value
    save_file(state, str(tmp / "weights.safetensors"), metadata={"format": str(FORMAT)})
    (tmp / "meta.json").write_text(json.dumps(meta.to_dict(), indent=2, ensure_ascii=False))
    (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    vocab.save(tmp)
    (tmp / "metrics.json").write_text(json.dumps(metrics or {}, indent=2))
    for f in tmp.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; a model is read by other users (the service's)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


@dataclass
class LoadedModel:
    model: Tagger
    config: Config
    vocab: Vocabularies
    meta: ModelMeta
    metrics: dict
    path: Path


def load_model(folder: str | Path, device: str | torch.device = "cpu", backend: str | None = None) -> LoadedModel:
    """Load a model folder for inference (eval mode). ``backend`` overrides the recurrence backend."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist")
    missing = [f for f in FILES if not (folder / f).exists()]
    if missing:
        raise ModelLoadError(f"{folder} is not a model folder: missing {', '.join(missing)}")
    try:
        meta_data = json.loads((folder / "meta.json").read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{folder}/meta.json is not valid JSON: {e}") from None
    found = meta_data.get("format")
    if found != FORMAT:
        raise ModelLoadError(
            f"{folder} was written in model format {found!r}, but this version of ml reads format {FORMAT}; "
            "retrain it with this version (ner train) or load it with the version that wrote it"
        )
    try:
        meta = ModelMeta(**meta_data)
        config = Config.from_dict(json.loads((folder / "config.json").read_text()), str(folder / "config.json"))
        vocab = Vocabularies.load(folder)
    except (TypeError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{folder}: {e}") from None
    if backend is not None:
        config.model.backend = backend
    model = build_model(config, vocab, with_lm=False)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(folder / "weights.safetensors")).items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelLoadError(f"{folder}/weights.safetensors does not fit its config.json: {e}") from None
    metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").exists() else {}
    return LoadedModel(model.to(device).eval(), config, vocab, meta, metrics, folder)


def default_model_path() -> Path:
    """The model shipped with the project (models/en-conll03 beside the ml package)."""
    return Path(__file__).resolve().parent.parent / "models" / "en-conll03"
