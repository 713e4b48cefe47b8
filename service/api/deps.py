"""Dependencies as Annotated aliases: the app's runtime state, a database session, API keys.
The cheap ones are ``async def``: FastAPI would run a plain ``def`` in its thread pool, a thread
hop per request on the hot path."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from service.errors import ApiError, database_unavailable
from service.security import KeyRing
from service.serving.runtime import Runtime


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


# one security scheme per role (all the X-API-Key header): the OpenAPI schema then names the role
# each operation needs (service.api.openapi adds it as x-required-role)
SCHEME_NAMES = {"tag": "TagKey", "annotate": "AnnotateKey", "read": "ReadKey", "admin": "AdminApiKey", "probe": "ProbeKey"}
_ROLE_KEYS = {
    role: APIKeyHeader(name="X-API-Key", scheme_name=SCHEME_NAMES[role], auto_error=False, description=f"an API key with the {role} role (API_KEYS)")
    for role in ("tag", "annotate", "read", "admin", "probe")
}
_BEARER = HTTPBearer(scheme_name="Bearer", auto_error=False, description="the same API key as a bearer token (what Prometheus sends)")
_ADMIN_KEY = APIKeyHeader(name="X-Admin-Key", scheme_name="AdminKey", auto_error=False, description="ADMIN_KEY (or an admin key of API_KEYS in X-API-Key)")


def _given_keys(*keys: str | None, bearer: HTTPAuthorizationCredentials | None = None) -> list[str]:
    given = [k for k in keys if k is not None]
    if bearer is not None:
        given.append(bearer.credentials)
    return given


def require_role(role: str):
    """A dependency that lets a request through when its key has ``role``. Routes other than /admin
    are open while API_KEYS holds no key for them; /admin needs an admin key (ADMIN_KEY or admin:KEY)."""

    role_key = _ROLE_KEYS[role]

    async def dependency(
        runtime: RuntimeDep,
        x_api_key: str | None = Security(role_key),  # a closure variable: not resolvable inside Annotated
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)] = None,
    ) -> None:
        ring = runtime.settings.key_ring
        if not ring.guarded:
            return
        _check(ring, role, _given_keys(x_api_key, bearer=bearer))

    async def admin_dependency(
        runtime: RuntimeDep,
        x_admin_key: Annotated[str | None, Security(_ADMIN_KEY)] = None,
        x_api_key: str | None = Security(role_key),  # a closure variable: not resolvable inside Annotated
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)] = None,
    ) -> None:
        ring = runtime.settings.key_ring
        if not ring.has_role("admin"):
            raise ApiError(403, "admin_disabled", "admin endpoints are disabled: set ADMIN_KEY (or an admin:KEY entry in API_KEYS) to enable them")
        _check(ring, "admin", _given_keys(x_admin_key, x_api_key, bearer=bearer))

    return admin_dependency if role == "admin" else dependency


def _check(ring: KeyRing, role: str, given: list[str]) -> None:
    """Every key presented must be valid (a wrong one is never outvoted by a right one), and one of
    them must have ``role``."""
    if not given:
        raise ApiError(401, "unauthorized", "missing X-API-Key header (or Authorization: Bearer)", {"WWW-Authenticate": "ApiKey"})
    granted: set[str] = set()
    for key in given:
        roles = ring.roles_of(key)
        if roles is None:
            raise ApiError(401, "unauthorized", "invalid API key", {"WWW-Authenticate": "ApiKey"})
        granted |= roles
    if role not in granted:
        raise ApiError(403, "forbidden", f"this key lacks the {role!r} role needed here (it has: {', '.join(sorted(granted))})")


require_api_key = require_role("tag")
require_annotate_key = require_role("annotate")
require_read_key = require_role("read")
require_admin_key = require_role("admin")


async def require_probe_key(
    runtime: RuntimeDep,
    x_api_key: Annotated[str | None, Security(_ROLE_KEYS["probe"])] = None,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)] = None,
) -> None:
    """With PROTECT_PROBES, any valid key (whatever its role) opens /healthz, /readyz, /metrics and the docs."""
    ring = runtime.settings.key_ring
    if not runtime.settings.protect_probes or not ring.keys:
        return
    given = _given_keys(x_api_key, bearer=bearer)
    if not given:
        raise ApiError(401, "unauthorized", "missing X-API-Key header (or Authorization: Bearer)", {"WWW-Authenticate": "ApiKey"})
    if any(ring.roles_of(key) is None for key in given):
        raise ApiError(401, "unauthorized", "invalid API key", {"WWW-Authenticate": "ApiKey"})

