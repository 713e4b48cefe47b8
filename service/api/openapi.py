"""The OpenAPI schema as the service behaves: the ``{"error": {...}}`` body of every failure (not
FastAPI's default ``{detail}``), the error statuses routes really answer, the role each route
needs, and the real content types of /annotations and /metrics. /docs and /openapi.json are served
behind the probe key (PROTECT_PROBES)."""
from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse

ERROR_SCHEMA = {
    "title": "ErrorBody",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "description": "stable machine-readable code (every one is listed in docs/api.md, Errors)"},
                "message": {"type": "string", "description": "what is wrong, for a person"},
                "details": {"description": "validation errors: [{loc, msg, type}]"},
            },
        }
    },
}

_DESCRIPTIONS = {
    400: "an untrusted, malformed or repeated Host header, or a body that cannot be parsed",
    401: "more than one credential header, or one that is empty or not Bearer (on every route); on a protected route also a missing or unknown key",
    403: "the key lacks the role this route needs, or admin endpoints are disabled",
    404: "no such resource",
    408: "the request body did not arrive within BODY_TIMEOUT_S",
    409: "conflicts with stored data (the message says what)",
    413: "body or text over the size limits",
    422: "invalid request (the message names the field)",
    503: "overloaded or the database is unavailable; see Retry-After",
}

# statuses beyond the common ones, by (method, path template)
_EXTRA: dict[tuple[str, str], tuple[int, ...]] = {
    ("post", "/feedback"): (404, 409),
    ("post", "/admin/models"): (409,),
    ("post", "/admin/models/{model_id}/activate"): (404,),
    ("delete", "/documents/{document_id}"): (404,),
    ("delete", "/predictions/{prediction_id}"): (404,),
    ("post", "/admin/retrain"): (404,),
    ("get", "/admin/jobs/{job_id}"): (404,),
    # entity rules: an unknown rule id or version; 409 when two changes were made from one version
    **{(m, "/admin/rules" + p): (409,) for m, p in (("post", ""), ("put", ""), ("put", "/mode"), ("post", "/import"))},
    ("post", "/admin/rules/remove"): (404, 409),
    ("delete", "/admin/rules/{rule_id}"): (404, 409),
    ("post", "/admin/rules/versions/{version}/rollback"): (404, 409),
    ("get", "/admin/rules/export"): (404,),
    ("post", "/admin/rules/dry-run"): (404,),  # a rule id to remove that the current version does not have
}
# routes that never touch the database or a queue
_NO_503 = {("get", "/healthz"), ("get", "/model"), ("get", "/metrics")}

_CONTENT: dict[tuple[str, str], dict[str, Any]] = {
    ("get", "/annotations"): {
        "application/x-ndjson": {"schema": {"type": "string", "description": "one JSON record per line: {id, text, entities, meta}"}},
        "text/plain": {"schema": {"type": "string", "description": "CoNLL (format=conll): token and IOB2 tag per line"}},
    },
    ("get", "/metrics"): {"text/plain": {"schema": {"type": "string", "description": "Prometheus text exposition format 0.0.4"}}},
}


_READINESS = {
    "type": "object",
    "required": ["status", "checks"],
    "properties": {"status": {"type": "string", "enum": ["ready", "not ready"]}, "checks": {"type": "object", "additionalProperties": {"type": "string"}}},
}


def _role_of(op: dict) -> str | None:
    """The role named by the operation's security schemes (one per role: TagKey, ReadKey, ...)."""
    roles = {"TagKey": "tag", "AnnotateKey": "annotate", "ReadKey": "read", "AdminApiKey": "admin", "AdminKey": "admin"}
    for requirement in op.get("security", []):
        for name in requirement:
            if name in roles:
                return roles[name]
    return None


def build_schema(app: FastAPI, guarded: bool = True, protect_probes: bool = True) -> dict:
    """The schema of ``app``; ``guarded`` (API_KEYS holds keys for the non-admin roles) and
    ``protect_probes`` say which operations really check a key: the others declare no security."""
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["ErrorBody"] = ERROR_SCHEMA
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    ref = {"$ref": "#/components/schemas/ErrorBody"}
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            key = (method, path)
            role = _role_of(op)
            probe = any("ProbeKey" in requirement for requirement in op.get("security", []))
            if (probe and not (protect_probes and guarded)) or (role is not None and role != "admin" and not guarded):
                op.pop("security", None)
                role = None
            codes = {400, 401}  # a malformed credential is refused on every route (service.security)
            if op.get("security"):
                codes.add(403)
            if role is not None:
                op["x-required-role"] = role
                op["description"] = (op.get("description", "") + f"\n\nRequires an API key with the **{role}** role (when API_KEYS holds keys).").strip()
            if op.get("parameters") or "requestBody" in op:
                codes.add(422)
            if "requestBody" in op:
                codes |= {408, 413}
            if key not in _NO_503:
                codes.add(503)
            codes |= set(_EXTRA.get(key, ()))
            responses = op.setdefault("responses", {})
            for code in sorted(codes):
                if code == 503 and path == "/readyz":
                    continue
                responses[str(code)] = {"description": _DESCRIPTIONS[code], "content": {"application/json": {"schema": ref}}}
            if path == "/readyz":
                responses["503"] = {"description": "not ready: the model or the database is unavailable", "content": {"application/json": {"schema": _READINESS}}}
            if key in _CONTENT:
                responses["200"]["content"] = _CONTENT[key]
    return schema


def install(app: FastAPI, probe_dependency, guarded: bool = True, protect_probes: bool = True) -> None:
    """Serve /openapi.json and /docs behind ``probe_dependency`` (create the app with
    ``openapi_url=None, docs_url=None, redoc_url=None``)."""
    cache: dict[str, dict] = {}

    def openapi() -> dict:
        if "schema" not in cache:
            cache["schema"] = build_schema(app, guarded, protect_probes)
        return cache["schema"]

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(probe_dependency)])
    async def openapi_json() -> JSONResponse:
        return JSONResponse(openapi())

    @app.get("/docs", include_in_schema=False, dependencies=[Depends(probe_dependency)])
    async def docs(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")
