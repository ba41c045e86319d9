"""In-memory ACP replicas wired by hand: enough to drive membership and identity checks."""

from __future__ import annotations

import random

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dwcp_agent.acp.adaptive import Replica, ReplicaOptions, bootstrap
from dwcp_agent.acp.auth import KeyRing
from dwcp_agent.acp.messages import Envelope
from dwcp_agent.acp.raft.raft import RaftOptions
from dwcp_agent.acp.storage import Recovered

OPTIONS = ReplicaOptions(raft=RaftOptions(election_ticks=5, heartbeat_ticks=1))


def ring(node: str) -> KeyRing:
    return KeyRing(node, Ed25519PrivateKey.generate())


def replica(node: str, members: dict[str, str], keys: KeyRing, protocol: str = "raft") -> Replica:
    return Replica(node, Recovered(bootstrap(protocol, members)), keys=keys, rng=random.Random(node),
                   options=OPTIONS)


def pump(replicas: dict[str, Replica], ticks: int) -> list[Envelope]:
    """Tick every replica and deliver what it sends to the others; returns undeliverable envelopes."""
    lost: list[Envelope] = []
    for _ in range(ticks):
        for r in replicas.values():
            r.tick()
        for _round in range(4):
            out: list[Envelope] = []
            for r in replicas.values():
                while r.has_ready():
                    out.extend(r.ready().messages)
            for env in out:
                target = replicas.get(env.to)
                if target is None:
                    lost.append(env)
                else:
                    target.receive(env)
    return lost
