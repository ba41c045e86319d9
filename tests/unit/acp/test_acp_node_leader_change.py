"""A client waiting at a follower when the Raft leader dies is served as soon as a new leader is
known, not at its next periodic retry (which was most of the first write's delay after a kill)."""

from __future__ import annotations

import asyncio
import random

from dwcp_agent.acp.adaptive import Replica, ReplicaOptions, bootstrap
from dwcp_agent.acp.auth import KeyRing
from dwcp_agent.acp.messages import Envelope
from dwcp_agent.acp.registry import ClaimVm
from dwcp_agent.acp.runtime.node import ConsensusNode
from dwcp_agent.acp.storage import MemoryStorage, PersistOps
from dwcp_agent.telemetry.metrics import Metrics

IDS = ["n1", "n2", "n3"]


def test_a_waiting_proposal_goes_to_the_new_leader_at_once() -> None:
    async def scenario() -> None:
        keys = KeyRing.simulated(IDS, random.Random(7), fast=True)
        nodes: dict[str, ConsensusNode] = {}
        dead: set[str] = set()
        loop = asyncio.get_running_loop()

        def send(env: Envelope) -> None:
            if env.frm not in dead and env.to not in dead and env.to in nodes:
                loop.call_soon(nodes[env.to].deliver, env)

        for i, node_id in enumerate(IDS):
            storage = MemoryStorage()
            storage.save(PersistOps(epoch_start=bootstrap("raft", {n: "127.0.0.1:1" for n in IDS})))
            rec = storage.load()
            assert rec is not None
            replica = Replica(node_id, rec, keys=keys[node_id], rng=random.Random(10 + i), options=ReplicaOptions())
            nodes[node_id] = ConsensusNode(replica, storage, Metrics(), send, tick_s=0.01)
        for node in nodes.values():
            await node.start()
        first = next(iter(nodes.values()))
        assert (await first.submit(ClaimVm("vm-0", "h1"), timeout=10.0)).ok
        leader = first.leader
        assert leader in nodes
        dead.add(leader)
        await nodes[leader].stop()
        follower = next(n for i, n in nodes.items() if i != leader)
        # Without the wake-up on a leader change this waits for the next retry, 30 s away: the
        # proposal went to the dead leader and is lost, and the 5 s deadline passes first.
        result = await follower.submit(ClaimVm("vm-1", "h1"), timeout=5.0, retry_s=30.0)
        assert result.ok and follower.leader not in ("", leader)
        for node_id, node in nodes.items():
            if node_id != leader:
                await node.stop()

    asyncio.run(scenario())
