"""Scripted scenarios for the ACP building blocks: Raft, registry, WAL, detector, checker, transport."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dwcp_agent.acp.adaptive import bootstrap
from dwcp_agent.acp.auth import KeyRing
from dwcp_agent.acp.byzantine import ByzantineDetector
from dwcp_agent.acp.messages import Entry, Envelope, EpochFetch, HardState, RaftMsg, Snapshot
from dwcp_agent.acp.raft.raft import NotLeader, Raft, RaftOptions, Role
from dwcp_agent.acp.registry import AcquireLease, ClaimVm, Command, Registry, SwitchProtocol, TransferOwnership
from dwcp_agent.acp.runtime.transport import Transport
from dwcp_agent.acp.runtime.wal import FileWAL
from dwcp_agent.acp.storage import PersistOps
from dwcp_agent.acp.testing.linearizability import UNKNOWN, Model, Operation, check

# ------------------------------------------------------------------ Raft, driven by hand


class _Net:
    """Three Raft peers; `deliver()` moves every queued message, persisting each Ready first."""

    def __init__(self) -> None:
        self.ids = ["a", "b", "c"]
        self.nodes = {i: Raft(i, self.ids, rng=random.Random(i), options=RaftOptions(election_ticks=5))
                      for i in self.ids}
        self.applied: dict[str, list[bytes]] = {i: [] for i in self.ids}
        self.down: set[str] = set()

    def deliver(self) -> None:
        moved = True
        while moved:
            moved = False
            for i, node in self.nodes.items():
                if i in self.down or not node.has_ready():
                    continue
                rd = node.ready()
                self.applied[i] += [e.data for e in rd.committed if e.data]
                node.advance(rd)
                for m in rd.messages:
                    if m.to not in self.down:
                        self.nodes[m.to].step(m)
                        moved = True

    def elect(self, who: str) -> None:
        for _ in range(20):
            self.nodes[who].tick()
        self.deliver()
        assert self.nodes[who].role is Role.LEADER


def test_raft_elects_replicates_and_commits_on_majority() -> None:
    net = _Net()
    net.elect("a")
    net.nodes["a"].propose(b"x")
    net.deliver()
    assert all(net.applied[i] == [b"x"] for i in net.ids)
    with pytest.raises(NotLeader) as err:
        net.nodes["b"].propose(b"y")
    assert err.value.leader == "a"


def test_raft_minority_leader_cannot_commit_and_yields_to_new_term() -> None:
    net = _Net()
    net.elect("a")
    net.down = {"b", "c"}
    net.nodes["a"].propose(b"lost")
    net.deliver()
    assert net.applied["a"] == []
    net.down = {"a"}
    for _ in range(30):  # b and c stop hearing from a; once the lease expires one of them wins
        for i in ("b", "c"):
            net.nodes[i].tick()
        net.deliver()
    new = next(i for i in ("b", "c") if net.nodes[i].role is Role.LEADER)
    net.nodes[new].propose(b"kept")
    net.deliver()
    net.down = set()
    for _ in range(3):
        net.nodes[new].tick()
        net.deliver()
    assert net.applied["a"] == net.applied[new] == [b"kept"]


def test_raft_prevote_keeps_a_partitioned_node_from_inflating_terms() -> None:
    net = _Net()
    net.elect("a")
    term = net.nodes["a"].term
    net.down = {"b", "c"}
    for _ in range(50):
        net.nodes["c"].tick()  # c alone: pre-votes fail, its term must not grow
    assert net.nodes["c"].term == term


def test_raft_restart_from_persisted_state_and_snapshot() -> None:
    snap = Snapshot(3, 1, ["a", "b", "c"], b"image")
    node = Raft("a", [], rng=random.Random(1), hard_state=HardState(2, "a", 4),
                snapshot=snap, entries=[Entry(2, 4, 0, b"d"), Entry(2, 5, 0, b"e")])
    assert node.voters == {"a", "b", "c"}
    assert node.log.committed == 4 and node.log.last_index() == 5
    assert node.log.term(3) == 1 and node.log.term(2) is None


def test_raft_rejects_append_with_mismatched_previous_entry() -> None:
    node = Raft("b", ["a", "b"], rng=random.Random(0))
    node.step(RaftMsg(1, "a", "b", 1, index=5, log_term=1, entries=[Entry(1, 6)]))
    reply = node.ready().messages[-1]
    assert reply.reject and reply.hint == 0


# ------------------------------------------------------------------ registry


def test_registry_fencing_tokens_grow_per_vm_and_stale_tokens_are_refused() -> None:
    reg = Registry()
    reg.apply(Command("c/1/0", 1, ClaimVm("vm", "h1")))
    first = reg.apply(Command("c/1/0", 2, AcquireLease("vm", "h2", 10), now_ms=0)).value
    second = reg.apply(Command("c/1/0", 3, AcquireLease("vm", "h3", 10), now_ms=50)).value
    assert (first["token"], second["token"]) == (1, 2)
    stale = reg.apply(Command("c/1/0", 4, TransferOwnership("vm", "h1", "h2", 1), now_ms=51))
    assert stale.error == "stale token"
    assert reg.apply(Command("c/1/0", 5, TransferOwnership("vm", "h1", "h3", 2), now_ms=51)).ok


def test_registry_applies_a_retried_command_once() -> None:
    reg = Registry()
    cmd = Command("c/1/0", 1, AcquireLease("vm", "h", 1000), now_ms=0)
    assert reg.apply(cmd) == reg.apply(cmd)
    assert reg.state.tokens["vm"] == 1


def test_registry_rate_limits_protocol_switches_unless_forced() -> None:
    reg = Registry()
    assert reg.apply(Command("c/1/0", 1, SwitchProtocol("pbft"), now_ms=1_000_000)).ok
    refused = reg.apply(Command("c/1/0", 2, SwitchProtocol("raft"), now_ms=1_060_000))
    assert refused.error == "switched less than 5 minutes ago"
    assert reg.apply(Command("c/1/0", 3, SwitchProtocol("raft", forced=True), now_ms=1_060_000)).ok
    assert reg.state.epoch == 2


# ------------------------------------------------------------------ WAL


def test_wal_replays_records_after_snapshot_and_cuts_a_torn_tail(tmp_path: Path) -> None:
    wal = FileWAL(tmp_path)
    wal.save(PersistOps(epoch_start=bootstrap("raft", {"a": "127.0.0.1:1"})))
    wal.save(PersistOps(hard_state=HardState(1, "a", 0), entries=[Entry(1, 1), Entry(1, 2)]))
    wal.save(PersistOps(entries=[Entry(2, 2, 0, b"new")]))
    wal.save(PersistOps(snapshot=Snapshot(1, 1, ["a"], b"img")))
    wal.save(PersistOps(hard_state=HardState(2, "a", 2)))
    wal.close()
    with open(tmp_path / "wal", "ab") as f:
        f.write(b"\x00\x00\x00\x40partial")
    rec = FileWAL(tmp_path).load()
    assert rec is not None
    assert rec.hard_state == HardState(2, "a", 2)
    assert rec.snapshot == Snapshot(1, 1, ["a"], b"img")
    assert rec.entries == [Entry(2, 2, 0, b"new")]
    assert (tmp_path / "wal").read_bytes().endswith(b"new") or b"partial" not in (tmp_path / "wal").read_bytes()


# ------------------------------------------------------------------ Byzantine detector


def test_detector_quarantines_on_evidence_only_decays_and_reinstates() -> None:
    det = ByzantineDetector("me", threshold=100, half_life_ticks=10)
    det.report("p", "replay")
    for _ in range(100):
        det.tick()
    assert det.scores.get("p", 0) < 1
    for _ in range(5):  # hearsay, however much of it, never quarantines
        assert not det.report("p", "equivocation").quarantined
    assert not det.is_quarantined("p") and det.suspected() == ["p"]
    event = det.report("p", "equivocation", evidence=(b"signed-a", b"signed-b"))
    assert event.quarantined and det.is_quarantined("p") and det.proofs["p"].evidence == (b"signed-a", b"signed-b")
    det.reinstate("p")
    assert not det.is_quarantined("p") and "p" not in det.proofs


def test_detector_flags_replayed_nonces_and_floods() -> None:
    det = ByzantineDetector("me", flood_limit=3)
    assert det.fresh("p", 5) and det.fresh("p", 4)
    assert not det.fresh("p", 5)
    assert [det.admit("q") for _ in range(4)] == [True, True, True, False]
    assert [e.reason for e in det.drain()] == ["replay", "flooding"]


# ------------------------------------------------------------------ linearizability checker


def _register() -> Model[int]:
    return Model(init=lambda: 0, step=lambda s, op: (s, s) if op[0] == "r" else (None, op[1]))


def test_checker_accepts_concurrent_overlap_and_rejects_stale_read() -> None:
    ok = [Operation("k", ("w", 1), None, 0, 2), Operation("k", ("r",), 1, 1, 3), Operation("k", ("r",), 1, 4, 5)]
    stale = [Operation("k", ("w", 1), None, 0, 2), Operation("k", ("r",), 0, 3, 4)]
    assert check(ok, _register()).ok
    assert not check(stale, _register()).ok


def test_checker_treats_timeouts_as_maybe_applied_but_not_flip_flopping() -> None:
    maybe = [Operation("k", ("w", 1), UNKNOWN, 0), Operation("k", ("r",), 0, 3, 4), Operation("k", ("r",), 1, 5, 6)]
    flip = [Operation("k", ("w", 1), UNKNOWN, 0), Operation("k", ("r",), 1, 3, 4), Operation("k", ("r",), 0, 5, 6)]
    assert check(maybe, _register()).ok
    assert not check(flip, _register()).ok


# ------------------------------------------------------------------ transport


def test_transport_delivers_between_keyed_peers_and_refuses_a_wrong_key() -> None:
    async def scenario() -> tuple[list[Envelope], list[tuple[str, str]]]:
        got: list[Envelope] = []
        bad: list[tuple[str, str]] = []
        ring = {n: KeyRing(n, Ed25519PrivateKey.generate()) for n in ("a", "b", "x")}
        for me, other in (("a", "b"), ("b", "a"), ("x", "b")):  # pinned keys, as from acp_peer_keys
            ring[me].add_peer(other, ring[other].public_key)
        a = Transport("a", b"k" * 32, ring["a"], lambda p, e: None)
        b = Transport("b", b"k" * 32, ring["b"], lambda p, e: got.append(e))
        x = Transport("x", b"wrong-key" * 4, ring["x"], lambda p, e: None, lambda p, r: bad.append((p, r)))
        await b.start("127.0.0.1", 0)
        for t in (a, x):
            t.set_peers({"b": f"127.0.0.1:{b.port}"})
        a.send(Envelope(0, "a", "b", EpochFetch(3)))
        x.send(Envelope(0, "x", "b", EpochFetch(4)))
        for _ in range(100):
            if got and bad:
                break
            await asyncio.sleep(0.02)
        for t in (a, b, x):
            await t.stop()
        assert ring["b"].knows("a")
        return got, bad

    got, bad = asyncio.run(scenario())
    assert [e.body for e in got] == [EpochFetch(3)]
    assert ("127.0.0.1", "invalid_mac") in bad  # the listener's key proof fails for x: nothing from x gets through
