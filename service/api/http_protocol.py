"""The HTTP protocol ``ner serve`` runs: uvicorn's httptools protocol hands the application only the
path of an absolute-form request target (``GET http://host/path HTTP/1.1``); this one also keeps the
whole target in the scope's extensions, so that the host check can refuse a target naming another
host than the Host header (service.security.HeaderChecks). h11, uvicorn's other protocol, leaves
the whole target in ``raw_path`` by itself."""
from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.security import TARGET_EXTENSION


class TargetKeepingHttpTools(HttpToolsProtocol):
    def on_headers_complete(self) -> None:
        if not self.url.startswith(b"/"):
            extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
            extensions[TARGET_EXTENSION] = bytes(self.url)
        super().on_headers_complete()

