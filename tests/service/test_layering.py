"""The service's layers (service/__init__.py): routes translate HTTP, serving and training hold the
rules without FastAPI, store is the only code that touches the database, repositories the only code
that commits, and no module imports from a layer above its own. Checked on the source, statically."""
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


REPOSITORIES = {"service/store/repositories.py", "service/store/training_jobs.py", "service/store/rules.py"}


def test_only_repositories_commit():
    offenders = sorted(
        f"{path}:{node.lineno}"
        for path, tree in {**_modules(SERVICE), **_modules(ROOT / "migrations")}.items() if path not in REPOSITORIES
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "commit"
    )
    assert offenders == []


# bottom to top; a module may import its own layer and those below it. "shared" are the top-level
# modules everything may use (settings, errors, metrics, security, logging, wire shapes); the store
# is above them only in name: it uses none of them (test_the_store_imports_nothing_else_of_the_service).
LAYERS = ("shared", "store", "serving", "training", "api", "entry")
ENTRY = {"service.main", "service.cli", "service.__main__"}


def _layer(module: str) -> str | None:
    """The layer of a module of the service (dotted name), None for anything outside it."""
    parts = module.split(".")
    if parts[0] != "service":
        return None
    if module in ENTRY:
        return "entry"
    if len(parts) > 1 and parts[1] in ("store", "serving", "training", "api"):
        return parts[1]
    return "shared"


def _dotted(path: str) -> str:
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def _service_imports(tree: ast.Module) -> set[str]:
    # "from service import metrics" names the module service.metrics; "from service.x import f" names service.x
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {f"{node.module}.{a.name}" for a in node.names} if node.module == "service" else {node.module}
    return {n for n in names if n.startswith("service.")}


def test_every_module_of_the_service_has_a_known_layer():
    for path in _modules(SERVICE):
        assert _layer(_dotted(path)) in LAYERS, path


def test_no_module_imports_from_a_layer_above_its_own():
    offenders = {}
    for path, tree in _modules(SERVICE).items():
        rank = LAYERS.index(_layer(_dotted(path)) or "entry")
        above = sorted(n for n in _service_imports(tree) if LAYERS.index(_layer(n) or "entry") > rank)
        if above:
            offenders[path] = above
    assert offenders == {}


def test_the_store_imports_nothing_else_of_the_service():
    # not even settings or metrics: what it needs is passed in (e.g. the prediction writer's counter)
    offenders = {
        path: sorted(n for n in _service_imports(tree) if _layer(n) != "store")
        for path, tree in _modules(SERVICE / "store").items()
    }
    assert {p: names for p, names in offenders.items() if names} == {}


def test_routes_call_the_rules_layer_never_the_store():
    # the tables' row types may be named (a route turns a row into its response); nothing that
    # queries, writes or opens sessions
    offenders = {
        path: sorted(n for n in _service_imports(tree) if _layer(n) == "store" and n != "service.store.tables")
        for path, tree in _modules(SERVICE / "api").items()
    }
    assert {p: names for p, names in offenders.items() if names} == {}


def test_the_layer_check_catches_an_upward_import():
    # the checks above would pass on anything if _layer or _service_imports saw nothing
    tree = ast.parse("from service import metrics\nfrom service.api.deps import SessionDep\nimport service.serving.engine\n")
    assert _service_imports(tree) == {"service.metrics", "service.api.deps", "service.serving.engine"}
    assert [_layer(n) for n in ("service.store.tables", "service.metrics", "service.serving.engine", "service.api.deps", "service.main")] == [
        "store", "shared", "serving", "api", "entry"]
    assert LAYERS.index("shared") < LAYERS.index("store") < LAYERS.index("serving") < LAYERS.index("training") < LAYERS.index("api")
