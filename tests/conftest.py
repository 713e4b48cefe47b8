"""Cheap session fixtures: a synthetic corpus and one small model trained on it once per run."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.synthetic import synthetic_corpus

SMALL_MODEL: dict[str, dict[str, Any]] = {
    "model": {"hidden_size": 32, "word_dim": 16, "char_dim": 8, "char_hidden": 16, "case_dim": 4, "dropout": 0.1},
    "train": {"epochs": 40, "batch_size": 8, "optimizer": "adam", "lr": 0.01, "lr_decay": 0.0, "patience": 8, "seed": 3},
}


def small_config(**overrides):
    from ml.config import Config

    data = {k: dict(v) for k, v in SMALL_MODEL.items()}
    for key, value in overrides.items():
        section, name = key.split("__")
        data[section][name] = value
    return Config.from_dict(data)


@pytest.fixture(scope="session")
def corpus():
    return synthetic_corpus(80, seed=0)


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory, corpus) -> Path:
    """A model folder trained on the synthetic corpus (dev = train: it must be learned exactly)."""
    from ml.train import train

    out = tmp_path_factory.mktemp("models") / "small"
    result = train(small_config(), corpus, corpus, out, name="small", version="1.0.0", progress=False, log=lambda m: None)
    assert result.dev.f1 == 1.0, f"the small model did not learn the synthetic corpus: dev F1 {result.dev.f1}"
    return out


def pytest_configure(config):
    # each test process uses one thread: the CI machine has two cores and the tests are many small ops
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
