"""Normal-case costs that must not cost safety: WAL writes on a thread of their own hold every
message and answer until durable and group what queues meanwhile into one sync; the PBFT primary
leaves its own clients' requests unsigned (its pre-prepare header vouches for them), and no other
primary ever orders such a copy."""

from __future__ import annotations

import asyncio
import errno
import random
import threading
from pathlib import Path

import pytest

from dwcp_agent.acp.adaptive import Replica, ReplicaOptions, bootstrap
from dwcp_agent.acp.auth import KeyRing
from dwcp_agent.acp.byzantine import ByzantineDetector
from dwcp_agent.acp.messages import Entry, HardState, PrePrepare, Request, RequestFwd, decode_pbft, encode
from dwcp_agent.acp.pbft.pbft import Pbft, PbftOptions
from dwcp_agent.acp.registry import ClaimVm
from dwcp_agent.acp.runtime import wal as wal_module
from dwcp_agent.acp.runtime.node import ConsensusNode, ConsensusTimeout
from dwcp_agent.acp.runtime.wal import FileWAL
from dwcp_agent.acp.storage import MemoryStorage, PersistOps
from dwcp_agent.telemetry.metrics import Metrics

IDS = ["n1", "n2", "n3", "n4"]


class _GatedDisk(MemoryStorage):
    """A disk whose writes block while the gate is closed, and that records each group written."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.groups: list[int] = []
        self.broken = False

    def save_group(self, group: list[PersistOps]) -> None:
        if not self.gate.wait(30):
            raise OSError(errno.EIO, "gate never opened")
        if self.broken:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.groups.append(len(group))
        super().save_group(group)


def _solo_node(storage: _GatedDisk, metrics: Metrics) -> ConsensusNode:
    storage.save(PersistOps(epoch_start=bootstrap("raft", {"solo": "127.0.0.1:1"})))
    rec = storage.load()
    assert rec is not None
    keys = KeyRing.simulated(["solo"], random.Random(2), fast=True)["solo"]
    replica = Replica("solo", rec, keys=keys, rng=random.Random(3), options=ReplicaOptions())
    return ConsensusNode(replica, storage, metrics, lambda env: None, tick_s=0.01, background_writes=True)


def test_background_writes_hold_answers_until_durable_and_group_what_queues_meanwhile() -> None:
    async def scenario() -> None:
        storage = _GatedDisk()
        node = _solo_node(storage, Metrics())
        await node.start()
        assert (await asyncio.wait_for(node.submit(ClaimVm("vm-0", "h")), 10)).ok  # leader elected
        storage.gate.clear()
        first = asyncio.ensure_future(node.submit(ClaimVm("vm-1", "h")))
        while node._write is None:  # the write of vm-1's entry is on the (blocked) writer thread
            await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(node.submit(ClaimVm(f"vm-{i}", "h"))) for i in range(2, 6)]
        await asyncio.sleep(0.3)
        assert not first.done() and not any(t.done() for t in rest)  # nothing answered before durable
        groups_before = len(storage.groups)
        storage.gate.set()
        results = await asyncio.wait_for(asyncio.gather(first, *rest), 10)
        assert all(r.ok for r in results)
        # vm-2..vm-5 were stepped while vm-1's write was blocked: they went down together.
        assert max(storage.groups[groups_before:]) >= 2
        rec = storage.load()
        assert rec is not None
        indexes = [e.index for e in rec.entries]
        assert indexes == sorted(indexes) and len(set(indexes)) == len(indexes)
        await node.stop()

    asyncio.run(scenario())


def test_background_write_failure_stops_consensus_and_answers_nobody() -> None:
    async def scenario() -> None:
        storage = _GatedDisk()
        metrics = Metrics()
        node = _solo_node(storage, metrics)
        await node.start()
        assert (await asyncio.wait_for(node.submit(ClaimVm("vm-1", "h")), 10)).ok
        storage.broken = True
        with pytest.raises(ConsensusTimeout, match="storage failed"):
            await node.submit(ClaimVm("vm-2", "h"), timeout=5.0)
        assert not node.running and "No space left" in node.failed
        assert metrics.errors.labels("acp", "storage")._value.get() == 1
        assert not node._held  # what waited for the failed write never leaves
        await node.stop()

    asyncio.run(scenario())


def test_wal_group_is_one_sync_and_replays_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    syncs: list[int] = []
    real = wal_module._fsync
    monkeypatch.setattr(wal_module, "_fsync", lambda fd, data_only=False: (syncs.append(fd), real(fd, data_only)))
    wal = FileWAL(tmp_path / "wal")
    wal.save(PersistOps(epoch_start=bootstrap("raft", {"a": "127.0.0.1:1"})))
    syncs.clear()
    wal.save_group([PersistOps(hard_state=HardState(1, "a", 0), entries=[Entry(1, 1), Entry(1, 2)]),
                    PersistOps(entries=[Entry(2, 2, 0, b"new")]),
                    PersistOps(hard_state=HardState(2, "a", 2), entries=[Entry(2, 3)])])
    assert len(syncs) == 1
    wal.close()
    rec = FileWAL(tmp_path / "wal").load()
    assert rec is not None
    assert [(e.term, e.index, e.data) for e in rec.entries] == [(1, 1, b""), (2, 2, b"new"), (2, 3, b"")]
    assert rec.hard_state == HardState(2, "a", 2)


# ------------------------------------------------------------------ PBFT: unsigned own requests


def _cluster() -> tuple[dict[str, Pbft], dict[str, ByzantineDetector]]:
    keys = KeyRing.simulated(IDS, random.Random(7))
    dets = {i: ByzantineDetector(i) for i in IDS}
    opts = PbftOptions(checkpoint_interval=8, window=32, max_inflight=2, request_timeout=20,
                       view_change_timeout=20, retransmit_ticks=4)
    return {i: Pbft(i, IDS, keys=keys[i], detector=dets[i], options=opts) for i in IDS}, dets


def _run(nodes: dict[str, Pbft], down: frozenset[str] = frozenset(), rounds: int = 50) -> list[tuple[str, str, object]]:
    """Deliver every message (none to or from `down`) until the cluster is quiet; returns what was sent."""
    sent: list[tuple[str, str, object]] = []
    for _ in range(rounds):
        moved = False
        for sender, node in nodes.items():
            if sender in down:
                continue
            rd = node.ready()
            node.replies = []
            for seq, _batch in rd.committed:
                if seq % node.opts.checkpoint_interval == 0:
                    node.record_checkpoint(seq, b"image-%d" % seq)
            for to, wire in rd.messages:
                moved = True
                sent.append((sender, to, decode_pbft(wire.body)))
                if to not in down:
                    nodes[to].receive(sender, wire)
        if not moved:
            break
    return sent


def test_primary_orders_its_own_requests_unsigned_and_backups_accept_them() -> None:
    nodes, dets = _cluster()
    nodes["n1"].submit(Request("n1/0/0", 1, b"own"))
    sent = _run(nodes)
    pps = [m for _s, _t, m in sent if isinstance(m, PrePrepare)]
    assert pps and all(r.sig == b"" for pp in pps for r in pp.batch)  # no signature per request
    assert not any(isinstance(m, RequestFwd) for _s, _t, m in sent)
    assert all(node.last_exec == 1 for node in nodes.values())
    assert not any(det.scores for det in dets.values())


def test_forwarded_unsigned_request_is_reported() -> None:
    nodes, dets = _cluster()
    bare = nodes["n2"]._send_body  # n2 forwards one of its clients' requests without signing it
    bare("n1", encode(RequestFwd(Request("n2/0/0", 1, b"op"))))
    to, wire = nodes["n2"].ready().messages[0]
    nodes[to].receive("n2", wire)
    assert dets["n1"].scores.get("n2", 0) > 0
    assert not nodes["n1"].queue


def test_unsigned_request_of_a_dead_primary_does_not_stall_the_next_view() -> None:
    nodes, dets = _cluster()
    n1 = nodes["n1"]
    n1.submit(Request("n1/0/0", 2, b"own"))
    pp: object = None
    for to, wire in n1.ready().messages:  # n1's pre-prepare with the unsigned request reaches n3 only ...
        if to == "n3":
            nodes[to].receive("n1", wire)
            pp = decode_pbft(wire.body)
    assert isinstance(pp, PrePrepare) and pp.batch[0].sig == b""
    assert ("n1/0/0", 2) in nodes["n3"].waiting
    down = frozenset({"n1"})  # ... then n1 dies with its clients: nobody can sign that request again
    nodes["n4"].submit(Request("n4/0/0", 1, b"other"))
    for _ in range(400):  # the others' request times out everywhere: view 1, primary n2
        for i in IDS[1:]:
            nodes[i].tick()
        _run(nodes, down)
        if all(nodes[i].view >= 1 and nodes[i].active and nodes[i].last_exec >= 1 for i in IDS[1:]):
            break
    assert all(nodes[i].view == 1 and nodes[i].active and nodes[i].last_exec >= 1 for i in IDS[1:])
    assert ("n1/0/0", 2) not in nodes["n3"].waiting  # forgotten: no primary but n1 could order it
    for _ in range(300):  # long past the request timeout: n3 does not leave the view alone
        for i in IDS[1:]:
            nodes[i].tick()
        _run(nodes, down)
    assert all(nodes[i].view == 1 and nodes[i].active for i in IDS[1:])
    assert not any(det.scores.get("n1") for det in dets.values())
