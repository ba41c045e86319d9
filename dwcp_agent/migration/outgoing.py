"""Where an outgoing migration may go: a cluster member's host, or a configured HOST:PORT pattern.

Without this, `to` is any host:port and the agent can be pointed at arbitrary services. Patterns
(config key migration_targets) are `host:port` with `*` allowed in either part; hosts compare
case-insensitively and literally (IPv6 in brackets: `[::1]:*`).
"""

from __future__ import annotations

import fnmatch
from typing import Any


def _split(host_port: str) -> tuple[str, str]:
    host, _, port = host_port.rpartition(":")
    return host.strip("[]").lower(), port


def member_hosts(acp_peers: list[str]) -> set[str]:
    """Hosts of the cluster members named in acp_peers (id=host:port)."""
    hosts = set()
    for item in acp_peers:
        _, sep, address = item.partition("=")
        if sep:
            hosts.add(_split(address)[0])
    return hosts


def target_allowed(host: str, port: int, config: Any) -> bool:
    """Whether `host:port` is a cluster member's host or matches a migration_targets pattern."""
    host = host.strip("[]").lower()
    if host in member_hosts(config.acp_peers):
        return True
    for pattern in config.migration_targets:
        want_host, want_port = _split(pattern)
        if not want_host or not want_port:
            continue
        host_ok = want_host == host or ("*" in want_host and fnmatch.fnmatchcase(host, want_host))
        if host_ok and (want_port == "*" or want_port == str(port)):
            return True
    return False
