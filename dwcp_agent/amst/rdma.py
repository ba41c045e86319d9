"""RDMA data streams over any verbs provider: setup, slot writes, credits, QP-state and error handling.

Per stream (see docs/rdma.md for the picture):
1. Both sides marked "rdma" in the handshake of the stream's authenticated TCP connection. Over
   it the source sends `RdmaConnect` (its RC QP), the destination registers a ring of slots, posts
   one receive per slot, brings its QP to RTS and answers `RdmaAccept` (QP, ring address, rkey).
   Either side may answer `RdmaDecline` instead; the stream then simply runs over that connection.
2. The source copies each frame (header + payload) into a registered staging slot and posts an
   RDMA WRITE WITH IMMEDIATE into the same slot of the destination's ring; the immediate names
   the slot. The frame's own header carries its sequence.
3. The destination delivers frames in sequence order straight out of the slot (no copy), reposts
   the slot's receive, then sends the ACK header over TCP: the ACK returns the slot's credit.
4. Any completion error, a QP leaving RTS, or a write the credits did not allow fails the stream
   with an `RdmaError`; the source's `on_failure` hook lets the session fall back to TCP.

Waiting never holds the GIL: threads block in `QueuePair.wait` or on a Condition.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dwcp_agent import wire
from dwcp_agent.amst.credits import CreditError, CreditWindow, SlotRing
from dwcp_agent.amst.verbs import (
    MemoryRegion,
    QpEndpoint,
    QueuePair,
    VerbsContext,
    VerbsError,
    WcOpcode,
)
from dwcp_agent.telemetry.metrics import Metrics

__all__ = ["RdmaDataChannel", "RdmaDeclined", "RdmaError", "RdmaFrameSource", "accept_destination",
           "connect_source", "slot_size_for"]

log = logging.getLogger("dwcp_agent.amst")

POLL_S = 0.05
SLOT_ALIGN = 4096
MAX_SLOTS = 256


class RdmaError(OSError):
    """The RDMA path of a stream failed; `error_type` labels dwcp_v3_rdma_errors_total."""

    def __init__(self, message: str, error_type: str) -> None:
        super().__init__(message)
        self.error_type = error_type


class RdmaDeclined(Exception):
    """This stream will not use RDMA (a side cannot or will not); the connection carries it over TCP."""


def slot_size_for(max_frame: int) -> int:
    """Slot bytes for frames up to `max_frame` (header included), page aligned."""
    return -(-max_frame // SLOT_ALIGN) * SLOT_ALIGN


@dataclass(frozen=True)
class RemoteRing:
    """Where the source writes: the destination's registered slot ring."""

    addr: int
    rkey: int
    slot_size: int
    slots: int


def _count_completion(metrics: Metrics, status: str) -> None:
    metrics.rdma_completions.labels(status).inc()


class RdmaDataChannel:
    """Source side of one RDMA stream (a `DataChannel`): frames out by RDMA, ACKs in over TCP."""

    transport = "rdma"

    def __init__(self, ctx: VerbsContext, qp: QueuePair, mr: MemoryRegion, ring: RemoteRing, sock: socket.socket,
                 metrics: Metrics, timeout: float, on_failure: Callable[[RdmaError], None] | None = None) -> None:
        self.ctx = ctx
        self.qp = qp
        self.mr = mr
        self.ring = ring
        self.sock = sock
        self.metrics = metrics
        self.timeout = timeout
        self.on_failure = on_failure
        self.window = CreditWindow(ring.slots)
        self._cond = threading.Condition(threading.RLock())
        self._error: RdmaError | None = None
        self._aborted = False
        self._closed = False

    # -- sending ------------------------------------------------------------------------------

    def send_frame(self, header: bytes, *payload: bytes | memoryview) -> None:
        n = len(header) + sum(len(part) for part in payload)
        if n > self.ring.slot_size:
            raise self._fail(RdmaError(f"frame of {n} bytes does not fit a {self.ring.slot_size}-byte slot",
                                       "frame_too_large"))
        sequence = wire.unpack_header(header).sequence
        with self._cond:
            slot = self._acquire(sequence)
        offset = slot * self.ring.slot_size
        view = self.mr.view
        view[offset: offset + len(header)] = header
        at = offset + len(header)
        for part in payload:
            view[at: at + len(part)] = part
            at += len(part)
        try:
            self.qp.post_write_imm(slot, self.mr, offset, n, self.ring.addr + offset, self.ring.rkey, slot)
        except VerbsError as exc:
            with self._cond:
                raise self._fail(RdmaError(f"posting an RDMA write failed: {exc}", "post_send")) from exc
        self.metrics.rdma_posted.inc()

    def credits_available(self) -> int:
        """Frames that can be sent now without waiting (completions ready are reaped first)."""
        with self._cond:
            self._check()
            self._reap()
            return self.window.available

    def _acquire(self, sequence: int) -> int:
        """A writable slot; waits for credits (ACKs) or completions. Called with the lock held."""
        deadline = time.monotonic() + self.timeout
        stalled = False
        while True:
            self._check()
            self._reap()
            slot = self.window.acquire(sequence)
            if slot is not None:
                return slot
            if not stalled:
                stalled = True
                self.metrics.rdma_credit_stalls.inc()
            if time.monotonic() > deadline:
                if self.window.waiting_for_completion:
                    raise self._fail(RdmaError(f"write completion missing for {self.timeout:.0f}s "
                                               "(credit returned, completion never polled)", "completion_timeout"))
                raise TimeoutError(f"no credit returned by the destination for {self.timeout:.0f}s")
            if self.window.waiting_for_completion:
                self._cond.release()
                try:
                    self.qp.wait(POLL_S)
                finally:
                    self._cond.acquire()
            else:
                self._cond.wait(POLL_S)

    def _reap(self) -> None:
        """Process the completions ready now (lock held)."""
        for wc in self.qp.poll(self.ring.slots):
            _count_completion(self.metrics, wc.status_name())
            if not wc.ok:
                raise self._fail(RdmaError(f"RDMA write completed with {wc.status_name()}", "wc_" + wc.status_name()))
            if wc.opcode != WcOpcode.RDMA_WRITE:
                raise self._fail(RdmaError(f"unexpected completion opcode {wc.opcode} on the send queue", "opcode"))
            try:
                self.window.completed(wc.wr_id)
            except CreditError as exc:
                raise self._fail(RdmaError(str(exc), exc.error_type)) from exc

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._aborted:
            raise ConnectionAbortedError("stream aborted")

    def _fail(self, error: RdmaError) -> RdmaError:
        """Record the first RDMA failure, stop the stream, tell the session (re-entrant lock)."""
        with self._cond:
            if self._error is None:
                self._error = error
                self.metrics.rdma_errors.labels(error.error_type).inc()
                log.warning("RDMA stream failed: %s", error,
                            extra={"component": "amst", "error_type": error.error_type})
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)
                if self.on_failure is not None:
                    self.on_failure(error)
            self._cond.notify_all()
            return self._error

    # -- acknowledgements ---------------------------------------------------------------------

    def recv_ack(self, header_buf: bytearray) -> wire.FrameHeader:
        try:
            h = wire.recv_header(self.sock, header_buf)
        except (wire.WireError, OSError):
            self.abort()  # the destination is gone: a sender waiting for credits must not wait it out
            raise
        if h.type == wire.FrameType.CONTROL:
            payload = bytearray(min(h.encoded_len, 1 << 16))
            wire.recv_exact_into(self.sock, memoryview(payload))
            msg = wire.decode_message(h, bytes(payload))
            with self._cond:
                if isinstance(msg, wire.RdmaFailed):
                    raise self._fail(RdmaError(f"destination: {msg.reason}", msg.error_type))
                raise self._fail(RdmaError(f"unexpected {type(msg).__name__} on an RDMA stream", "protocol"))
        if h.type == wire.FrameType.ACK:
            with self._cond:
                try:
                    self.window.credit(h.sequence)
                except CreditError as exc:
                    raise self._fail(RdmaError(str(exc), exc.error_type)) from exc
                self._cond.notify_all()
        return h

    # -- teardown -----------------------------------------------------------------------------

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        _close_stream(self)


class RdmaFrameSource:
    """Destination side of one RDMA stream (a `FrameSource`): frames land in slots, ACKs go out over TCP."""

    transport = "rdma"

    def __init__(self, ctx: VerbsContext, qp: QueuePair, mr: MemoryRegion, slots: int, slot_size: int,
                 sock: socket.socket, metrics: Metrics, wait_timeout: float | None = None) -> None:
        self.ctx = ctx
        self.qp = qp
        self.mr = mr
        self.slot_size = slot_size
        self.sock = sock
        self.metrics = metrics
        self.wait_timeout = wait_timeout
        self.ring = SlotRing(slots)
        self._posted: collections.deque[int] = collections.deque(range(slots))  # receives, posting order
        self._aborted = False
        self._closed = False
        self._error: RdmaError | None = None
        self._payload: memoryview | None = None  # the slot view handed out by recv_payload

    def recv_header(self, header_buf: bytearray) -> wire.FrameHeader:
        deadline = None if self.wait_timeout is None else time.monotonic() + self.wait_timeout
        while (item := self.ring.deliver()) is None:
            if not self._collect() and deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"no frame landed for {self.wait_timeout}s")
        slot, header = item
        offset = slot * self.slot_size
        header_buf[:] = self.mr.view[offset: offset + wire.HEADER_SIZE]
        return header

    def recv_payload(self, out: memoryview) -> memoryview:
        current = self.ring.current
        if current is None or len(out) != current[1].encoded_len:
            raise wire.FrameError("payload read does not match the delivered frame", "bad_length")
        start = current[0] * self.slot_size + wire.HEADER_SIZE
        self._release_payload()
        self._payload = self.mr.view[start: start + len(out)]
        return self._payload

    def _release_payload(self) -> None:
        """The slot is being reused or freed: the view of it handed out must not outlive it."""
        if self._payload is not None:
            with contextlib.suppress(BufferError):  # something still exports it: deregistration reports it
                self._payload.release()
            self._payload = None

    def send_ack(self, header: bytes) -> None:
        try:
            slot = self.ring.release()
            self._release_payload()
            self.qp.post_recv(slot, self.mr)
            self._posted.append(slot)
        except (CreditError, VerbsError) as exc:
            error_type = getattr(exc, "error_type", "post_recv")
            raise self._fail(RdmaError(f"cannot return slot credit: {exc}", error_type)) from exc
        self.metrics.rdma_posted.inc()
        self.sock.sendall(header)

    def _collect(self) -> bool:
        """Land the completions ready now; False (after waiting a little) when there were none."""
        if self._error is not None:
            raise self._error
        if self._aborted:
            raise wire.PeerClosed("stream aborted")
        completions = self.qp.poll(self.ring.slots)
        if not completions:
            self._check_peer()
            self.qp.wait(POLL_S)
            return False
        for wc in completions:
            _count_completion(self.metrics, wc.status_name())
            if not wc.ok:
                raise self._fail(RdmaError(f"receive completed with {wc.status_name()}", "wc_" + wc.status_name()))
            if wc.opcode != WcOpcode.RECV_RDMA_WITH_IMM:
                raise self._fail(RdmaError(f"unexpected completion opcode {wc.opcode}", "opcode"))
            expected = self._posted.popleft() if self._posted else None
            if wc.wr_id != expected:
                raise self._fail(RdmaError(f"receive completion {wc.wr_id} while receive {expected}, posted "
                                           "earlier, never completed", "completion_order"))
            self._land(wc.imm, wc.byte_len)
        return True

    def _land(self, slot: int, byte_len: int) -> None:
        if not 0 <= slot < self.ring.slots:
            raise self._fail(RdmaError(f"immediate names slot {slot}; the ring has {self.ring.slots}", "bad_slot"))
        if not wire.HEADER_SIZE <= byte_len <= self.slot_size:
            raise self._fail(RdmaError(f"write of {byte_len} bytes into a {self.slot_size}-byte slot", "bad_length"))
        offset = slot * self.slot_size
        try:
            # a copy: an error's traceback must not hold a view of the region (it could not be freed)
            header = wire.unpack_header(bytes(self.mr.view[offset: offset + wire.HEADER_SIZE]))
        except wire.FrameError as exc:
            raise self._fail(RdmaError(f"slot {slot} holds no valid frame header: {exc}", "bad_frame")) from exc
        if wire.HEADER_SIZE + header.encoded_len != byte_len:
            raise self._fail(RdmaError(f"slot {slot}: header announces {header.encoded_len} payload bytes, "
                                       f"the write carried {byte_len - wire.HEADER_SIZE}", "bad_length"))
        try:
            self.ring.landed(slot, header)
        except CreditError as exc:
            raise self._fail(RdmaError(str(exc), exc.error_type)) from exc

    def _check_peer(self) -> None:
        """The source closes the connection when it is done or gone; notice it while idle."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if readable and not self.sock.recv(1, socket.MSG_PEEK):
                raise wire.PeerClosed("source closed the stream")
        except (ValueError, OSError) as exc:
            if isinstance(exc, wire.PeerClosed):
                raise
            raise wire.PeerClosed(f"stream connection lost: {exc}") from exc
        if readable:
            raise self._fail(RdmaError("unexpected bytes from the source on an RDMA stream", "protocol"))

    def _fail(self, error: RdmaError) -> RdmaError:
        if self._error is None:
            self._error = error
            self.metrics.rdma_errors.labels(error.error_type).inc()
            log.warning("RDMA stream failed: %s", error, extra={"component": "amst", "error_type": error.error_type})
            with contextlib.suppress(OSError):
                wire.send_message(self.sock, wire.RdmaFailed(str(error), error.error_type))
            self.qp.to_error()
        return self._error

    def abort(self) -> None:
        self._aborted = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        _close_stream(self)


def _close_stream(stream: RdmaDataChannel | RdmaFrameSource) -> None:
    """Once: abort (wakes blocked threads), tear the QP and memory down, close the TCP side."""
    if stream._closed:
        return
    stream._closed = True
    stream.abort()
    if isinstance(stream, RdmaFrameSource):
        stream._release_payload()
    _teardown(stream.ctx, stream.qp, stream.mr)
    stream.sock.close()


def _teardown(ctx: VerbsContext, qp: QueuePair | None, mr: MemoryRegion | None) -> None:
    """QP to ERROR (flushes what is outstanding), destroy it, then deregister its memory."""
    if qp is not None:
        with contextlib.suppress(OSError):
            qp.to_error()
        with contextlib.suppress(OSError):
            qp.close()
    if mr is not None:
        try:
            ctx.deregister(mr)
        except OSError as exc:
            log.warning("RDMA memory region not freed: %s", exc, extra={"component": "amst", "error_type": "dereg"})


# ---------------------------------------------------------------------------------------------
# Setup over the stream's authenticated connection

def connect_source(ctx: VerbsContext, sock: socket.socket, max_frame: int, slots: int, metrics: Metrics,
                   timeout: float, on_failure: Callable[[RdmaError], None] | None = None) -> RdmaDataChannel:
    """Source: offer our QP, get the destination's ring. RdmaDeclined leaves `sock` usable for TCP."""
    slot_size = slot_size_for(max_frame)
    qp: QueuePair | None = None
    mr: MemoryRegion | None = None
    try:
        mr = ctx.register(slots * slot_size)
        qp = ctx.create_qp(send_depth=slots, recv_depth=1)
    except VerbsError as exc:
        _teardown(ctx, qp, mr)
        wire.send_message(sock, wire.RdmaDecline(f"source: {exc}"))
        raise RdmaDeclined(f"this host: {exc}") from exc
    local = qp.endpoint()
    try:
        wire.send_message(sock, wire.RdmaConnect(local.qp_num, local.gid, local.lid, local.psn, local.mtu,
                                                 slot_size, slots))
        reply = wire.recv_message(sock, (wire.RdmaAccept, wire.RdmaDecline))
    except BaseException:
        _teardown(ctx, qp, mr)
        raise
    if isinstance(reply, wire.RdmaDecline):
        _teardown(ctx, qp, mr)
        raise RdmaDeclined(f"destination: {reply.reason}")
    if not (1 <= reply.slots <= slots and max_frame <= reply.slot_size <= slot_size):
        _teardown(ctx, qp, mr)
        raise RdmaError(f"destination offered {reply.slots} slots of {reply.slot_size} bytes; asked for "
                        f"{slots} of {slot_size}", "protocol")
    try:
        qp.connect(QpEndpoint(reply.qp_num, reply.gid, reply.lid, reply.psn, reply.mtu))
    except VerbsError as exc:
        _teardown(ctx, qp, mr)
        metrics.rdma_errors.labels("connect").inc()
        raise RdmaError(f"cannot connect the RC queue pair: {exc}", "connect") from exc
    return RdmaDataChannel(ctx, qp, mr, RemoteRing(reply.addr, reply.rkey, reply.slot_size, reply.slots), sock,
                           metrics, timeout, on_failure)


def accept_destination(ctx: VerbsContext, sock: socket.socket, max_frame: int, max_slots: int,
                       metrics: Metrics) -> RdmaFrameSource:
    """Destination: register the ring, post its receives, connect, answer. RdmaDeclined -> TCP on `sock`."""
    offer = wire.recv_message(sock, (wire.RdmaConnect, wire.RdmaDecline))
    if isinstance(offer, wire.RdmaDecline):
        raise RdmaDeclined(offer.reason)
    slot_size = slot_size_for(max_frame)
    slots = min(offer.slots, max_slots, MAX_SLOTS)
    if offer.slot_size != slot_size or slots < 1:
        reason = f"ring geometry {offer.slots} x {offer.slot_size} bytes does not fit this migration's chunks"
        wire.send_message(sock, wire.RdmaDecline(reason))
        raise RdmaDeclined(f"source asked for a {reason}")
    qp: QueuePair | None = None
    mr: MemoryRegion | None = None
    try:
        mr = ctx.register(slots * slot_size)
        qp = ctx.create_qp(send_depth=1, recv_depth=slots)
        qp.connect(QpEndpoint(offer.qp_num, offer.gid, offer.lid, offer.psn, offer.mtu))
        for slot in range(slots):
            qp.post_recv(slot, mr)
    except VerbsError as exc:
        _teardown(ctx, qp, mr)
        wire.send_message(sock, wire.RdmaDecline(f"destination: {exc}"))
        raise RdmaDeclined(f"this host: {exc}") from exc
    metrics.rdma_posted.inc(slots)
    local = qp.endpoint()
    try:
        wire.send_message(sock, wire.RdmaAccept(local.qp_num, local.gid, local.lid, local.psn, local.mtu, mr.addr,
                                                mr.rkey, slot_size, slots))
    except BaseException:
        _teardown(ctx, qp, mr)
        raise
    return RdmaFrameSource(ctx, qp, mr, slots, slot_size, sock, metrics)


