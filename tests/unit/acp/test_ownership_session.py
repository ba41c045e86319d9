"""A migration's ownership session against a real single-node ConsensusService on its own event
loop, called from this (non-loop) thread as MigrationManager calls it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from dwcp_agent.acp.runtime import ownership
from dwcp_agent.acp.runtime.ownership import OwnedElsewhere, OwnershipError, RegistryOwnership
from dwcp_agent.acp.runtime.service import ConsensusService
from dwcp_agent.config import load_config
from dwcp_agent.telemetry.metrics import Metrics

T = TypeVar("T")


class Cluster:
    def __init__(self, loop: asyncio.AbstractEventLoop, service: ConsensusService) -> None:
        self.loop = loop
        self.service = service
        self.registry = RegistryOwnership(service, "solo", loop, timeout_s=10.0)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10.0)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="acp-loop", daemon=True)
    thread.start()
    config = load_config(environ={}, overrides={"node_id": "solo", "acp_port": 0})
    service = ConsensusService(config, Metrics(), tmp_path, tick_s=0.01, fsync=False)
    cluster = Cluster(loop, service)
    cluster.run(service.start())
    try:
        yield cluster
    finally:
        cluster.run(service.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5.0)
        loop.close()


def test_complete_moves_ownership_and_closes_the_session(cluster: Cluster) -> None:
    session = cluster.registry.begin("vm-1")  # unowned: claimed here first
    assert cluster.run(cluster.service.owner("vm-1")) == "solo"
    session.complete("dst")
    assert cluster.run(cluster.service.owner("vm-1")) == "dst"
    session.abandon()  # closed: nothing left to give back
    with pytest.raises(OwnershipError, match="already closed"):
        session.complete("elsewhere")
    assert cluster.run(cluster.service.owner("vm-1")) == "dst"
    with pytest.raises(OwnershipError, match="owned by dst"):
        cluster.registry.begin("vm-1")


def test_abandon_gives_the_lease_back_and_keeps_the_owner(cluster: Cluster) -> None:
    session = cluster.registry.begin("vm-1")
    session.abandon()
    assert cluster.run(cluster.service.owner("vm-1")) == "solo"
    # the hour-long lease is gone: another holder gets one at once
    assert cluster.run(cluster.service.acquire_lease("vm-1", "other", 30)).holder == "other"


def test_refused_complete_leaves_the_source_the_owner(cluster: Cluster,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ownership, "LEASE_TTL_S", 0.05)  # the lease runs out during the "transfer"
    session = cluster.registry.begin("vm-1")
    cluster.run(asyncio.sleep(0.2))
    with pytest.raises(OwnershipError, match="lease expired"):
        session.complete("dst")
    session.abandon()  # closed by the refused complete (which gave the lease back): a no-op
    assert cluster.run(cluster.service.owner("vm-1")) == "solo"
    monkeypatch.setattr(ownership, "LEASE_TTL_S", 3600.0)
    again = cluster.registry.begin("vm-1")
    assert again.token == session.token + 1
    again.complete("dst")
    assert cluster.run(cluster.service.owner("vm-1")) == "dst"


def test_begin_refuses_a_vm_owned_elsewhere(cluster: Cluster) -> None:
    cluster.run(cluster.service.claim("vm-9", "host-b"))
    with pytest.raises(OwnedElsewhere, match="owned by host-b"):
        cluster.registry.begin("vm-9")
    assert cluster.run(cluster.service.owner("vm-9")) == "host-b"
