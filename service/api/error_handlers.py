"""One error shape for every failure: ``{"error": {"code", "message"}}`` (validation errors add
``details``). Never an HTML page or a stack trace."""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import ApiError, error_body

log = logging.getLogger("service.api.error_handlers")


def _clean(errors: Sequence) -> list:
    # drop echoed inputs (a rejected 1 MB text should not come back) and non-JSON context
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]


def _summary(errors: list) -> str:
    parts = []
    for e in errors[:3]:
        loc = ".".join(str(p) for p in e["loc"] if p != "body") or "body"
        parts.append(f"{loc}: {e['msg']}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}


def _allowed_methods(request: Request) -> str:
    """Every method the documented operations of this path accept (the answer to a 405)."""
    methods: set[str] = set()
    for template, item in request.app.openapi().get("paths", {}).items():
        pattern = "^" + re.sub(r"\\\{[^}]*\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, request.url.path):
            methods |= {m.upper() for m in item}
    return ", ".join(sorted(methods))


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.code, exc.message, exc.details), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = _clean(exc.errors())
        code = "invalid_json" if any(e["type"] == "json_invalid" for e in errors) else "invalid_request"
        return JSONResponse(error_body(code, _summary(errors), errors), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 400 and message == "There was an error parsing the body":
            message = "the request body could not be parsed (is it valid UTF-8 JSON?)"
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Starlette lists the first matching route's methods only
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        return JSONResponse(error_body(_STATUS_CODES.get(exc.status_code, "http_error"), message), status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal_error", "internal server error; the incident was logged"), status_code=500)
