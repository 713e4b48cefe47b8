"""The service's errors, without FastAPI: every rule refuses a request by raising ``ApiError``
(status, code, message); ``service.api.error_handlers`` turns it into ``{"error": {"code", "message"}}``."""
from __future__ import annotations

from typing import Any

from service import metrics

# seconds a client waits before retrying after the database failed
RETRY_AFTER_DATABASE = "5"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None, details: Any = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.details = status, code, message, headers, details


def error_body(code: str, message: str, details: Any = None) -> dict:
    body: dict = {"error": {"code": code, "message": message}}
    if details is not None:
        body["error"]["details"] = details
    return body


def database_unavailable(error: BaseException, *, operation: str, message: str | None = None) -> ApiError:
    """The 503 for a database operation that failed, counted under ``operation``; the default
    message names the error's type (never its text, which may carry stored texts)."""
    metrics.DB_ERRORS.labels(operation=operation).inc()
    text = message if message is not None else f"the database is unavailable: {type(error).__name__}"
    return ApiError(503, "database_unavailable", text, {"Retry-After": RETRY_AFTER_DATABASE})
