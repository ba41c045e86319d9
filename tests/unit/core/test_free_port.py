"""Ports for local agents come from below the ephemeral range, so no outgoing connection can take
one between the choice and the agent's bind."""

from __future__ import annotations

import socket
from pathlib import Path

from dwcp_agent.demo import free_port


def test_ports_are_bindable_distinct_and_outside_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(10_000 <= p < low for p in ports)
    for port in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
