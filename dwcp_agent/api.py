"""Admin HTTP routes of the agent: health, metrics, and the migrations API."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from dwcp_agent.migration.manager import RequestError

if TYPE_CHECKING:
    from dwcp_agent.agent import Agent


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, indent=1))


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


def routes(agent: Agent) -> list[web.RouteDef]:
    """The agent's own routes; components add theirs beside these."""

    async def health(_: web.Request) -> web.Response:
        ready, body = agent.health.snapshot()
        return _json(body, 200 if ready else 503)

    async def health_component(request: web.Request) -> web.Response:
        name = request.match_info["component"]
        body = agent.health.component(name)
        return _json({"component": name, **body}, 503 if body["status"] == "down" else 200)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=agent.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start_migration(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "request body must be a JSON object")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        try:
            migration_request = agent.manager.parse_request(body)
        except RequestError as exc:
            return _error(400, str(exc))
        try:
            migration = await asyncio.get_running_loop().run_in_executor(
                None, agent.start_migration, migration_request)
        except Exception as exc:
            return _error(400, f"cannot start migration: {exc}")
        return _json(migration.to_dict(), 201)

    async def list_migrations(_: web.Request) -> web.Response:
        return _json({"migrations": [m.to_dict() for m in agent.manager.list()]})

    async def get_migration(request: web.Request) -> web.Response:
        migration = agent.manager.get(request.match_info["id"])
        if migration is None:
            return _error(404, f"no migration {request.match_info['id']}")
        return _json(migration.to_dict())

    async def cancel_migration(request: web.Request) -> web.Response:
        migration = agent.manager.cancel(request.match_info["id"])
        if migration is None:
            return _error(404, f"no migration {request.match_info['id']}")
        await asyncio.get_running_loop().run_in_executor(None, migration.done.wait, agent.config.shutdown_timeout_s)
        return _json(migration.to_dict())

    return [
        web.get("/health", health),
        web.get("/health/{component}", health_component),
        web.get("/metrics", metrics),
        web.post("/api/v3/migrations", start_migration),
        web.get("/api/v3/migrations", list_migrations),
        web.get("/api/v3/migrations/{id}", get_migration),
        web.delete("/api/v3/migrations/{id}", cancel_migration),
    ]
