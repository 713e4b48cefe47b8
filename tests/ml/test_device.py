"""Device choice: one clear error for a device this torch build or machine cannot use, checked
before a model folder is read; on a GPU machine the model runs there and tags as on the CPU."""
from __future__ import annotations

import pytest
import torch

from ml import cli
from ml.artifact import load_model
from ml.device import DeviceError, resolve_device
from ml.predictor import Predictor

NO_CUDA = not torch.cuda.is_available()


def test_cpu_and_auto_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cpu" if NO_CUDA else "cuda")


@pytest.mark.parametrize("spec", ["tpu", "gpu", "cuda:x", "meta", ""])
def test_unknown_or_unsupported_devices_are_named(spec):
    with pytest.raises(DeviceError, match=repr(spec)):
        resolve_device(spec)


@pytest.mark.skipif(not NO_CUDA, reason="checks the message of a machine without CUDA")
def test_cuda_without_cuda_says_so_before_the_folder_is_read(tmp_path, capsys):
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device("cuda:0")
    with pytest.raises(DeviceError, match="CUDA is not available"):
        load_model(tmp_path / "no-such-folder", "cuda")  # the device error, not "does not exist"
    assert cli.main(["predict", "--device", "cuda", "--text", "Tom visited Oslo ."]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: device 'cuda': CUDA is not available") and "Traceback" not in err


@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
def test_a_model_on_cuda_tags_as_on_the_cpu(small_model_dir, corpus):
    with pytest.raises(DeviceError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    sentences = [s.tokens for s in corpus[:64]]
    cpu = Predictor.load(small_model_dir, "cpu", fast=False).predict(sentences)
    gpu = Predictor.load(small_model_dir, "cuda").predict(sentences)
    assert [p.tags for p in gpu] == [p.tags for p in cpu]
    for a, b in zip(gpu, cpu, strict=True):
        assert max((abs(x - y) for x, y in zip(a.scores, b.scores, strict=True)), default=0.0) < 1e-4
