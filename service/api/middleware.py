"""Pure ASGI middleware: request metrics by route template, and the body-size cap."""
from __future__ import annotations

import asyncio
import json
import time

from service import metrics
from service.errors import error_body


class RequestMetrics:
    """Counts and times every HTTP request by route template (not raw path), method and status."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            labels = {"route": template, "method": scope["method"], "status": str(status["code"])}
            metrics.HTTP_REQUESTS.labels(**labels).inc()
            metrics.HTTP_LATENCY.labels(**labels).observe(time.perf_counter() - started)


class BodyLimit:
    """Answers 413 before the application sees a body over ``max_bytes`` (declared or streamed), and
    408 when the whole body has not arrived ``timeout_s`` after the request started (a client that
    trickles or never finishes its body would otherwise hold the connection and a task forever)."""

    def __init__(self, app, max_bytes: int, timeout_s: float = 30.0, larger: dict[str, int] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.larger = larger or {}  # path prefix -> its own limit (rule imports: RULES_MAX_BODY_BYTES)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        limit = next((n for prefix, n in self.larger.items() if path == prefix or path.startswith(prefix + "/")), self.max_bytes)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._reject(send, limit)
        chunks, size = [], 0
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return await self._send_error(send, 408, "request_timeout", f"the request body did not arrive within {self.timeout_s:g} s")
            if message["type"] == "http.disconnect":
                return None
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return await self._reject(send, limit)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        whole = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
        return None

    async def _reject(self, send, limit: int):
        return await self._send_error(send, 413, "too_large", f"the request body is larger than {limit} bytes")

    @staticmethod
    async def _send_error(send, status: int, code: str, message: str):
        payload = json.dumps(error_body(code, message)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        if status == 408:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
