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
import math
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ml.config import MAX_VOCAB, Config
from ml.device import resolve_device
from ml.labels import allowed_transitions, split_tag
from ml.model import Tagger, state_shapes
from ml.vocab import Vocabularies

FORMAT = 1
FILES = ("meta.json", "config.json", "vocab.json", "weights.safetensors")
# the word embedding dominates the size; float16 halves it (and the in-memory copy is rounded
# the same way before saving, so a reloaded model predicts exactly what was evaluated)
HALF_PRECISION = ("word_embedding.weight",)
_VERSION = re.compile(r"^\d+\.\d+\.\d+([-+.][0-9A-Za-z.-]+)?$")
# the most each file of a model folder may hold (bytes); the shipped model's weights are ~7 MB
MAX_FILE_BYTES = {
    "meta.json": 1 << 20,
    "config.json": 1 << 20,
    "vocab.json": 256 << 20,
    "metrics.json": 16 << 20,
    "weights.safetensors": 4 << 30,
}
MAX_PARAMETERS = 1_000_000_000  # numbers in weights.safetensors (4 GB as float32)


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


def build_model(config: Config, vocab: Vocabularies, with_lm: bool = True, generator: torch.Generator | None = None, init_words: bool = True) -> Tagger:
    """The one place a Tagger is assembled from a config and vocabularies (``init_words=False``:
    the word table is left uninitialised for weights about to be loaded)."""
    transitions = allowed_transitions(vocab.tags.itos, config.model.tag_scheme)
    model_config = config.model
    if not with_lm and (model_config.lm_weight or model_config.truecase_weight):  # the training-only heads
        model_config = Config.from_dict({**config.to_dict(), "model": {**config.to_dict()["model"], "lm_weight": 0.0, "truecase_weight": 0.0}}).model
    return Tagger.from_config(model_config, len(vocab.words), len(vocab.chars), len(vocab.tags), transitions, generator, init_words)


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
        if key.startswith(("lm_head.", "truecase_head.")):
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


def _checked_file(folder: Path, name: str) -> Path:
    """The path of a folder's file once it is known to be a regular file (a FIFO or a device would
    block or never end; os.stat looks without opening), inside the folder, and within its size cap."""
    path = folder / name
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ModelLoadError(f"{path} does not exist") from None
    if not stat.S_ISREG(info.st_mode):
        raise ModelLoadError(f"{path} is not a regular file; a model folder holds only regular files")
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ModelLoadError(f"{path} is a link to {path.resolve()}, outside the model folder")
    limit = MAX_FILE_BYTES[name]
    if info.st_size > limit:
        raise ModelLoadError(f"{path} is {info.st_size} bytes, more than the {limit} allowed for {name}")
    return path


def _read_json(folder: Path, name: str) -> Any:
    path = _checked_file(folder, name)
    # O_NONBLOCK: should the file have been swapped for a FIFO since the check, open does not wait
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ModelLoadError(f"{path} is not a regular file; a model folder holds only regular files")
        raw = f.read(MAX_FILE_BYTES[name] + 1)
    if len(raw) > MAX_FILE_BYTES[name]:
        raise ModelLoadError(f"{path} grew past the {MAX_FILE_BYTES[name]} bytes allowed for {name} while being read")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None


def check_weights(path: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Compare the names and shapes in a safetensors file's header with what the config and
    vocabularies imply, reading no tensor data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            found = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (a safe_open handle is not a dict)
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{path} is not a readable safetensors file: {e}") from None
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(f"{path} does not fit its config.json: missing tensors {missing}, unexpected tensors {unexpected}")
    for key, shape in expected.items():
        if found[key] != shape:
            raise ModelLoadError(f"{path}: tensor {key} has shape {list(found[key])} but config.json and vocab.json imply {list(shape)}")


def load_model(folder: str | Path, device: str | torch.device = "cpu", backend: str | None = None, mapped_cache: Path | None = None) -> LoadedModel:
    """Load a model folder for inference (eval mode). ``backend`` overrides the recurrence backend.
    With ``mapped_cache`` (a folder) on a CPU, the large tensors (the word table) are mapped from
    float32 cache files there, shared with every process that maps them (ml.mapped).

    Everything is checked before the model is built: each file is a regular file within its size
    cap, config.json within the dimension bounds, vocab.json within the vocabulary bounds, and every
    tensor name and shape in weights.safetensors' header equal to what they imply."""
    device = resolve_device(device)  # DeviceError before anything is read
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist")
    missing = [f for f in FILES if not (folder / f).exists()]
    if missing:
        raise ModelLoadError(f"{folder} is not a model folder: missing {', '.join(missing)}")
    meta_data = _read_json(folder, "meta.json")
    found = meta_data.get("format") if isinstance(meta_data, dict) else None
    if found != FORMAT:
        raise ModelLoadError(
            f"{folder} was written in model format {found!r}, but this version of ml reads format {FORMAT}; "
            "retrain it with this version (ner train) or load it with the version that wrote it"
        )
    try:
        meta = ModelMeta(**meta_data)
        config = Config.from_dict(_read_json(folder, "config.json"), str(folder / "config.json"))
        vocab = Vocabularies.from_json(_read_json(folder, "vocab.json"))
    except (TypeError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{folder}: {e}") from None
    for name, table in (("words", vocab.words), ("chars", vocab.chars), ("tags", vocab.tags)):
        if len(table) > MAX_VOCAB[name]:
            raise ModelLoadError(f"{folder}/vocab.json has {len(table)} {name}, more than the {MAX_VOCAB[name]} allowed")
    expected = state_shapes(config.model, len(vocab.words), len(vocab.chars), len(vocab.tags))
    total = sum(math.prod(shape) for shape in expected.values())
    if total > MAX_PARAMETERS:
        raise ModelLoadError(f"{folder}: config.json and vocab.json imply {total} parameters, more than the {MAX_PARAMETERS} allowed")
    weights = _checked_file(folder, "weights.safetensors")
    check_weights(weights, expected)
    if backend is not None:
        config.model.backend = backend
        config.model.validate()
    model = build_model(config, vocab, with_lm=False, init_words=False)  # every tensor is loaded below
    _load_weights(model, weights, mapped_cache if device.type == "cpu" else None)
    metrics = _read_json(folder, "metrics.json") if (folder / "metrics.json").exists() else {}
    return LoadedModel(model.to(device).eval(), config, vocab, meta, metrics, folder)


def _load_weights(model: Tagger, weights: Path, mapped_cache: Path | None) -> None:
    """The file's tensors into ``model`` as float32: copied, or (``mapped_cache``) the large ones
    put in place as mapped tensors (copying would make them private again)."""
    from safetensors.torch import load_file

    state = load_file(str(weights))
    if mapped_cache is None:
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    else:
        from ml.mapped import file_sha256, map_large_tensors

        state = map_large_tensors(state, file_sha256(weights), mapped_cache)
    # the mapped tensors are storage the model must use as is (assign); the others are fresh copies
    try:
        model.load_state_dict(state, assign=mapped_cache is not None)
    except RuntimeError as e:
        raise ModelLoadError(f"{weights} does not fit its config.json: {e}") from None


def default_model_path() -> Path:
    """The model shipped with the project (models/en-conll03 beside the ml package)."""
    return Path(__file__).resolve().parent.parent / "models" / "en-conll03"
