"""RDMA streams end to end over the software verbs provider: data, credits, QP errors, teardown.

Each test runs real source and destination channels (separate threads, a socketpair as the
control connection) and checks the bytes that arrived. The mutation tests break the credit or
completion handling on purpose and assert that the same exchange then fails loudly: if they
ever pass silently, the protocol checks have stopped working.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import pytest
import xxhash
from rdma_support import CHUNK, Exchange, Pair, make_frame, open_pair, read_acks, receive, transfer
from softverbs import SoftProvider, SoftQP

from dwcp_agent import wire
from dwcp_agent.amst import credits, rdma
from dwcp_agent.amst.rdma import RdmaError
from dwcp_agent.amst.verbs import QpState


@pytest.fixture
def provider() -> SoftProvider:
    return SoftProvider()


@pytest.fixture
def pair(provider: SoftProvider) -> Iterator[Pair]:
    p = open_pair(provider, slots=4)
    yield p
    p.close()


def sample(pair: Pair, name: str, labels: dict[str, str] | None = None) -> float:
    return pair.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def wait_until(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.005)


def test_frames_arrive_intact_in_order_through_a_ring_smaller_than_the_transfer(pair: Pair) -> None:
    sent, result = transfer(pair, 64, seed=1)
    assert result.errors == []
    assert result.received == sent
    assert result.acked[-1] == 63
    assert sample(pair, "dwcp_v3_rdma_work_requests_posted_total") == 64 + 4 + 64  # writes, initial + reposted recvs
    # 64 receive completions; write completions are reaped lazily by the next sends, and each one
    # arrives a step after its data landed, so the last two may still be on their way
    assert sample(pair, "dwcp_v3_rdma_completions_total", {"status": "success"}) >= 64 + 62
    assert pair.failures == []


def test_credit_exhaustion_blocks_the_sender_until_the_destination_returns_a_slot(pair: Pair) -> None:
    hold = threading.Event()
    result = Exchange()
    receiver = threading.Thread(target=receive, args=(pair, 6, result, hold), daemon=True)
    acker = threading.Thread(target=read_acks, args=(pair, 6, result), daemon=True)
    receiver.start()
    acker.start()
    sent = []
    for seq in range(4):  # exactly the ring: no wait
        header, payload = make_frame(seq, random.Random(seq))
        pair.src.send_frame(header, payload)
        sent.append(payload)
    blocked_sent = threading.Event()

    def send_more() -> None:
        for seq in (4, 5):
            header, payload = make_frame(seq, random.Random(seq))
            pair.src.send_frame(header, payload)
            sent.append(payload)
        blocked_sent.set()

    sender = threading.Thread(target=send_more, daemon=True)
    sender.start()
    wait_until(lambda: sample(pair, "dwcp_v3_rdma_credit_stalls_total") >= 1)
    assert sample(pair, "dwcp_v3_rdma_credit_stalls_total") == 1
    try:
        assert not blocked_sent.is_set()
        assert pair.src.qp.writes == 4  # frame 4 was never written
        # and the four that were all land (the destination reaps completions at its own pace)
        wait_until(lambda: pair.dst.ring.landed_count + (pair.dst.ring.current is not None) == 4)
        assert pair.dst.ring.landed_count + (pair.dst.ring.current is not None) == 4
    finally:
        hold.set()  # the destination consumes: credits flow back, the sender recovers
    sender.join(10)
    receiver.join(10)
    acker.join(10)
    assert result.errors == []
    assert result.received == sent
    assert result.acked[-1] == 5


def test_qp_moving_to_error_mid_stream_fails_the_stream_and_tells_the_session(pair: Pair) -> None:
    qp = pair.src.qp
    assert isinstance(qp, SoftQP)
    qp.fail_after_writes = 10
    sent, result = transfer(pair, 40, seed=2)
    errors = [e for e in result.errors if isinstance(e, RdmaError)]
    assert errors and errors[0].error_type == "wc_retry_exc_err"
    assert [f.error_type for f in pair.failures] == ["wc_retry_exc_err"]
    assert qp.state == QpState.ERROR
    assert result.received == sent[: len(result.received)] and len(result.received) <= 10
    assert sample(pair, "dwcp_v3_rdma_errors_total", {"error_type": "wc_retry_exc_err"}) == 1


def test_write_with_a_wrong_rkey_is_a_remote_access_error_and_nothing_lands(pair: Pair) -> None:
    pair.src.ring = rdma.RemoteRing(pair.src.ring.addr, pair.src.ring.rkey ^ 1, pair.src.ring.slot_size,
                                    pair.src.ring.slots)
    _sent, result = transfer(pair, 3, seed=3)
    assert any(getattr(e, "error_type", "") == "wc_rem_access_err" for e in result.errors)
    assert result.received == []


def test_write_past_the_ring_end_is_refused_by_the_region_bounds(pair: Pair) -> None:
    ring = pair.src.ring
    pair.src.ring = rdma.RemoteRing(ring.addr + ring.slots * ring.slot_size, ring.rkey, ring.slot_size, ring.slots)
    _sent, result = transfer(pair, 8, seed=4)
    assert any(getattr(e, "error_type", "") == "wc_rem_access_err" for e in result.errors)
    assert result.received == []


def test_destination_failure_reaches_the_source_with_its_reason(pair: Pair) -> None:
    """A receive-side QP error (flushed receives) is reported over TCP so the source falls back."""
    pair.dst.qp.to_error()
    _sent, result = transfer(pair, 4, seed=5)
    assert pair.failures, "the source was not told"
    assert pair.failures[0].error_type in ("wc_wr_flush_err", "wc_retry_exc_err")
    assert result.received == []


def test_teardown_deregisters_every_region_and_destroys_the_queue_pairs(provider: SoftProvider) -> None:
    p = open_pair(provider, slots=4)
    assert provider.locked > 0
    transfer(p, 5, seed=6)
    p.close()
    assert provider.locked == 0 and provider.still_mapped == 0
    assert all(not ctx.qps for ctx in provider.fabric.contexts.values())


def test_a_failed_stream_leaves_no_view_that_keeps_its_memory_mapped(provider: SoftProvider) -> None:
    """Errors carry tracebacks: none may hold a view of a region, or deregistration fails (EBUSY)."""
    p = open_pair(provider, slots=4)
    ring = p.src.ring
    p.src.ring = rdma.RemoteRing(ring.addr + ring.slot_size, ring.rkey, ring.slot_size, ring.slots)
    _sent, result = transfer(p, 8, seed=4)  # frames land one slot off: the destination fails the stream
    p.close()
    assert any(getattr(e, "error_type", "") == "bad_frame" for e in result.errors), result.errors
    assert provider.locked == 0 and provider.still_mapped == 0


# -- mutations: break the protocol on purpose, the exchange must fail ------------------------------

class EagerWindow(credits.CreditWindow):
    """Credit bug: treats an ACK for frame n as returning frame n+1's slot too."""

    def credit(self, acked_sequence: int) -> int:
        return super().credit(min(acked_sequence + 1, self._last_seq))


class NoCreditWindow(credits.CreditWindow):
    """Credit bug: ignores credits altogether and cycles through the slots."""

    def acquire(self, sequence: int) -> int | None:
        slot = sequence % self.slots
        self._last_seq = sequence
        self._unacked.append((sequence, slot))
        return slot

    def completed(self, slot: int) -> None:
        pass


def drive_greedy(p: Pair, count: int) -> list[BaseException]:
    """One thread, deterministic: the source sends whenever it holds a credit, the destination
    consumes one frame per round and acknowledges it."""
    header_buf = bytearray(wire.HEADER_SIZE)
    ack_buf = bytearray(wire.HEADER_SIZE)
    scratch = memoryview(bytearray(CHUNK))
    sent = 0
    try:
        for _ in range(4 * count):
            while sent < count and p.src.credits_available():
                p.src.send_frame(*make_frame(sent, random.Random(sent)))
                sent += 1
            h = p.dst.recv_header(header_buf)
            body = p.dst.recv_payload(scratch[: h.encoded_len])
            if xxhash.xxh3_64_intdigest(bytes(body)) != h.checksum:
                raise AssertionError(f"frame {h.sequence} was overwritten in its slot")
            p.dst.send_ack(wire.pack_header(wire.FrameType.ACK, 0, 0, 1, 0, h.sequence, h.offset, 0, 0, 0))
            p.src.recv_ack(ack_buf)
            if h.sequence == count - 1:
                return []
    except (OSError, AssertionError) as exc:
        return [exc]
    return [AssertionError("transfer did not finish")]


def test_greedy_source_never_outruns_the_credits(provider: SoftProvider) -> None:
    p = open_pair(provider, slots=2)
    try:
        assert drive_greedy(p, 12) == []
    finally:
        p.close()


def _caught_as(errors: list[BaseException]) -> set[str]:
    kinds = set()
    for e in errors:
        kind = getattr(e, "error_type", "")
        kinds.add("overwritten" if "overwritten" in str(e) else kind or type(e).__name__)
    return kinds


def test_early_credit_is_caught_as_an_overwritten_slot(provider: SoftProvider,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With rnr_retry=7 a write finding no receive waits for one, so a credit bug cannot show up as
    receiver-not-ready (a real NIC never reports that here): the early write's first packets
    overwrite a frame still waiting in its slot, and that frame's own checksum catches it."""
    monkeypatch.setattr(rdma, "CreditWindow", EagerWindow)
    p = open_pair(provider, slots=2, timeout=1.0)
    try:
        errors = drive_greedy(p, 12)
        rnr_naks = p.src.qp.rnr_naks  # type: ignore[attr-defined]
    finally:
        p.close()
    assert errors, "the credit bug went unnoticed"
    assert _caught_as(errors) <= {"overwritten", "slot_overrun", "credit_window"}, errors
    assert rnr_naks > 0, "the early write met a slot whose receive was not reposted yet"


def test_ignoring_credits_and_completions_is_caught_before_a_slot_is_reused(
        provider: SoftProvider, monkeypatch: pytest.MonkeyPatch) -> None:
    """Posting without waiting for completions overflows the send queue (ENOMEM from ibv_post_send
    on a NIC), or, where it does not, the overwritten slot is caught; never receiver-not-ready."""
    monkeypatch.setattr(rdma, "CreditWindow", NoCreditWindow)
    p = open_pair(provider, slots=2, timeout=1.0)
    try:
        errors = drive_greedy(p, 12)
    finally:
        p.close()
    assert errors, "the credit bug went unnoticed"
    assert _caught_as(errors) <= {"post_send", "overwritten", "slot_overrun", "credit_window"}, errors


def test_lost_receive_completion_is_detected_not_silently_skipped(provider: SoftProvider,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real_poll = SoftQP.poll
    seen = {"recv": 0}

    def lossy_poll(self: SoftQP, max_entries: int) -> list:  # type: ignore[type-arg]
        out = []
        for wc in real_poll(self, max_entries):
            if wc.opcode != 1:
                seen["recv"] += 1
                if seen["recv"] == 3:
                    continue
            out.append(wc)
        return out

    p = open_pair(provider, slots=4, timeout=1.0)
    monkeypatch.setattr(SoftQP, "poll", lossy_poll)
    try:
        _sent, result = transfer(p, 16, seed=7)
    finally:
        p.close()
    assert any(getattr(e, "error_type", "") == "completion_order" for e in result.errors), result.errors
    assert len(result.received) <= 2


def test_lost_send_completion_is_caught_by_per_qp_completion_order(provider: SoftProvider,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real_poll = SoftQP.poll
    seen = {"send": 0}

    def lossy_poll(self: SoftQP, max_entries: int) -> list:  # type: ignore[type-arg]
        out = []
        for wc in real_poll(self, max_entries):
            if wc.opcode == 1:
                seen["send"] += 1
                if seen["send"] == 1:
                    continue
            out.append(wc)
        return out

    p = open_pair(provider, slots=2, timeout=1.0)
    monkeypatch.setattr(SoftQP, "poll", lossy_poll)
    try:
        _sent, result = transfer(p, 8, seed=8)
    finally:
        p.close()
    assert any(getattr(e, "error_type", "") == "completion_order" for e in result.errors), result.errors


def test_frame_larger_than_a_slot_is_refused_before_posting(pair: Pair) -> None:
    payload = bytes(pair.src.ring.slot_size)
    header = wire.pack_header(wire.FrameType.DATA, 0, 0, 1, 0, 0, 0, len(payload), len(payload), 0)
    with pytest.raises(RdmaError, match="does not fit"):
        pair.src.send_frame(header, payload)
    assert pair.src.ring.slot_size > CHUNK
