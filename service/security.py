"""Who may do what, and what the service may touch: API keys with roles, the refusal to serve an
open API on a non-loopback address, the confinement of model folders to MODELS_DIR, and the
trusted-host check. No FastAPI routes here (the dependencies live in ``service.api.deps``)."""
from __future__ import annotations

import hmac
import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from service.errors import ApiError, error_body

ROLES = ("tag", "annotate", "read", "admin")
# a key given without a role (the old ``API_KEYS=k1,k2`` form) opens everything but /admin
PLAIN_KEY_ROLES = frozenset({"tag", "annotate", "read"})
_ROLE_PREFIX = re.compile(r"^([a-z]+):(.*)$", re.DOTALL)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class ConfigError(ValueError):
    """A setting that makes the service unsafe or unusable; the message says which and the fix."""


def parse_key_entry(entry: str) -> tuple[frozenset[str], str]:
    """``role:key`` -> ({role}, key); a plain ``key`` -> (PLAIN_KEY_ROLES, key). The admin role
    grants every role. Raises ValueError for an unknown role or a key under 16 characters."""
    m = _ROLE_PREFIX.match(entry)
    if m is not None:
        role, key = m.group(1), m.group(2)
        if role not in ROLES:
            raise ValueError(f"API_KEYS entry with unknown role {role!r}; roles: {', '.join(ROLES)} (form: role:key)")
        roles = frozenset(ROLES) if role == "admin" else frozenset({role})
    else:
        key, roles = entry, PLAIN_KEY_ROLES
    if len(key) < 16:
        raise ValueError("API key(s) shorter than 16 characters; use long random keys (e.g. `openssl rand -hex 24`)")
    return roles, key


@dataclass(frozen=True)
class KeyRing:
    """Every configured key with the roles it grants (a key listed twice gets both roles)."""

    keys: tuple[tuple[bytes, frozenset[str]], ...] = field(default=())
    # False when API_KEYS holds no key for the non-admin roles: those routes are then open
    # (ADMIN_KEY alone guards /admin only, as before roles existed)
    guarded: bool = False

    @classmethod
    def from_settings(cls, api_keys: Iterable[str], admin_key: str | None) -> KeyRing:
        merged: dict[str, set[str]] = {}
        guarded = False
        for entry in api_keys:
            roles, key = parse_key_entry(entry)
            merged.setdefault(key, set()).update(roles)
            guarded |= roles != frozenset(ROLES)
        if admin_key is not None:
            merged.setdefault(admin_key, set()).update(ROLES)
        return cls(tuple((k.encode(), frozenset(r)) for k, r in merged.items()), guarded)

    def roles_of(self, given: str) -> frozenset[str] | None:
        """The roles of ``given``, or None for an unknown key; compares with every key in constant
        time each, without stopping at a match."""
        found: frozenset[str] | None = None
        raw = given.encode()
        for key, roles in self.keys:
            if hmac.compare_digest(raw, key):
                found = roles
        return found

    def has_role(self, role: str) -> bool:
        return any(role in roles for _key, roles in self.keys)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, ring: KeyRing, allow_no_auth: bool) -> None:
    """Refuse to serve without keys on a non-loopback address unless ALLOW_NO_AUTH says so."""
    if ring.guarded or allow_no_auth or is_loopback(host):
        return
    raise ConfigError(
        f"refusing to serve on {host or '0.0.0.0'} without API keys: anyone who can reach it could tag, read every stored "
        "text and correction, and delete them. Set API_KEYS (e.g. API_KEYS=tag:KEY1,annotate:KEY2,read:KEY3,admin:KEY4), "
        "bind to 127.0.0.1, or set ALLOW_NO_AUTH=true if something in front of the service already authenticates."
    )


class PathRefused(ValueError):
    pass


def confine(path: str, root: Path) -> Path:
    """``path`` (absolute, or relative to ``root``) resolved, symlinks included, and required to lie
    inside ``root``. The answer does not depend on whether a path outside exists."""
    if "\x00" in path or not path.strip():
        raise PathRefused("the path is empty or contains NUL")
    given = Path(path)
    if ".." in given.parts:
        raise PathRefused("the path must not contain '..'")
    base = root.resolve()
    resolved = (base / given).resolve(strict=False)
    if not resolved.is_relative_to(base) or resolved == base:
        raise PathRefused(f"model folders must lie inside MODELS_DIR ({base})")
    return resolved


def model_folder(path: str, root: Path) -> str:
    """``confine`` for POST /admin/models: 422 path_not_allowed, the same for any outside path."""
    try:
        return str(confine(path, root))
    except PathRefused as e:
        raise ApiError(422, "path_not_allowed", f"model refused: {e}") from None


def allowed_hosts(configured: list[str], bind_host: str) -> frozenset[str] | None:
    """The Host header values the service answers; None = any (ALLOWED_HOSTS=*, or a wildcard bind
    with nothing configured: then keys are required, or ALLOW_NO_AUTH was set on purpose)."""
    if "*" in configured:
        return None
    if configured:
        return frozenset(h.lower() for h in configured)
    if bind_host in WILDCARD_HOSTS:
        return None
    return frozenset({*LOOPBACK_NAMES, bind_host.strip("[]").lower()})


def host_name(header: str) -> str:
    """The host of a Host header, without the port (``[::1]:8000`` -> ``::1``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class TrustedHost:
    """Pure ASGI middleware: 400 for a Host header outside the allowed set (DNS rebinding against an
    open local instance points a browser's requests at 127.0.0.1 under the attacker's name)."""

    def __init__(self, app, hosts: frozenset[str] | None):
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.hosts is None:
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if host_name(header) in self.hosts:
            return await self.app(scope, receive, send)
        payload = json.dumps(error_body("untrusted_host", f"Host {header!r} is not served here; set ALLOWED_HOSTS to add it")).encode()
        await send({"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
        return None


def default_models_dir() -> Path:
    from ml.artifact import default_model_path

    return default_model_path().parent
