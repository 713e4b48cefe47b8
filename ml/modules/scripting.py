"""``torch.jit.script`` behind one process-wide lock.

TorchScript compiles from the Python source through ``ast.parse``. In CPython up to 3.12 the AST
constructor keeps its recursion counter per interpreter, not per thread, so two threads compiling at
once can fail with ``SystemError: AST constructor recursion depth mismatch`` (python/cpython#106905).
The service loads models in threads (several apps in one process, a reload beside serving), so every
compilation in ``ml`` goes through :func:`script`.
"""
from __future__ import annotations

import threading
from typing import Any

import torch

_COMPILE_LOCK = threading.RLock()


def script(obj: Any) -> Any:
    """``torch.jit.script(obj)``, one compilation at a time in this process."""
    with _COMPILE_LOCK:
        return torch.jit.script(obj)
