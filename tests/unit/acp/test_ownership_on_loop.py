"""The ownership session called from the event loop itself, as a live migration calls it: the
same decisions as from a thread (test_ownership_session.py), each one bounded await."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from dwcp_agent.acp.runtime import ownership
from dwcp_agent.acp.runtime.ownership import OwnedElsewhere, OwnershipError, RegistryOwnership
from dwcp_agent.acp.runtime.service import ConsensusService
from dwcp_agent.config import load_config
from dwcp_agent.telemetry.metrics import Metrics


async def _with_registry(tmp_path: Path, body: Callable[[ConsensusService, RegistryOwnership], Awaitable[None]]
                         ) -> None:
    config = load_config(environ={}, overrides={"node_id": "solo", "acp_port": 0})
    service = ConsensusService(config, Metrics(), tmp_path, tick_s=0.01, fsync=False)
    await service.start()
    try:
        await body(service, RegistryOwnership(service, "solo", asyncio.get_running_loop(), timeout_s=10.0))
    finally:
        await service.stop()


def test_complete_on_loop_moves_ownership_once(tmp_path: Path) -> None:
    async def body(service: ConsensusService, registry: RegistryOwnership) -> None:
        session = await registry.begin_on_loop("vm-1")  # unowned: claimed here first
        assert await service.owner("vm-1") == "solo"
        await session.complete_on_loop("dst")
        assert await service.owner("vm-1") == "dst"
        await session.abandon_on_loop()  # closed: nothing to give back, the owner stays
        with pytest.raises(OwnershipError, match="already closed"):
            await session.complete_on_loop("elsewhere")
        assert await service.owner("vm-1") == "dst"
        with pytest.raises(OwnedElsewhere, match="owned by dst"):
            await registry.begin_on_loop("vm-1")
    asyncio.run(_with_registry(tmp_path, body))


def test_abandon_on_loop_gives_the_lease_back(tmp_path: Path) -> None:
    async def body(service: ConsensusService, registry: RegistryOwnership) -> None:
        session = await registry.begin_on_loop("vm-1")
        await session.abandon_on_loop()
        assert await service.owner("vm-1") == "solo"
        assert (await service.acquire_lease("vm-1", "other", 30)).holder == "other"
    asyncio.run(_with_registry(tmp_path, body))


def test_refused_complete_on_loop_leaves_the_source_the_owner(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(service: ConsensusService, registry: RegistryOwnership) -> None:
        monkeypatch.setattr(ownership, "LEASE_TTL_S", 0.05)  # the lease runs out before the commit
        session = await registry.begin_on_loop("vm-1")
        await asyncio.sleep(0.2)
        with pytest.raises(OwnershipError, match="lease expired"):
            await session.complete_on_loop("dst")
        assert await service.owner("vm-1") == "solo"
        monkeypatch.setattr(ownership, "LEASE_TTL_S", 3600.0)
        again = await registry.begin_on_loop("vm-1")  # the refused commit gave the lease back
        assert again.token == session.token + 1
    asyncio.run(_with_registry(tmp_path, body))


async def _never() -> None:
    await asyncio.Event().wait()


def test_a_registry_that_does_not_answer_is_an_ownership_error_in_bounded_time(tmp_path: Path) -> None:
    async def body(service: ConsensusService, registry: RegistryOwnership) -> None:
        registry.timeout_s = 0.05
        with pytest.raises(OwnershipError, match="TimeoutError"):
            await registry.settle(_never())
    asyncio.run(_with_registry(tmp_path, body))


