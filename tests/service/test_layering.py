"""The service's layers (README, Development): routes translate HTTP, service modules hold the rules
without FastAPI, repositories are the only code that commits. Checked on the source, statically."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "service"
WEB = {"fastapi", "starlette"}


def _modules(folder: Path) -> dict[str, ast.Module]:
    return {p.relative_to(ROOT).as_posix(): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(folder.rglob("*.py"))}


def _imported(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_only_the_http_layer_imports_fastapi():
    web_layer = {"service/main.py"} | {p for p in _modules(SERVICE) if p.startswith("service/api/")}
    offenders = {
        path: sorted(n for n in _imported(tree) if n.split(".")[0] in WEB)
        for path, tree in _modules(SERVICE).items() if path not in web_layer
    }
    assert {p: names for p, names in offenders.items() if names} == {}


def test_no_route_module_imports_another():
    routes = _modules(SERVICE / "api" / "routes")
    offenders = {path: sorted(n for n in _imported(tree) if n.startswith("service.api.routes")) for path, tree in routes.items()}
    assert {p: names for p, names in offenders.items() if names} == {}


def test_routes_take_sessions_from_the_dependency():
    # a route that opens runtime.sessions() itself bypasses SessionDep (and its 503 on failure)
    routes = _modules(SERVICE / "api" / "routes")
    offenders = sorted(
        f"{path}:{node.lineno}" for path, tree in routes.items() for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr == "sessions"
    )
    assert offenders == []


REPOSITORIES = {"service/db/repositories.py", "service/db/jobs.py"}  # jobs.py: the training-jobs repository


def test_only_repositories_commit():
    offenders = sorted(
        f"{path}:{node.lineno}"
        for path, tree in {**_modules(SERVICE), **_modules(ROOT / "migrations")}.items() if path not in REPOSITORIES
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "commit"
    )
    assert offenders == []
