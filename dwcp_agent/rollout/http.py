"""Admin HTTP routes of the SLA guard and the rollout controller.

`sla_routes(guard)` returns aiohttp route definitions the agent adds to its admin app:

* `GET  /metrics/summary`          5 min p50/p95/p99 (ms), throughput, error rate, SLA status
* `GET  /api/v3/sla`               all windows, GO/NO-GO, error budget, rollout, events
* `GET  /api/v3/rollout`           rollout state and its events
* `POST /api/v3/rollout`           body `{"percentage": N}` and/or `{"enable_v3": bool}`
* `POST /api/v3/rollout/rollback`  body optional `{"reason": "..."}`
* `POST /api/v3/rollout/unfreeze`

The admin port is reachable by Prometheus from other hosts, so the POST routes only accept
requests from loopback: changing the rollout needs a shell on the host (or `kubectl exec`),
where `dwcp-agent rollout ...` runs.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from aiohttp import web

from dwcp_agent.http_json import json_response
from dwcp_agent.rollout.controller import RolloutError
from dwcp_agent.rollout.sla import SlaGuard

__all__ = ["sla_routes"]


def _from_loopback(request: web.Request) -> bool:
    try:
        return ipaddress.ip_address((request.remote or "").split("%")[0]).is_loopback
    except ValueError:
        return request.remote == "" or (request.remote or "").startswith("/")  # unix socket


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.body_exists:
        return {}
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"body is not JSON: {exc}"}),
                                 content_type="application/json") from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text=json.dumps({"error": "body must be a JSON object"}),
                                 content_type="application/json")
    return data


def sla_routes(guard: SlaGuard) -> list[web.RouteDef]:
    """Routes serving the guard's view and accepting rollout commands from loopback."""

    async def summary(_: web.Request) -> web.Response:
        guard.tick()
        return json_response(guard.summary())

    async def sla(_: web.Request) -> web.Response:
        guard.tick()
        return json_response(guard.snapshot())

    async def rollout_status(_: web.Request) -> web.Response:
        return json_response(guard.rollout.status())

    def local_only(request: web.Request) -> None:
        if not _from_loopback(request):
            raise web.HTTPForbidden(text=json.dumps({"error": "rollout changes are accepted from loopback only"}),
                                    content_type="application/json")

    async def rollout_set(request: web.Request) -> web.Response:
        local_only(request)
        body = await _body(request)
        by = str(body.get("by", "operator"))
        try:
            if "enable_v3" in body:
                if not isinstance(body["enable_v3"], bool):
                    raise RolloutError("enable_v3 must be true or false")
                guard.rollout.set_enable_v3(body["enable_v3"], by=by)
            if "percentage" in body:
                value = body["percentage"]
                if isinstance(value, bool) or not isinstance(value, int):
                    raise RolloutError("percentage must be an integer 0..100")
                guard.rollout.set_percentage(value, by=by)
        except RolloutError as exc:
            return json_response({"error": str(exc), **guard.rollout.status()}, status=409)
        return json_response(guard.rollout.status())

    async def rollout_rollback(request: web.Request) -> web.Response:
        local_only(request)
        body = await _body(request)
        guard.rollout.rollback("manual", by=str(body.get("by", "operator")), detail=str(body.get("reason", "")))
        return json_response(guard.rollout.status())

    async def rollout_unfreeze(request: web.Request) -> web.Response:
        local_only(request)
        body = await _body(request)
        guard.rollout.unfreeze(by=str(body.get("by", "operator")))
        return json_response(guard.rollout.status())

    return [
        web.get("/metrics/summary", summary),
        web.get("/api/v3/sla", sla),
        web.get("/api/v3/rollout", rollout_status),
        web.post("/api/v3/rollout", rollout_set),
        web.post("/api/v3/rollout/rollback", rollout_rollback),
        web.post("/api/v3/rollout/unfreeze", rollout_unfreeze),
    ]
