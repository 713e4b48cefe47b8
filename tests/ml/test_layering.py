"""Dependencies point one way: ml never imports the web or database stack, and importing it builds
nothing (no tokenizer, no model)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ml_imports_neither_service_nor_web_nor_database_code():
    modules = sorted(p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".") for p in (ROOT / "ml").rglob("*.py") if p.name != "__main__.py")
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m.removesuffix('.__init__'))\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'service', 'fastapi', 'starlette', 'sqlalchemy', 'alembic', 'prometheus_client', 'spacy'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"ml imported {out.stdout.strip()}"
