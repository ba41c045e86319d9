"""Admin HTTP routes of the agent: health, metrics, and the migrations API."""

from __future__ import annotations

import asyncio
import json
from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from dwcp_agent.config import Config
from dwcp_agent.http_json import error_response, json_response
from dwcp_agent.live.service import LiveRequestError, LiveService, parse_live_request
from dwcp_agent.migration.manager import MigrationManager, RequestError
from dwcp_agent.telemetry.health import Health
from dwcp_agent.telemetry.metrics import Metrics


class AdminHost(Protocol):
    """What the routes read of the agent (agent.Agent has it; the agent imports this module)."""

    config: Config
    health: Health
    metrics: Metrics

    @property
    def manager(self) -> MigrationManager: ...

    @property
    def live(self) -> LiveService: ...


def routes(agent: AdminHost) -> list[web.RouteDef]:
    """The agent's own routes; components add theirs beside these."""

    async def health(_: web.Request) -> web.Response:
        ready, body = agent.health.snapshot()
        return json_response(body, 200 if ready else 503)

    async def health_component(request: web.Request) -> web.Response:
        name = request.match_info["component"]
        if not agent.health.knows(name):
            return error_response(404, f"no component {name!r} (known: {', '.join(agent.health.names())})")
        body = agent.health.component(name)
        return json_response({"component": name, **body}, 503 if body["status"] == "down" else 200)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=agent.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start_migration(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            agent.metrics.error("migration", "bad_request")
            return error_response(400, "request body must be a JSON object")
        if body.get("kind") == "live":
            try:
                record = await agent.live.start(parse_live_request(body, agent.config))
            except LiveRequestError as exc:
                return error_response(exc.status, str(exc))
            return json_response(record.to_dict(), 201)
        try:
            migration_request = agent.manager.parse_request(body)
        except RequestError as exc:
            agent.metrics.error("migration", exc.error_type)  # a client's mistake: not an SLA error
            return error_response(400, str(exc))
        try:
            migration = await asyncio.get_running_loop().run_in_executor(
                None, agent.manager.start, migration_request)
        except RequestError as exc:  # a local policy (max_outgoing_migrations) refused it
            agent.metrics.error("migration", exc.error_type)
            return error_response(400, str(exc))
        except Exception as exc:
            return error_response(400, f"cannot start migration: {exc}")
        return json_response(migration.to_dict(), 201)

    async def list_migrations(_: web.Request) -> web.Response:
        image = [{"kind": "image", **r} for r in agent.manager.records()]
        return json_response({"migrations": image + [r.to_dict() for r in agent.live.list()]})

    async def get_migration(request: web.Request) -> web.Response:
        live = agent.live.get(request.match_info["id"])
        if live is not None:
            return json_response(live.to_dict())
        record = agent.manager.record(request.match_info["id"])
        if record is None:
            return error_response(404, f"no migration {request.match_info['id']}")
        return json_response({"kind": "image", **record})

    async def cancel_migration(request: web.Request) -> web.Response:
        live = await agent.live.cancel(request.match_info["id"], agent.config.shutdown_timeout_s)
        if live is not None:
            return json_response(live.to_dict())
        migration = agent.manager.cancel(request.match_info["id"])
        if migration is None:
            return error_response(404, f"no migration {request.match_info['id']}")
        await asyncio.get_running_loop().run_in_executor(None, migration.done.wait, agent.config.shutdown_timeout_s)
        return json_response(migration.to_dict())

    return [
        web.get("/health", health),
        web.get("/health/{component}", health_component),
        web.get("/metrics", metrics),
        web.post("/api/v3/migrations", start_migration),
        web.get("/api/v3/migrations", list_migrations),
        web.get("/api/v3/migrations/{id}", get_migration),
        web.delete("/api/v3/migrations/{id}", cancel_migration),
    ]
