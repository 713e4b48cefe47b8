"""Where a model runs: ``cpu``, ``cuda`` or ``cuda:N``, checked against this torch build and this
machine before anything is loaded, so that a wrong choice is one clear error, not a traceback from
deep inside torch ("Torch not compiled with CUDA enabled")."""
from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device this torch build or this machine cannot run on; the message says why."""


def resolve_device(spec: str | torch.device, local_rank: int = 0) -> torch.device:
    """``auto`` is the GPU of ``local_rank`` when CUDA works, else the CPU."""
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"unknown device {spec!r}: use cpu, cuda or cuda:N") from e
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"device {spec!r} is not supported: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        raise DeviceError(f"device {spec!r}: CUDA is not available (torch {torch.__version__}, {build}; docs/gpu.md says how to install a CUDA build)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
