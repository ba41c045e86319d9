"""PBFT normal-case costs that must not cost safety: the primary leaves its own clients' requests
unsigned (its pre-prepare header vouches for them), a forwarded request must be signed, and no
other primary ever orders (or waits for) such an unsigned copy."""

from __future__ import annotations

import random

from dwcp_agent.acp.auth import KeyRing
from dwcp_agent.acp.byzantine import ByzantineDetector
from dwcp_agent.acp.messages import Commit, PrePrepare, Request, RequestFwd, decode_pbft, encode
from dwcp_agent.acp.pbft.pbft import Pbft, PbftOptions

IDS = ["n1", "n2", "n3", "n4"]


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


# ------------------------------------------------------------------ retransmission only when stuck


def _tick_and_run(nodes: dict[str, Pbft], down: frozenset[str] = frozenset()) -> list[tuple[str, str, object]]:
    for i, node in nodes.items():
        if i not in down:
            node.tick()
    return _run(nodes, down)


def test_slots_are_resent_only_when_nothing_executed_in_the_period() -> None:
    nodes, _dets = _cluster()
    nodes["n2"].submit(Request("n2/0/0", 1, b"op"))
    _run(nodes)
    assert all(node.last_exec == 1 for node in nodes.values())
    period = nodes["n1"].opts.retransmit_ticks
    resent: list[list[object]] = []
    for _ in range(2 * period):
        resent.append([m for _s, _t, m in _tick_and_run(nodes)])
    # First period: slot 1 executed since the last one, so nothing is resent; second: no progress,
    # so every replica resends its part of the recent slots (a stuck peer would need them).
    assert resent[period - 1] == []
    assert any(isinstance(m, PrePrepare) for m in resent[2 * period - 1])
    assert any(isinstance(m, Commit) for m in resent[2 * period - 1])


def test_primary_missing_a_commit_gets_it_from_the_resends() -> None:
    nodes, _dets = _cluster()
    down = frozenset({"n4"})  # with one replica down the primary needs every other commit
    nodes["n1"].submit(Request("n1/0/0", 1, b"op"))
    for _ in range(50):
        moved = False
        for sender in ("n1", "n2", "n3"):
            for to, wire in nodes[sender].ready().messages:
                moved = True
                msg = decode_pbft(wire.body)
                if to in down or (sender == "n2" and to == "n1" and isinstance(msg, Commit)):
                    continue  # n2's commit to the primary is lost
                nodes[to].receive(sender, wire)
        if not moved:
            break
    assert nodes["n2"].last_exec == nodes["n3"].last_exec == 1 and nodes["n1"].last_exec == 0
    for _ in range(4 * nodes["n1"].opts.retransmit_ticks):
        _tick_and_run(nodes, down)
        if nodes["n1"].last_exec == 1:
            break
    assert nodes["n1"].last_exec == 1
