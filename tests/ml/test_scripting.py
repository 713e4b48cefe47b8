"""TorchScript compilation is serialised in the process (ml.modules.scripting): the AST constructor
of CPython <= 3.12 is not safe when two threads compile at once (python/cpython#106905)."""
from __future__ import annotations

import threading
from pathlib import Path

from ml.modules import scripting
from ml.modules.rnn import RecurrentLayer


def test_a_compilation_waits_while_another_holds_the_lock():
    done = threading.Event()

    def compile_one() -> None:
        scripting.script(RecurrentLayer("gru", 3, 4, True))
        done.set()

    with scripting._COMPILE_LOCK:
        t = threading.Thread(target=compile_one)
        t.start()
        assert not done.wait(1.0), "a compilation ran while another thread held the lock"
    t.join(60)
    assert done.is_set()


def test_every_compilation_in_the_project_goes_through_the_lock():
    """A direct ``torch.jit.script(`` call in ml/ or service/ would compile outside the lock."""
    root = Path(__file__).resolve().parents[2]
    direct = [
        f"{path.relative_to(root)}:{n}"
        for package in ("ml", "service")
        for path in sorted((root / package).rglob("*.py"))
        if path.name != "scripting.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "torch.jit.script(" in line.split("#")[0] and not line.lstrip().startswith(('"', "'"))
    ]
    assert not direct, f"compile through ml.modules.scripting.script instead: {direct}"
