"""Real ACP clusters for tests: `dwcp-agent serve` processes on loopback with pinned member keys.

Shared by the process, Byzantine and alert tests. `acp_clusters(root)` yields a `start(n, protocol)`
that launches n agents (a1..an) with fresh ports, a cluster key and each other's signing keys,
and waits until every one is ready; on exit every agent started is resumed (if a test paused it)
and stopped. With `byzantine_hook` each agent reads its test-only behaviour from `<state>/lie`
(absent or empty = honest), so a test can make whichever replica became primary lie.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from dwcp_agent.acp.auth import public_key_hex
from dwcp_agent.acp.pbft.byzantine_faults import HOOK_ENV, HOOK_UNLOCK, UNLOCK_VALUE
from dwcp_agent.demo import LocalAgent, free_port

# Generous: n Python agents importing at once on a busy 2-core CI box can take well over 30 s.
READY_S = 120.0


class StartCluster(Protocol):
    def __call__(self, n: int, protocol: str, *, byzantine_hook: bool = False,
                 **settings: Any) -> list[LocalAgent]: ...


@contextlib.contextmanager
def acp_clusters(root: Path) -> Iterator[StartCluster]:
    """Start ACP clusters under `root` (one cluster key for all); every agent is stopped on exit."""
    psk = root / "psk"
    psk.write_text(secrets.token_hex(32))
    started: list[LocalAgent] = []

    def start(n: int, protocol: str, *, byzantine_hook: bool = False, **settings: Any) -> list[LocalAgent]:
        ports = [free_port() for _ in range(n)]
        names = [f"a{i + 1}" for i in range(n)]
        peers = ",".join(f"{name}=127.0.0.1:{port}" for name, port in zip(names, ports, strict=True))
        keys = ",".join(f"{name}={public_key_hex(root / name)}" for name in names)
        for name, port in zip(names, ports, strict=True):
            env = {HOOK_ENV: f"@{root / name / 'lie'}", HOOK_UNLOCK: UNLOCK_VALUE} if byzantine_hook else None
            started.append(LocalAgent(name, root, psk, env, {"acp_port": port, "acp_peers": peers,
                                                             "acp_peer_keys": keys, "acp_protocol": protocol,
                                                             **settings}))
        agents = started[-n:]
        for agent in agents:
            agent.wait_ready(timeout=READY_S)
        return agents

    try:
        yield start
    finally:
        for agent in started:
            if agent.proc is not None and agent.proc.poll() is None:
                os.kill(agent.proc.pid, signal.SIGCONT)
            agent.stop(timeout=5)
