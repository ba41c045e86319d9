"""Who may use the admin API: bearer token, Host and Origin checks, JSON-only bounded bodies.

The admin port can start migrations, move VM ownership and change cluster membership, so every
route needs the admin token except the read-only probes (`/health*`, `/metrics`,
`/metrics/summary`), which `admin_auth_health` can protect too. A browser on the operator's
machine must not be usable as a proxy: a Host header naming a domain (DNS rebinding), an Origin
from elsewhere or a non-JSON body (a "simple" cross-site request) is refused before any handler.
Bodies are parsed once here, bounded in size (1 MiB, by aiohttp) and depth, and strings holding a
NUL byte are refused, so handlers never see input the OS would reject with an exception.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware

from dwcp_agent.config import Config, ConfigError
from dwcp_agent.http_json import error_response

__all__ = ["MAX_JSON_DEPTH", "OPEN_PATHS", "BodyError", "check_json", "is_open", "load_or_create_token",
           "make_guard", "token_path"]

log = logging.getLogger("dwcp_agent.admin")
MAX_JSON_DEPTH = 32
OPEN_PATHS = ("/health", "/metrics", "/metrics/summary")
MIN_TOKEN_CHARS = 16
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BodyError(ValueError):
    """A request body the admin API does not accept."""


def token_path(config: Config) -> Path:
    """admin_token_file, or state_dir/admin.token."""
    return Path(config.admin_token_file or Path(config.state_dir) / "admin.token")


def load_or_create_token(config: Config) -> bytes:
    """The admin token: read from its file, or generated into it (mode 0600) on first start."""
    path = token_path(config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError("admin_token_file", f"cannot create {path}: {exc.strerror or exc}") from exc
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        log.info("admin token written to %s", path, extra={"component": "agent"})
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("admin_token_file", f"cannot read {path}: {exc}") from exc
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError("admin_token_file", f"{path} must hold a token of at least {MIN_TOKEN_CHARS} characters")
    return token.encode()


def is_open(method: str, path: str) -> bool:
    """Read-only probes that stay open unless admin_auth_health is set."""
    return method in ("GET", "HEAD") and (path in OPEN_PATHS or path.startswith("/health/"))


def check_json(raw: bytes) -> Any:
    """Parse a body: JSON text, nested at most MAX_JSON_DEPTH, no NUL byte in any string."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise BodyError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BodyError(f"body is not JSON: {exc}") from None
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise BodyError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)
        elif isinstance(value, str) and "\x00" in value:
            raise BodyError("a string in the body holds a NUL byte")
    return data


def _host_name(host: str) -> str:
    """'name:port', '[v6]:port' or 'name' -> the bare lower-case name."""
    if host.startswith("["):
        return host[1:].partition("]")[0].lower()
    name, _, port = host.rpartition(":")
    if name and port.isdigit() and ":" not in name:
        return name.lower()
    return host.lower()


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.split("%")[0])
    except ValueError:
        return False
    return True


def make_guard(config: Config, token: bytes) -> Middleware:
    """The aiohttp middleware applying the rules of the module docstring to every route."""
    names = {"localhost", config.node_id.lower(), socket.gethostname().lower(),
             *(h.lower() for h in config.admin_allowed_hosts)}
    any_host = "*" in names

    def host_ok(request: web.Request) -> bool:
        name = _host_name(request.headers.get("Host", ""))
        return any_host or _is_ip(name) or name in names

    def authorized(request: web.Request) -> bool:
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(presented.strip().encode(), token)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if "\x00" in request.path:
            return error_response(400, "the request path holds a NUL byte")
        if not host_ok(request):
            return error_response(403, "Host header not accepted (use an IP address, localhost or a name "
                                       "listed in admin_allowed_hosts)")
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc.lower() != request.headers.get("Host", "").lower():
            return error_response(403, "cross-origin requests are refused")
        if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            return error_response(403, "cross-site requests are refused")
        if (config.admin_auth_health or not is_open(request.method, request.path)) and not authorized(request):
            response = error_response(401, "admin token required (Authorization: Bearer <token>)")
            response.headers["WWW-Authenticate"] = 'Bearer realm="dwcp-agent"'
            return response
        if request.body_exists:
            if request.content_type != "application/json":
                return error_response(415, "request bodies must be application/json")
            try:
                check_json(await request.read())
            except BodyError as exc:
                return error_response(400, str(exc))
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except (ValueError, TypeError, KeyError) as exc:  # input the handler did not expect
            log.warning("admin request refused: %s", str(exc)[:200], extra={"component": "agent"})
            return error_response(400, f"bad request: {str(exc)[:200]}")

    return guard
