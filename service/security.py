"""Who may do what, and what the service may touch: API keys with roles, the refusal to serve an
open API on a non-loopback address, the confinement of model folders to MODELS_DIR, and the checks
of every request's Host and credential headers (ambiguity is refused, never resolved). No FastAPI
routes here (the dependencies live in ``service.api.deps``)."""
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


# a Host header: a DNS name or IPv4 address, or an IPv6 address in brackets, and an optional port
_HOST = re.compile(r"(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9_.-]+))(?::(?P<port>[0-9]{1,5}))?")
# the headers that carry a key; a request carries at most one of them, once
CREDENTIAL_HEADERS = {b"x-api-key": "X-API-Key", b"x-admin-key": "X-Admin-Key", b"authorization": "Authorization"}
# where service.api.http_protocol keeps an absolute-form request target (uvicorn's httptools
# protocol passes on only its path; h11 leaves the whole target in raw_path)
TARGET_EXTENSION = "ner.request_target"


@dataclass(frozen=True)
class Refusal:
    """A request refused before it reaches a route: the status, the error code and message, headers."""

    status: int
    code: str
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


def parse_host(header: str) -> str | None:
    """The host name of a Host header (``[::1]:8000`` -> ``::1``), or None when it is not
    ``name[:port]`` (userinfo as in ``localhost:8000@evil``, spaces, a path, a bad port)."""
    m = _HOST.fullmatch(header.strip().lower())
    if m is None or (m.group("port") is not None and int(m.group("port")) > 65535):
        return None
    return m.group("v6") or m.group("name")


def host_problem(headers: list[tuple[bytes, bytes]], target: bytes | None, hosts: frozenset[str] | None) -> Refusal | None:
    """Why the request's Host is refused, or None: two Host headers, a malformed one, an
    absolute-form ``target`` naming another host, or (with ``hosts``) a host not served here."""
    values = [v.decode("latin-1") for k, v in headers if k == b"host"]
    if len(values) > 1:
        return Refusal(400, "ambiguous_host", f"{len(values)} Host headers; send exactly one")
    header = values[0] if values else ""
    if header and parse_host(header) is None:
        return Refusal(400, "invalid_host", f"Host {header[:100]!r} is not name[:port]")
    if target is not None and not target.startswith(b"/") and target != b"*":
        authority = target.split(b"://", 1)[-1].split(b"/", 1)[0].split(b"?", 1)[0].decode("latin-1")
        if authority.lower() != header.strip().lower():
            return Refusal(400, "ambiguous_host", f"the request target names {authority[:100]!r} but Host is {header[:100]!r}")
    if hosts is not None and (parse_host(header) or "") not in hosts:
        return Refusal(400, "untrusted_host", f"Host {header[:100]!r} is not served here; set ALLOWED_HOSTS to add it")
    return None


def credential_problem(headers: list[tuple[bytes, bytes]]) -> Refusal | None:
    """Why the request's credential headers are refused, or None: more than one (two of one header
    included: which would count?), an empty one, or an ``Authorization`` of another scheme than
    Bearer. Whether the key is valid is the routes' business (service.api.deps)."""
    found = [(CREDENTIAL_HEADERS[k], v) for k, v in headers if k in CREDENTIAL_HEADERS]
    if not found:
        return None
    challenge = ((b"www-authenticate", b"ApiKey"),)
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        return Refusal(401, "ambiguous_credentials", f"one credential per request, this one has {len(found)} ({names}): send one key in one header", challenge)
    name, value = found[0]
    scheme, _, token = value.strip().partition(b" ")
    if not value.strip():
        reason = f"the {name} header is empty: send a key or leave the header out"
    elif name == "Authorization" and (scheme.lower() != b"bearer" or not token.strip()):
        reason = "Authorization must be 'Bearer <API key>' (no other scheme is accepted)"
    else:
        return None
    return Refusal(401, "invalid_credentials", reason, challenge)


class HeaderChecks:
    """Pure ASGI middleware: ambiguity is refused, never resolved silently. 400 for two Host headers,
    a malformed Host, an absolute-form target naming another host, or a Host outside the allowed
    set (DNS rebinding against an open local instance points a browser's requests at 127.0.0.1
    under the attacker's name); 401 for more than one credential header or a malformed one, on
    every route (also those that need no key): the request is not authenticated, whichever key
    would have counted."""

    def __init__(self, app, hosts: frozenset[str] | None):
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or []
        target = (scope.get("extensions") or {}).get(TARGET_EXTENSION) or scope.get("raw_path")
        refusal = host_problem(headers, target, self.hosts) or credential_problem(headers)
        if refusal is None:
            return await self.app(scope, receive, send)
        payload = json.dumps(error_body(refusal.code, refusal.message)).encode()
        response_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *refusal.headers]
        await send({"type": "http.response.start", "status": refusal.status, "headers": response_headers})
        await send({"type": "http.response.body", "body": payload})
        return None


def default_models_dir() -> Path:
    from ml.artifact import default_model_path

    return default_model_path().parent
