"""Dependencies as Annotated aliases: the app's runtime state, a database session, API keys.
The cheap ones are ``async def``: FastAPI would run a plain ``def`` in its thread pool, a thread
hop per request on the hot path."""
from __future__ import annotations

import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.batching import MicroBatcher
from service.config import Settings
from service.db.repositories import PredictionRecord
from service.errors import ApiError, database_unavailable
from service.tagging import TaggingEngine


@dataclass
class Runtime:
    """Everything the lifespan builds; one per worker process."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    tagging: TaggingEngine
    writer: MicroBatcher[PredictionRecord, bool]


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_session(runtime: RuntimeDep) -> Iterator[Session]:
    try:
        with runtime.sessions() as session:
            yield session
    except SQLAlchemyError as e:
        raise database_unavailable(e, operation="session") from None


SessionDep = Annotated[Session, Depends(get_session)]


def _matches_any(given: str, keys: list[str]) -> bool:
    # compare against every key, without stopping at the first match, in constant time each
    found = False
    for key in keys:
        found |= hmac.compare_digest(given.encode(), key.encode())
    return found


async def require_api_key(
    runtime: RuntimeDep,
    x_api_key: Annotated[str | None, Header()] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> None:
    """``X-API-Key: KEY``, or ``Authorization: Bearer KEY`` (what Prometheus can send when scraping)."""
    keys = runtime.settings.api_keys
    if not keys:
        return
    if x_api_key is None and authorization is not None and authorization.lower().startswith("bearer "):
        x_api_key = authorization[7:].strip()
    if x_api_key is None:
        raise ApiError(401, "unauthorized", "missing X-API-Key header", {"WWW-Authenticate": "ApiKey"})
    if not _matches_any(x_api_key, keys):
        raise ApiError(401, "unauthorized", "invalid API key", {"WWW-Authenticate": "ApiKey"})


async def require_probe_key(
    runtime: RuntimeDep,
    x_api_key: Annotated[str | None, Header()] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> None:
    if runtime.settings.protect_probes:
        await require_api_key(runtime, x_api_key, authorization)


async def require_admin_key(runtime: RuntimeDep, x_admin_key: Annotated[str | None, Header()] = None) -> None:
    admin = runtime.settings.admin_key
    if admin is None:
        raise ApiError(403, "admin_disabled", "admin endpoints are disabled: set ADMIN_KEY to enable them")
    if x_admin_key is None or not _matches_any(x_admin_key, [admin]):
        raise ApiError(401, "unauthorized", "missing or invalid X-Admin-Key header")
