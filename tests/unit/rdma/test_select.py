"""Transport selection and its reasons; locked-memory accounting and the advice it gives."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from softverbs import ACTIVE_PORT, SoftProvider

from dwcp_agent.amst.select import Transports, TransportUnavailable, pool_bytes
from dwcp_agent.amst.verbs import PortInfo, memlock_available
from dwcp_agent.config import load_config
from dwcp_agent.telemetry.metrics import Metrics

DOWN = PortInfo("mlx5_0", 1, False, "DOWN", "Ethernet")


def transports(provider: SoftProvider, **overrides: Any) -> Transports:
    config = load_config(environ={}, overrides={"psk": "x" * 32, **overrides})
    return Transports(config, Metrics(), provider)


def test_auto_with_an_active_port_and_enough_memlock_chooses_rdma() -> None:
    t = transports(SoftProvider())
    assert t.selection.transport == "rdma"
    assert ACTIVE_PORT.device in t.selection.reason
    assert t.capabilities() == ("rdma",)


@pytest.mark.parametrize(("provider", "reason"), [
    (SoftProvider(ports=()), "no RDMA device (ibv_devices lists none)"),
    (SoftProvider(ports=(DOWN,)), "no active RDMA port (mlx5_0 port 1 (Ethernet, DOWN, mtu 1024))"),
])
def test_auto_without_a_usable_port_chooses_tcp_and_says_why(provider: SoftProvider, reason: str) -> None:
    t = transports(provider)
    assert (t.selection.transport, t.selection.reason) == ("tcp", reason)
    assert t.capabilities() == ()
    with pytest.raises(TransportUnavailable, match="rdma_only"):
        transports(provider, transport_mode="rdma_only").require()


def test_memlock_below_the_pool_chooses_tcp_with_how_to_raise_it() -> None:
    t = transports(SoftProvider(memlock=8 << 20))
    assert t.selection.transport == "tcp"
    for hint in ("RLIMIT_MEMLOCK", "LimitMEMLOCK", "DaemonSet", "ulimit -l"):
        assert hint in t.selection.reason
    with pytest.raises(TransportUnavailable, match="ulimit -l"):
        transports(SoftProvider(memlock=8 << 20), transport_mode="rdma_only").require()
    assert pool_bytes(t.config) > 8 << 20


def test_tcp_mode_never_asks_the_provider() -> None:
    class Exploding(SoftProvider):
        def discover(self) -> Any:
            raise AssertionError("discovery with transport_mode=tcp")

    t = transports(Exploding(), transport_mode="tcp")
    assert (t.selection.transport, t.selection.reason) == ("tcp", "transport_mode=tcp")


def test_peer_without_rdma_means_tcp_in_auto_and_an_error_in_rdma_only() -> None:
    assert transports(SoftProvider()).for_peer((), "b").transport == "tcp"
    assert transports(SoftProvider()).for_peer(("rdma",), "b").transport == "rdma"
    with pytest.raises(TransportUnavailable, match="peer b does not offer RDMA"):
        transports(SoftProvider(), transport_mode="rdma_only").for_peer((), "b")


def test_publish_sets_transport_info_and_logs_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    t = transports(SoftProvider(ports=()))
    with caplog.at_level(logging.INFO, logger="dwcp_agent.amst"):
        t.publish()
    reg = t.metrics.registry
    assert reg.get_sample_value("dwcp_v3_transport_info", {"transport": "tcp"}) == 1
    assert reg.get_sample_value("dwcp_v3_transport_info", {"transport": "rdma"}) == 0
    assert "transport: tcp (no RDMA device (ibv_devices lists none))" in caplog.text


@pytest.mark.parametrize(("status", "limit", "expected"), [
    ("CapEff:\t0000000000004000\nVmLck:\t 0 kB\n", 8 << 20, None),  # CAP_IPC_LOCK: no limit applies
    ("CapEff:\t0000000000000000\nVmLck:\t 1024 kB\n", 8 << 20, 7 << 20),  # already locked pages count
    ("CapEff:\t0000000000000000\nVmLck:\t 9000 kB\n", 8 << 20, 0),
])
def test_memlock_available_follows_the_kernel_rules(status: str, limit: int, expected: int | None) -> None:
    assert memlock_available(status, limit) == expected
