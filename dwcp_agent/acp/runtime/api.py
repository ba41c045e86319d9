"""Admin HTTP routes of ACP (mounted by the agent's admin server under /api/v3).

Refusals by the registry (stale fencing token, lease held elsewhere) answer 409 with the reason;
an unknown outcome (no quorum before the deadline) answers 503 — the command may still commit, once.
The rollout is read here but changed only through `POST /api/v3/rollout` (the rollout controller),
so the frozen check and the audit trail cannot be skipped.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from dwcp_agent.acp.runtime.node import ConsensusTimeout
from dwcp_agent.acp.runtime.service import ConsensusError, ConsensusService
from dwcp_agent.http_json import json_response

__all__ = ["build_routes"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _guard(fn: Callable[[web.Request], Awaitable[Any]]) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            return json_response(await fn(request))
        except ConsensusError as exc:
            return json_response({"error": exc.result.error, "value": exc.result.value}, 409)
        except ConsensusTimeout as exc:
            return json_response({"error": str(exc)}, 503)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            return json_response({"error": f"bad request: {exc}"}, 400)
    return handler


async def _body(request: web.Request) -> dict[str, Any]:
    data = await request.json() if request.body_exists else {}
    if not isinstance(data, dict):
        raise ValueError("body must be a JSON object")
    return data


def build_routes(svc: ConsensusService) -> list[web.RouteDef]:
    """Routes bound to one service."""

    async def cluster(_r: web.Request) -> Any:
        return svc.health()

    async def members(_r: web.Request) -> Any:
        health = svc.health()
        return {"members": svc.members(), "leader": health.get("leader", ""), "protocol": health.get("protocol")}

    async def join(r: web.Request) -> Any:
        body = await _body(r)
        voter = await svc.join(str(body["node_id"]), str(body["addr"]), bytes.fromhex(str(body.get("public_key", ""))))
        return {"members": svc.members(), "node_id": body["node_id"], "role": "voter" if voter else "learner"}

    async def leave(r: web.Request) -> Any:
        body = await _body(r)
        await svc.leave(str(body["node_id"]))
        return {"members": svc.members()}

    async def protocol(r: web.Request) -> Any:
        body = await _body(r)
        return await svc.switch_protocol(str(body["target"]), bool(body.get("forced", False)))

    async def reinstate(r: web.Request) -> Any:
        body = await _body(r)
        await svc.reinstate(str(body["peer"]))
        return {"reinstated": body["peer"]}

    async def owner(r: web.Request) -> Any:
        vm_id = r.match_info["vm_id"]
        return {"vm_id": vm_id, "owner": await svc.owner(vm_id)}

    async def claim(r: web.Request) -> Any:
        vm_id = r.match_info["vm_id"]
        body = await _body(r)
        return {"vm_id": vm_id, "owner": await svc.claim(vm_id, str(body["host"]))}

    async def lease(r: web.Request) -> Any:
        body = await _body(r)
        return await svc.acquire_lease(r.match_info["vm_id"], str(body["holder"]), float(body.get("ttl_s", 30)))

    async def transfer(r: web.Request) -> Any:
        vm_id = r.match_info["vm_id"]
        body = await _body(r)
        new = await svc.transfer_ownership(vm_id, str(body["from_host"]), str(body["to_host"]),
                                           int(body["fencing_token"]))
        return {"vm_id": vm_id, "owner": new}

    async def get_rollout(_r: web.Request) -> Any:
        return await svc.rollout()

    return [
        web.get("/api/v3/cluster", _guard(cluster)),
        web.get("/api/v3/cluster/members", _guard(members)),
        web.post("/api/v3/cluster/join", _guard(join)),
        web.post("/api/v3/cluster/leave", _guard(leave)),
        web.post("/api/v3/cluster/protocol", _guard(protocol)),
        web.post("/api/v3/cluster/reinstate", _guard(reinstate)),
        web.get("/api/v3/vms/{vm_id}/owner", _guard(owner)),
        web.post("/api/v3/vms/{vm_id}/claim", _guard(claim)),
        web.post("/api/v3/vms/{vm_id}/lease", _guard(lease)),
        web.post("/api/v3/vms/{vm_id}/transfer", _guard(transfer)),
        web.get("/api/v3/cluster/rollout", _guard(get_rollout)),
    ]
