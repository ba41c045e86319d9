"""The software verbs provider behaves like verbs where the transport depends on it.

Each test drives raw queue pairs (no transport code) and checks one row of the table in
softverbs' docstring: zero-SGE receives refused, receiver-not-ready retried, writes in flight
until they complete, access flags enforced, deregistration refused while memory is viewed, QP
states moved only by modify.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from softverbs import ACCESS_LOCAL_WRITE, NO_SGE, SoftContext, SoftMR, SoftProvider, SoftQP

from dwcp_agent.amst.verbs import QpState, VerbsError, WcOpcode, WcStatus

MTU = 4096


@dataclass
class Link:
    provider: SoftProvider
    src_ctx: SoftContext
    dst_ctx: SoftContext
    src: SoftQP
    dst: SoftQP
    staging: SoftMR
    ring: SoftMR


def make_link(ring_access: int | None = None, connect: bool = True) -> Link:
    provider = SoftProvider()
    port = provider.discover()[0][0]
    src_ctx, dst_ctx = provider.open(port), provider.open(port)
    staging = src_ctx.register(4 * MTU)
    ring = dst_ctx.register(4 * MTU) if ring_access is None else dst_ctx.register(4 * MTU, ring_access)
    src, dst = src_ctx.create_qp(4, 1), dst_ctx.create_qp(1, 4)
    if connect:
        src.connect(dst.endpoint())
        dst.connect(src.endpoint())
    return Link(provider, src_ctx, dst_ctx, src, dst, staging, ring)


@pytest.fixture
def link() -> Iterator[Link]:
    ln = make_link()
    yield ln
    ln.src_ctx.close()
    ln.dst_ctx.close()


def write(ln: Link, wr_id: int, offset: int, length: int, fill: int) -> None:
    ln.staging.view[offset: offset + length] = bytes([fill]) * length
    ln.src.post_write_imm(wr_id, ln.staging, offset, length, ln.ring.addr + offset, ln.ring.rkey, wr_id)


def test_a_receive_without_an_sge_is_refused_as_pyverbs_refuses_it(link: Link) -> None:
    with pytest.raises(VerbsError, match=NO_SGE):
        link.dst.post_recv(0)
    link.dst.post_recv(0, link.ring)  # with one (zero-length) SGE it is accepted


def test_writes_stay_in_flight_until_the_link_carries_them(link: Link) -> None:
    link.dst.post_recv(0, link.ring)
    with link.provider.fabric.hold():
        write(link, 0, 0, 100, 0xAA)
        assert link.src.poll(4) == [] and link.dst.poll(4) == []
        assert bytes(link.ring.view[:100]) == bytes(100), "nothing lands while the write is in flight"
        link.staging.view[:100] = b"\xbb" * 100  # the NIC reads local memory when it sends, not at post
    recv = link.dst.poll(4)
    assert [(wc.wr_id, wc.status, wc.opcode, wc.byte_len, wc.imm) for wc in recv] == [
        (0, WcStatus.SUCCESS, WcOpcode.RECV_RDMA_WITH_IMM, 100, 0)]
    assert bytes(link.ring.view[:100]) == b"\xbb" * 100
    assert link.src.wait(1.0)
    assert [(wc.wr_id, wc.status) for wc in link.src.poll(4)] == [(0, WcStatus.SUCCESS)]


def test_the_requester_completion_comes_after_the_data_landed(link: Link) -> None:
    link.dst.post_recv(0, link.ring)
    write(link, 0, 0, 64, 0x11)
    assert link.provider.fabric.progress()  # the write lands ...
    assert bytes(link.ring.view[:64]) == b"\x11" * 64
    assert list(link.src.cq) == []  # ... and its acknowledgement is still on its way
    assert [wc.status for wc in link.src.poll(4)] == [WcStatus.SUCCESS]


def test_receiver_not_ready_is_retried_until_a_receive_is_posted(link: Link) -> None:
    """rnr_retry=7 (the adapter's setting): no RNR error, the write waits for its receive."""
    assert link.src.rnr_retry == 7
    write(link, 0, 0, 3 * MTU, 0x5A)
    for _ in range(20):
        link.provider.fabric.progress()
    assert link.src.rnr_naks >= 20
    assert link.src.poll(4) == [] and link.src.state == QpState.RTS
    # every packet but the last (the one carrying the immediate) is already placed
    assert bytes(link.ring.view[: 2 * MTU]) == b"\x5a" * (2 * MTU)
    assert bytes(link.ring.view[2 * MTU: 3 * MTU]) == bytes(MTU)
    link.dst.post_recv(7, link.ring)
    assert link.dst.wait(1.0)
    assert [(wc.wr_id, wc.status, wc.byte_len) for wc in link.dst.poll(4)] == [(7, WcStatus.SUCCESS, 3 * MTU)]
    assert bytes(link.ring.view[: 3 * MTU]) == b"\x5a" * (3 * MTU)
    assert link.src.wait(1.0) and [wc.status for wc in link.src.poll(4)] == [WcStatus.SUCCESS]


def test_a_write_behind_one_waiting_for_a_receive_waits_too(link: Link) -> None:
    write(link, 0, 0, 100, 1)
    write(link, 1, MTU, 100, 2)
    link.provider.fabric.progress()
    assert bytes(link.ring.view[MTU: MTU + 100]) == bytes(100)
    link.dst.post_recv(0, link.ring)
    link.dst.post_recv(1, link.ring)
    assert link.src.wait(1.0)
    while len(link.src.cq) < 2 and link.src.wait(1.0):
        link.provider.fabric.progress()
    assert [wc.wr_id for wc in link.src.poll(4)] == [0, 1]
    assert [wc.imm for wc in link.dst.poll(4)] == [0, 1]


def test_a_limited_rnr_retry_count_runs_out() -> None:
    ln = make_link(connect=False)
    ln.src.modify(QpState.INIT, access=3)
    ln.src.modify(QpState.RTR, remote=ln.dst.endpoint())
    ln.src.modify(QpState.RTS, rnr_retry=2)
    ln.dst.connect(ln.src.endpoint())
    write(ln, 0, 0, 10, 1)
    for _ in range(5):
        ln.provider.fabric.progress()
    assert [wc.status for wc in ln.src.poll(4)] == [WcStatus.RNR_RETRY_EXC_ERR]
    assert ln.src.state == QpState.ERROR


def test_a_ring_registered_without_remote_write_refuses_remote_writes() -> None:
    ln = make_link(ring_access=ACCESS_LOCAL_WRITE)
    ln.dst.post_recv(0, ln.ring)
    write(ln, 0, 0, 100, 0xCC)
    assert ln.src.wait(1.0)
    assert [wc.status for wc in ln.src.poll(4)] == [WcStatus.REM_ACCESS_ERR]
    assert bytes(ln.ring.view[:100]) == bytes(100)
    assert ln.dst.state == QpState.ERROR
    assert [wc.status for wc in ln.dst.poll(4)] == [WcStatus.WR_FLUSH_ERR]


def test_a_responder_qp_without_remote_write_access_refuses_remote_writes() -> None:
    ln = make_link(connect=False)
    ln.src.connect(ln.dst.endpoint())
    ln.dst.modify(QpState.INIT, access=ACCESS_LOCAL_WRITE)
    ln.dst.modify(QpState.RTR, remote=ln.src.endpoint())
    ln.dst.post_recv(0, ln.ring)
    write(ln, 0, 0, 100, 0xCC)
    assert ln.src.wait(1.0)
    assert [wc.status for wc in ln.src.poll(4)] == [WcStatus.REM_ACCESS_ERR]
    assert bytes(ln.ring.view[:100]) == bytes(100)


def test_deregistering_a_region_whose_memory_is_viewed_fails(link: Link) -> None:
    held = link.ring.view[:16]
    with pytest.raises(VerbsError) as info:
        link.dst_ctx.deregister(link.ring)
    assert info.value.errno == errno.EBUSY
    assert link.ring.rkey not in link.dst_ctx.by_rkey, "its keys are dead all the same"
    held.release()
    link.src_ctx.deregister(link.staging)
    assert link.provider.locked == 0


def test_queue_pair_state_moves_only_through_modify_in_order() -> None:
    ln = make_link(connect=False)
    assert ln.src.state == QpState.RESET
    with pytest.raises(VerbsError, match="RESET -> RTR"):
        ln.src.modify(QpState.RTR, remote=ln.dst.endpoint())
    with pytest.raises(VerbsError, match="post_send on a QP in RESET"):
        ln.src.post_write_imm(0, ln.staging, 0, 1, ln.ring.addr, ln.ring.rkey, 0)
    ln.src.modify(QpState.INIT, access=3)
    ln.dst.modify(QpState.INIT, access=3)
    ln.dst.post_recv(0, ln.ring)  # receives may be posted from INIT on
    with pytest.raises(VerbsError, match="post_send on a QP in INIT"):
        ln.src.post_write_imm(0, ln.staging, 0, 1, ln.ring.addr, ln.ring.rkey, 0)
    with pytest.raises(VerbsError, match="needs the remote QP"):
        ln.src.modify(QpState.RTR)
    ln.src.modify(QpState.RTR, remote=ln.dst.endpoint())
    ln.src.modify(QpState.RTS, rnr_retry=7)
    for _ in range(3):
        ln.provider.fabric.progress()
    assert ln.src.state == QpState.RTS and ln.dst.state == QpState.INIT  # nothing moved them
    write(ln, 0, 0, 10, 1)
    assert ln.src.wait(1.0)
    assert [wc.status for wc in ln.src.poll(4)] == [WcStatus.RETRY_EXC_ERR], "a responder in INIT never answers"
    assert ln.src.state == QpState.ERROR  # a failed work request moves the QP to ERROR, as on hardware
    write(ln, 1, 0, 10, 1)
    assert ln.src.wait(1.0)
    assert [wc.status for wc in ln.src.poll(4)] == [WcStatus.WR_FLUSH_ERR]
