"""JSON responses for every admin-API route (agent, SLA/rollout, consensus), one format for all."""

from __future__ import annotations

import json
from typing import Any

import msgspec
from aiohttp import web


def json_response(data: Any, status: int = 200) -> web.Response:
    """`data` may hold msgspec structs and dataclasses; anything else unknown is written as str."""
    return web.json_response(msgspec.to_builtins(data), status=status,
                             dumps=lambda d: json.dumps(d, indent=1, default=str))


def error_response(status: int, message: str, **extra: Any) -> web.Response:
    """`{"error": message, ...}` with `status`: what the CLI prints when a call is refused."""
    return json_response({"error": message, **extra}, status)
