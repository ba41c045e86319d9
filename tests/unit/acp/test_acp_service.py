"""ConsensusService in single-node mode, through its admin routes (real aiohttp server, real WAL)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from dwcp_agent.acp.runtime.api import build_routes
from dwcp_agent.acp.runtime.service import ConsensusError, ConsensusService, RolloutSetting
from dwcp_agent.config import load_config
from dwcp_agent.telemetry.metrics import Metrics


def _service(tmp_path: Path, **overrides: Any) -> ConsensusService:
    config = load_config(environ={}, overrides={"node_id": "solo", "acp_port": 0, **overrides})
    return ConsensusService(config, Metrics(), tmp_path, tick_s=0.01, fsync=False)


def test_single_node_leases_fence_stale_tokens_and_survive_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        svc = _service(tmp_path)
        await svc.start()
        assert await svc.claim("vm-1", "host-a") == "host-a"
        lease = await svc.acquire_lease("vm-1", "host-b", ttl_s=30)
        assert lease.token == 1
        with pytest.raises(ConsensusError):
            await svc.acquire_lease("vm-1", "host-c", ttl_s=30)
        with pytest.raises(ConsensusError, match="stale token"):
            await svc.transfer_ownership("vm-1", "host-a", "host-b", lease.token + 1)
        assert await svc.transfer_ownership("vm-1", "host-a", "host-b", lease.token) == "host-b"
        assert (await svc.set_rollout(percentage=25)).percentage == 25
        assert svc.health()["status"] == "ok"
        await svc.stop()

        again = _service(tmp_path)
        await again.start()
        assert await again.owner("vm-1") == "host-b"
        assert (await again.rollout()).percentage == 25
        assert (await again.acquire_lease("vm-1", "host-c", ttl_s=30)).token == 2
        await again.stop()

    asyncio.run(scenario())


def test_admin_routes_answer_owner_rollout_and_refusals(tmp_path: Path) -> None:
    async def scenario() -> None:
        svc = _service(tmp_path)
        await svc.start()
        app = web.Application()
        app.add_routes(build_routes(svc))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        base = f"http://127.0.0.1:{port}/api/v3"
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/vms/vm-9/claim", json={"host": "h1"}) as r:
                assert r.status == 200
            async with http.get(f"{base}/vms/vm-9/owner") as r:
                assert (await r.json()) == {"vm_id": "vm-9", "owner": "h1"}
            async with http.post(f"{base}/vms/vm-9/transfer",
                                 json={"from_host": "h1", "to_host": "h2", "fencing_token": 7}) as r:
                assert r.status == 409 and (await r.json())["error"] == "stale token"
            async with http.put(f"{base}/cluster/rollout", json={"percentage": 10, "frozen": True}) as r:
                assert r.status == 405  # changes go through the rollout controller's checks only
            assert (await svc.set_rollout(10, True)) == RolloutSetting(10, True, True)
            async with http.get(f"{base}/cluster/rollout") as r:
                assert (await r.json()) == {"percentage": 10, "frozen": True, "enable_v3": True}
            async with http.get(f"{base}/cluster") as r:
                body = await r.json()
                assert body["status"] == "ok" and body["protocol"] == "raft" and body["leader"] == "solo"
            with pytest.raises(ConsensusError):
                await svc.set_rollout(170)
        await runner.cleanup()
        await svc.stop()

    asyncio.run(scenario())


def test_byzantine_detection_is_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> Metrics:
        svc = _service(tmp_path)
        await svc.start()
        svc._on_refused("10.0.0.9", "invalid_mac")  # a handshake failure: counted, never blamed on a name
        assert svc.node is not None
        svc.node.replica.detector.report("mallory", "invalid_mac", "pbft frame")
        svc.node._process()
        await svc.stop()
        return svc.metrics

    with caplog.at_level(logging.WARNING, logger="dwcp_agent.acp"):
        metrics = asyncio.run(scenario())
    sample = metrics.registry.get_sample_value("dwcp_v3_acp_byzantine_detections_total", {"reason": "invalid_mac"})
    assert sample == 1
    assert metrics.registry.get_sample_value("dwcp_v3_acp_refused_connections_total", {"reason": "invalid_mac"}) == 1
    record = next(r for r in caplog.records if getattr(r, "byzantine_detected", False))
    assert record.peer_id == "mallory"  # type: ignore[attr-defined]
