"""Model folders are checked before a model is built: bounds, file kinds and sizes, weight shapes."""
from __future__ import annotations

import json
import os
import shutil
import threading

import pytest
import torch

import ml.artifact
from ml.artifact import ModelLoadError, build_model, load_model
from ml.labels import tag_set
from ml.model import state_shapes
from ml.modules.rnn import TorchRecurrentEncoder
from ml.vocab import Vocabularies
from tests.conftest import small_config


@pytest.fixture
def folder(small_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(small_model_dir, copy)
    return copy


@pytest.fixture
def no_build(monkeypatch):
    """Fails the test if the loader builds a model (the checks must come first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the folder was checked")

    monkeypatch.setattr(ml.artifact, "build_model", refuse)


def _edit_config(folder, **model):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data["model"].update(model)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("overrides", [
    {},
    {"model__char_encoder": "lstm", "model__num_layers": 2, "model__head": "softmax", "model__tag_scheme": "iob2", "model__case_dim": 0},
    {"model__cell": "gru", "model__bidirectional": False, "model__char_encoder": "none", "model__backend": "native"},
    {"model__cell": "rnn_relu", "model__num_layers": 3},
])
def test_state_shapes_match_the_built_model(overrides):
    config = small_config(**overrides)
    vocab = Vocabularies.build([["Anna", "saw", "Oslo"]], tag_set(["PER", "LOC"], config.model.tag_scheme))
    built = {k: tuple(v.shape) for k, v in build_model(config, vocab, with_lm=False).state_dict().items()}
    assert state_shapes(config.model, len(vocab.words), len(vocab.chars), len(vocab.tags)) == built


def test_oversized_dimension_is_refused_before_building(folder, no_build):
    _edit_config(folder, word_dim=4000)
    with pytest.raises(ModelLoadError, match=r"model\.word_dim = 4000 is larger than the allowed maximum 1024"):
        load_model(folder)


def test_weight_of_the_wrong_shape_is_refused_before_building(folder, no_build):
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "weights.safetensors"))
    state["projection.weight"] = torch.zeros(state["projection.weight"].size(0), 7)
    save_file(state, str(folder / "weights.safetensors"))
    with pytest.raises(ModelLoadError, match=r"tensor projection.weight has shape \[\d+, 7\] but config.json and vocab.json imply"):
        load_model(folder)


def test_config_that_disagrees_with_the_weights_is_refused_before_building(folder, no_build):
    _edit_config(folder, hidden_size=48)
    with pytest.raises(ModelLoadError, match=r"weights.safetensors: tensor encoder.weight_ih_l0 has shape \[128, \d+\] but .* imply \[192, "):
        load_model(folder)


def test_missing_and_extra_tensors_are_named(folder, no_build):
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "weights.safetensors"))
    state["extra.weight"] = state.pop("projection.bias")
    save_file(state, str(folder / "weights.safetensors"))
    with pytest.raises(ModelLoadError, match=r"missing tensors \['projection.bias'\], unexpected tensors \['extra.weight'\]"):
        load_model(folder)


def test_fifo_named_config_json_is_refused_without_blocking(folder):
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    outcome: list[BaseException | None] = []

    def load():
        try:
            load_model(folder)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 (handed to the test thread to assert on)
            outcome.append(e)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(60)  # opening a FIFO for reading blocks until a writer comes: a hang leaves outcome empty
    assert outcome, "load_model blocked on a FIFO"
    assert isinstance(outcome[0], ModelLoadError)
    assert "config.json is not a regular file" in str(outcome[0])


def test_file_over_its_size_cap_is_refused(folder, monkeypatch):
    monkeypatch.setitem(ml.artifact.MAX_FILE_BYTES, "vocab.json", 100)
    size = (folder / "vocab.json").stat().st_size
    with pytest.raises(ModelLoadError, match=f"vocab.json is {size} bytes, more than the 100 allowed"):
        load_model(folder)


def test_link_out_of_the_folder_is_refused(folder, tmp_path):
    outside = tmp_path / "elsewhere.json"
    shutil.move(folder / "vocab.json", outside)
    (folder / "vocab.json").symlink_to(outside)
    with pytest.raises(ModelLoadError, match=r"vocab\.json is a link to .*elsewhere\.json, outside the model folder"):
        load_model(folder)


def test_vocabulary_over_its_bound_is_refused(folder, monkeypatch, no_build):
    monkeypatch.setitem(ml.artifact.MAX_VOCAB, "tags", 3)
    with pytest.raises(ModelLoadError, match=r"vocab.json has \d+ tags, more than the 3 allowed"):
        load_model(folder)


def test_folder_that_names_the_old_cudnn_backend_still_loads(folder):
    _edit_config(folder, backend="cudnn")
    loaded = load_model(folder)
    assert loaded.config.model.backend == "native"
    assert isinstance(loaded.model.encoder, TorchRecurrentEncoder)
    reference = load_model(folder, backend="script")
    words = torch.tensor([[2, 3, 4]])
    chars = torch.tensor([[[2, 3], [3, 0], [4, 5]]])
    cases = torch.tensor([[1, 2, 3]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    with torch.no_grad():
        a, b = loaded.model(words, chars, cases, mask), reference.model(words, chars, cases, mask)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=0)
