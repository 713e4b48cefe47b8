"""The docs describe what the service does (issue 24): every error code the service can answer is
in docs/api.md's error table, every OpenAPI security scheme is named there, every route's role is
in its route table, and no page says idempotency keys are kept forever."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
API_DOC = ROOT / "docs" / "api.md"
CODE = re.compile(r"^[a-z]+(?:_[a-z]+)*$")
# calls whose argument is an error code: ApiError(status, code, message), error_body(code, ...), and
# the middlewares' senders (_send_error(send, status, code, message), Refusal(status, code, message))
CODE_CALLS = re.compile(r"^(ApiError|Refusal|error_body|_?send_error|_?refuse)$")


def _name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _strings(node: ast.AST) -> set[str]:
    """The code-like strings ``node`` can evaluate to: both branches of a conditional, a call's
    arguments (``codes.get(status, "http_error")``), never a condition's or a subscript's strings."""
    if isinstance(node, ast.Constant):
        return {node.value} if isinstance(node.value, str) and CODE.match(node.value) else set()
    if isinstance(node, ast.IfExp):
        return _strings(node.body) | _strings(node.orelse)
    if isinstance(node, ast.Call):
        return set().union(*(_strings(a) for a in node.args))
    if isinstance(node, (ast.Compare, ast.Subscript)):
        return set()
    return set().union(set(), *(_strings(c) for c in ast.iter_child_nodes(node)))


def _problem_codes(tree: ast.AST) -> set[str]:
    """Codes a ``*_problem`` function returns as ``(code, reason)`` (ml.texts.text_problem: the service
    raises ApiError(status, code, ...) with it)."""
    codes: set[str] = set()
    for func in ast.walk(tree):
        if isinstance(func, ast.FunctionDef) and func.name.endswith("_problem"):
            for node in ast.walk(func):
                if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple) and node.value.elts:
                    codes |= _strings(node.value.elts[0])
    return codes


def _codes_in(tree: ast.AST) -> set[str]:
    codes = _problem_codes(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and CODE_CALLS.match(_name(node.func)):
            # the code is the first string-valued argument: a literal, a conditional or a lookup
            for arg in node.args:
                if not (isinstance(arg, ast.Constant) and isinstance(arg.value, int)) and not isinstance(arg, ast.Name):
                    codes |= _strings(arg)
                    break
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "code" for t in node.targets):
            codes |= _strings(node.value)  # code = "a" if ... else "b"; error_body(code, ...)
        elif isinstance(node, ast.Dict) and node.keys and all(isinstance(k, ast.Constant) and isinstance(k.value, int) and 400 <= k.value < 600 for k in node.keys):
            codes |= set().union(*(_strings(v) for v in node.values))  # status -> code
    return codes


def emitted_codes() -> set[str]:
    codes: set[str] = set()
    for path in [*(ROOT / "service").rglob("*.py"), ROOT / "ml" / "texts.py"]:
        codes |= _codes_in(ast.parse(path.read_text(encoding="utf-8")))
    return codes


def documented_codes() -> set[str]:
    """The backticked codes in the last column of docs/api.md's error table."""
    text = API_DOC.read_text(encoding="utf-8")
    section = text.split("## Errors", 1)[1].split("\n## ", 1)[0]
    codes: set[str] = set()
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            codes |= set(re.findall(r"`([a-z_]+)`", line.rstrip(" |").rsplit("|", 1)[-1]))
    return codes


def test_the_collector_finds_the_codes_of_every_kind_of_emitter():
    # literals in ApiError, a conditional assigned to `code`, the status map, the middlewares
    found = emitted_codes()
    assert {"unauthorized", "invalid_json", "invalid_request", "method_not_allowed", "http_error", "too_large", "request_timeout",
            "untrusted_host", "internal_error", "no_corrections", "shutting_down", "database_unavailable", "empty_text", "ambiguous_credentials"} <= found


def test_every_error_code_the_service_emits_is_in_the_error_table():
    missing = emitted_codes() - documented_codes()
    assert not missing, f"error codes missing from docs/api.md's error table: {sorted(missing)}"


def test_the_error_table_names_no_code_the_service_never_emits():
    stale = documented_codes() - emitted_codes()
    assert not stale, f"docs/api.md lists codes the service does not emit: {sorted(stale)}"


@pytest.fixture(scope="module")
def openapi() -> dict:
    from service.config import Settings
    from service.main import create_app

    keys = ["tag:" + "t" * 16, "annotate:" + "n" * 16, "read:" + "r" * 16, "admin:" + "a" * 16]
    return create_app(Settings(api_keys=keys, admin_key="b" * 16, protect_probes=True, _env_file=None)).openapi()


def test_every_security_scheme_is_named_in_the_api_docs(openapi):
    text = API_DOC.read_text(encoding="utf-8")
    schemes = set(openapi["components"]["securitySchemes"])
    assert {"ProbeKey", "TagKey", "AdminKey", "Bearer"} <= schemes
    missing = {s for s in schemes if f"`{s}`" not in text}
    assert not missing, f"security schemes the OpenAPI document declares but docs/api.md does not name: {sorted(missing)}"


def _route_rows() -> list[tuple[str, str]]:
    text = API_DOC.read_text(encoding="utf-8")
    section = text.split("## Routes", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if len(cells) >= 3 and not cells[0].startswith("---") and cells[0] != "route":
            rows.append((cells[0], cells[1]))
    return rows


def _template(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path)


def test_every_operation_is_in_the_route_table_with_its_role(openapi):
    rows = [(re.findall(r"`(GET|POST|DELETE|PUT|PATCH) ([^`?]+)", route), role) for route, role in _route_rows()]
    problems = []
    for path, item in openapi["paths"].items():
        for method, op in item.items():
            role = op.get("x-required-role") or ("probe" if op.get("security") else "none")
            found = [r for ops, r in rows if any(m == method.upper() and _template(p) == _template(path) for m, p in ops)]
            if not found:
                problems.append(f"{method.upper()} {path}: not in the route table")
            elif role not in found[0].replace("`", ""):
                problems.append(f"{method.upper()} {path}: needs {role!r}, the table says {found[0]!r}")
    assert not problems, problems


def test_no_page_says_idempotency_keys_are_kept_forever():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        for paragraph in page.read_text(encoding="utf-8").split("\n\n"):
            flat = " ".join(paragraph.split()).lower()
            if "idempotency key" in flat:
                assert not re.search(r"idempotency keys are kept forever|\(no expiry\)", flat), f"{page.name}: {flat[:200]}"
