"""PBFT restart rules and fail-stop: the speak bound survives in the WAL, a restarted replica is
silent at or below it and speaks above it, a WAL that cannot persist stops consensus on the node,
and the Byzantine test hook is refused unless unlocked."""

from __future__ import annotations

import asyncio
import errno
import random
from pathlib import Path

import pytest

from dwcp_agent.acp.adaptive import Replica, ReplicaOptions, bootstrap
from dwcp_agent.acp.auth import KeyRing
from dwcp_agent.acp.byzantine import ByzantineDetector
from dwcp_agent.acp.messages import Envelope, Prepare, PrePrepare, Request, decode_pbft
from dwcp_agent.acp.pbft.byzantine_faults import HOOK_ENV, HOOK_UNLOCK, UNLOCK_VALUE, FaultyReplica, from_environment
from dwcp_agent.acp.pbft.certs import batch_digest, pp_header
from dwcp_agent.acp.pbft.pbft import Pbft
from dwcp_agent.acp.registry import ClaimVm
from dwcp_agent.acp.runtime.node import ConsensusNode, ConsensusTimeout
from dwcp_agent.acp.runtime.wal import FileWAL
from dwcp_agent.acp.storage import MemoryStorage, PersistOps
from dwcp_agent.telemetry.metrics import Metrics

IDS = ["n1", "n2", "n3", "n4"]


def test_wal_keeps_the_speak_bound_across_records_and_rewrites(tmp_path: Path) -> None:
    wal = FileWAL(tmp_path, fsync=False)
    wal.save(PersistOps(epoch_start=bootstrap("pbft", {i: "127.0.0.1:1" for i in IDS})))
    wal.save(PersistOps(spoke=(2, 40)))
    assert FileWAL(tmp_path).load().spoke == (2, 40)  # type: ignore[union-attr]
    wal.save(PersistOps(view=3, spoke=(3, 9)))
    rec = FileWAL(tmp_path).load()
    assert rec is not None and rec.spoke == (3, 9) and rec.view == 3


def _backup(spoke: tuple[int, int] | None) -> tuple[Pbft, dict[str, KeyRing]]:
    keys = KeyRing.simulated(IDS, random.Random(1), fast=True)
    return Pbft("n2", IDS, keys=keys["n2"], detector=ByzantineDetector("n2"), spoke=spoke), keys


def _pre_prepare(keys: dict[str, KeyRing], seq: int) -> PrePrepare:
    digest = batch_digest([])
    return PrePrepare(0, seq, digest, [], keys["n1"].sign(pp_header(0, seq, digest)))


def _prepares_sent(pbft: Pbft) -> list[int]:
    return sorted({m.seq for _, wire in pbft.ready().messages
                   if isinstance(m := decode_pbft(wire.body), Prepare)})


def test_restarted_replica_is_silent_up_to_its_speak_bound_and_speaks_above() -> None:
    fresh, keys = _backup(None)
    fresh.step("n1", _pre_prepare(keys, 1))
    assert _prepares_sent(fresh) == [1]  # a new replica has no bound: no start-up silence
    assert fresh.spoke_dirty and fresh.spoke[0] == 0 and fresh.spoke[1] >= 1

    restarted, keys = _backup((0, 5))
    for seq in (3, 5, 6):
        restarted.step("n1", _pre_prepare(keys, seq))
    assert _prepares_sent(restarted) == [6]  # 3 and 5 may contradict what it forgot; 6 is new


def test_replica_behind_joins_the_view_that_f_plus_1_others_show() -> None:
    pbft, keys = _backup(None)
    for sender in ("n3", "n4"):  # f+1 = 2 replicas prepare in view 2
        prep = Prepare(2, 1, b"d" * 32, sender, keys["n3"].sign(pp_header(2, 1, b"d" * 32)))
        prep.sig = keys[sender].sign(b"irrelevant")
        pbft.step(sender, prep)
    assert pbft.view == 2 and not pbft.active  # it asks for view 2 with a view change


class _BrokenDisk(MemoryStorage):
    def __init__(self) -> None:
        super().__init__()
        self.broken = False

    def save(self, ops: PersistOps) -> None:
        if self.broken:
            raise OSError(errno.ENOSPC, "No space left on device")
        super().save(ops)


def test_node_stops_consensus_when_the_wal_cannot_persist() -> None:
    async def scenario() -> None:
        storage = _BrokenDisk()
        storage.save(PersistOps(epoch_start=bootstrap("raft", {"solo": "127.0.0.1:1"})))
        rec = storage.load()
        assert rec is not None
        keys = KeyRing.simulated(["solo"], random.Random(2), fast=True)["solo"]
        replica = Replica("solo", rec, keys=keys, rng=random.Random(3), options=ReplicaOptions())
        metrics = Metrics()
        node = ConsensusNode(replica, storage, metrics, lambda env: None, tick_s=0.01)
        await node.start()
        assert (await node.submit(ClaimVm("vm-1", "h1"))).ok
        storage.broken = True
        with pytest.raises(ConsensusTimeout, match="storage failed"):
            await node.submit(ClaimVm("vm-2", "h1"), timeout=2.0)
        assert not node.running and "No space left" in node.failed
        assert metrics.errors.labels("acp", "storage")._value.get() == 1
        with pytest.raises(ConsensusTimeout):
            await node.submit(ClaimVm("vm-3", "h1"))
        await node.stop()

    asyncio.run(scenario())


def test_byzantine_hook_needs_the_unlock_and_a_known_behaviour() -> None:
    keys = KeyRing.simulated(IDS, random.Random(4), fast=True)["n1"]
    assert from_environment("n1", keys, IDS, {}) is None
    with pytest.raises(ValueError, match="refused outside tests"):
        from_environment("n1", keys, IDS, {HOOK_ENV: "equivocate"})
    faulty = from_environment("n1", keys, IDS, {HOOK_ENV: "equivocate", HOOK_UNLOCK: UNLOCK_VALUE})
    assert isinstance(faulty, FaultyReplica)
    with pytest.raises(ValueError, match="unknown Byzantine behaviour"):
        FaultyReplica("n1", "lie-creatively", keys, IDS)


def test_byzantine_hook_can_take_its_behaviour_from_a_file(tmp_path: Path) -> None:
    keys = KeyRing.simulated(IDS, random.Random(5), fast=True)
    faulty = from_environment("n1", keys["n1"], IDS, {HOOK_ENV: f"@{tmp_path / 'lie'}", HOOK_UNLOCK: UNLOCK_VALUE})
    assert faulty is not None and faulty.behaviour == ""
    pbft = Pbft("n1", IDS, keys=keys["n1"], detector=ByzantineDetector("n1"))
    pbft.submit(Request("n1/0/0", 1, b"op"))
    envs = [Envelope(0, "n1", to, wire) for to, wire in pbft.ready().messages]
    assert [faulty.out(e) for e in envs] == [[e] for e in envs]  # honest while the file is absent
    (tmp_path / "lie").write_text("silent")
    faulty._read_at = -1.0  # skip the 0.2 s re-read interval
    assert all(faulty.out(e) == [] for e in envs)
