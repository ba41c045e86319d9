"""Finding 4: on connect, the transport replaced a member's stored signing key with whatever key
the peer presented, so one key holder could speak and sign as another member; epoch-state votes
were counted from names that are not members. Keys are now pinned (configuration or an
admin-committed registry entry), a connection must prove the pinned key, and every consensus
message must come from a current member."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from dwcp_agent.acp.auth import KeyConflict, KeyRing, load_or_create_key, public_key_hex
from dwcp_agent.acp.messages import ConfChange, Envelope, EpochFetch, EpochState, RaftMsg, RaftType
from dwcp_agent.acp.registry import ClaimVm, Command, Member, RegistryState
from dwcp_agent.acp.runtime.transport import Transport
from dwcp_agent.cli import main
from tests.security.acp_support import pump, replica, ring

PSK = b"k" * 32


def test_a_pinned_key_is_never_replaced() -> None:
    keys, real, impostor = ring("b"), ring("a"), ring("a")
    keys.add_peer("a", real.public_key)
    with pytest.raises(KeyConflict):
        keys.add_peer("a", impostor.public_key)
    assert keys.pinned("a") == real.public_key
    data = b"statement"
    assert keys.verify("a", data, real.sign(data)) and not keys.verify("a", data, impostor.sign(data))


def test_a_key_holder_cannot_connect_as_another_member() -> None:
    async def scenario() -> tuple[list[Envelope], list[tuple[str, str]], KeyRing, KeyRing]:
        got: list[Envelope] = []
        refused: list[tuple[str, str]] = []
        a, b = ring("a"), ring("b")
        a.add_peer("b", b.public_key)
        b.add_peer("a", a.public_key)
        impostor = ring("a")  # holds the PSK, claims to be a with its own key
        impostor.add_peer("b", b.public_key)
        listener = Transport("b", PSK, b, lambda p, e: got.append(e), lambda addr, r: refused.append((addr, r)))
        await listener.start("127.0.0.1", 0)
        fake = Transport("a", PSK, impostor, lambda p, e: None)
        stranger_keys = ring("x")
        stranger_keys.add_peer("b", b.public_key)
        stranger = Transport("x", PSK, stranger_keys, lambda p, e: None)  # a name b never pinned
        honest = Transport("a", PSK, a, lambda p, e: None)
        for t in (fake, stranger, honest):
            t.set_peers({"b": f"127.0.0.1:{listener.port}"})
        fake.send(Envelope(0, "a", "b", EpochFetch(66)))
        stranger.send(Envelope(0, "x", "b", EpochFetch(77)))
        for _ in range(100):
            if len(refused) >= 2:
                break
            await asyncio.sleep(0.02)
        honest.send(Envelope(0, "a", "b", EpochFetch(1)))
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.02)
        for t in (fake, stranger, honest, listener):
            await t.stop()
        return got, refused, b, a

    got, refused, b, a = asyncio.run(scenario())
    assert [e.body for e in got] == [EpochFetch(1)]  # only the real a gets through
    assert b.pinned("a") == a.public_key  # the impostor's connection changed nothing
    assert refused and all(addr == "127.0.0.1" and reason == "identity" for addr, reason in refused)


def _image(members: dict[str, str]) -> bytes:
    state = RegistryState(members={i: Member(i, addr) for i, addr in members.items()}, protocol="raft")
    return msgspec.msgpack.encode(state)


def test_epoch_state_votes_and_raft_messages_from_non_members_are_ignored() -> None:
    members = {"a": "127.0.0.1:1", "b": "127.0.0.1:2", "c": "127.0.0.1:3"}
    rings = {n: ring(n) for n in members}
    a = replica("a", members, rings["a"])
    takeover = _image({"mallory": "127.0.0.1:9"})
    a.receive(Envelope(0, "mallory", "a", EpochState(1, "raft", takeover)))
    assert a.epoch == 0 and set(a.members()) == set(members)
    assert a.raft is not None
    term = a.raft.term
    a.receive(Envelope(0, "mallory", "a", RaftMsg(RaftType.VOTE, "mallory", "a", term + 50, 0, 0)))
    assert a.raft.term == term  # a stranger's vote request does not even bump the term
    a.receive(Envelope(0, "b", "a", EpochState(1, "raft", _image(members))))
    assert a.epoch == 1  # the same vote from a member counts (Raft trusts one member's image)


def test_a_ghost_joins_as_a_learner_and_never_counts_towards_quorum() -> None:
    r = replica("solo", {"solo": "127.0.0.1:1"}, ring("solo"))
    pump({"solo": r}, 30)
    assert r.raft is not None and r.status()["leader"] == "solo"
    r.change_membership(ConfChange("learner", "ghost", "127.0.0.1:9", ring("ghost").public_key))
    pump({"solo": r}, 30)
    assert r.raft.learners == {"ghost"} and r.raft.voters == {"solo"}
    assert not r.registry.state.members["ghost"].voter
    commit = r.raft.log.committed
    r.submit(Command("t", 1, ClaimVm("vm", "h")))
    pump({"solo": r}, 10)
    assert r.raft.log.committed > commit and r.registry.owner("vm") == "h"  # still commits alone


def test_a_learner_that_catches_up_is_promoted_to_voter() -> None:
    rings = {"a": ring("a"), "b": ring("b")}
    rings["b"].add_peer("a", rings["a"].public_key)
    a = replica("a", {"a": "127.0.0.1:1"}, rings["a"])
    b = replica("b", {"a": "127.0.0.1:1"}, rings["b"])  # a joiner knows the current members
    cluster = {"a": a}
    pump(cluster, 30)
    a.change_membership(ConfChange("learner", "b", "127.0.0.1:2", rings["b"].public_key))
    cluster["b"] = b
    pump(cluster, 60)
    assert a.raft is not None and a.raft.voters == {"a", "b"} and not a.raft.learners
    assert a.registry.state.members["b"].voter
    assert rings["a"].pinned("b") == rings["b"].public_key  # pinned from the admin-committed change


def test_cluster_key_prints_the_key_the_agent_signs_with(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cluster", "key", "--state-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.strip()
    assert len(bytes.fromhex(printed)) == 32 and printed == public_key_hex(tmp_path)
    signing = load_or_create_key(tmp_path / "acp" / "node.key")
    keys = ring("other")
    keys.add_peer("me", bytes.fromhex(printed))
    assert keys.verify("me", b"x", signing.sign(b"x"))
