"""An in-process software verbs provider that keeps the verbs rules the RDMA transport depends on.

Used by the RDMA tests in place of a device (this CI kernel has none, not even soft-RoCE). It is
not a mock: it moves real bytes between registered regions, asynchronously, and enforces what
hardware (and rdma-core's pyverbs, which the agent's adapter goes through) enforces, so protocol
bugs show up as they would on a NIC.

What it models:
- receives: each carries at least one SGE; one with none is refused at post time, as pyverbs
  refuses it ("A WR needs at least one SGE");
- memory regions: reachable only through a live key and inside their bounds, and only with the
  access the region was registered with (a remote write needs IBV_ACCESS_REMOTE_WRITE on the
  region and on the responder QP): LOC_PROT_ERR locally, REM_ACCESS_ERR remotely;
- deregistration: fails with EBUSY while memoryviews of the region's memory are held (the
  adapter's mmap cannot be unmapped then); its keys are dead either way;
- queue pairs: RESET -> INIT -> RTR -> RTS only through `modify`, each step with the attributes
  it needs (invalid transitions: EINVAL); send needs RTS, receive at least INIT; a work request
  that completes in error moves the QP to ERROR (as hardware does), after which every
  outstanding and newly posted request completes with WR_FLUSH_ERR;
- writes are in flight after posting: the local memory is read and the remote memory written
  when the fabric makes progress (on any poll or wait, unless `SoftFabric.hold()` stops the
  link), and the requester's completion arrives one progress step after the data landed;
- RDMA WRITE WITH IMMEDIATE: every packet but the last is placed without a receive; the last
  one consumes a posted receive (FIFO, whatever slot it was posted for) and reports the
  immediate. With none posted the responder answers receiver-not-ready and the requester
  retries that packet: with rnr_retry=7 (the adapter's setting) without limit, with a smaller
  value it fails with RNR_RETRY_EXC_ERR after that many retries (one per progress step);
- completions of one QP come out in the order their work requests were posted;
- a write to a QP that is gone, not connected to us, or not at least RTR gets no
  acknowledgement: RETRY_EXC_ERR; a write breaking the responder's access rules moves the
  responder to ERROR too;
- registrations are charged against a memlock budget, failing with the agent's MemlockError.

What it does not model: packet loss and retransmission timing (`fail_after_writes` on a QP
stands for a link or port failure after that many writes), PSNs, path MTU negotiation beyond
the port MTU, SRQs, inline sends, atomics and reads, CQ overrun, asynchronous events, and the
cost of anything (it is not a performance model).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import mmap
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from dwcp_agent.amst.pyverbs_adapter import RNR_RETRY_INFINITE
from dwcp_agent.amst.verbs import (
    Completion,
    MemoryRegion,
    PortInfo,
    QpEndpoint,
    QpState,
    VerbsError,
    WcOpcode,
    WcStatus,
    memlock_error,
)

ACTIVE_PORT = PortInfo("soft0", 1, True, "ACTIVE", "Ethernet", mtu=4096)
ACCESS_LOCAL_WRITE = 1  # ibv_access_flags values
ACCESS_REMOTE_WRITE = 2
FULL_ACCESS = ACCESS_LOCAL_WRITE | ACCESS_REMOTE_WRITE
NO_SGE = "A WR needs at least one SGE"  # pyverbs' message for a receive without one


class SoftFabric:
    """The shared 'network' between every context of every SoftProvider built on it."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.contexts: dict[bytes, SoftContext] = {}
        self.paused = False
        self._addr = itertools.count(0x7F00_0000_0000, 1 << 32)
        self._qpn = itertools.count(0x100)

    def next_addr(self) -> int:
        return next(self._addr)

    def next_qpn(self) -> int:
        return next(self._qpn) & 0xFFFFFF

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Stop the link: posted writes stay in flight (nothing lands, nothing completes)."""
        with self.lock:
            self.paused = True
        try:
            yield
        finally:
            with self.lock:
                self.paused = False
                self.cond.notify_all()

    def progress(self) -> bool:
        """One step of every QP's send queue; True when anything moved."""
        with self.lock:
            if self.paused:
                return False
            moved = False
            for ctx in list(self.contexts.values()):
                for qp in list(ctx.qps.values()):
                    moved = qp._progress() or moved
            if moved:
                self.cond.notify_all()
            return moved


class SoftProvider:
    """A VerbsProvider over a SoftFabric: `ports` are what discovery reports."""

    name = "soft"

    def __init__(self, fabric: SoftFabric | None = None, ports: tuple[PortInfo, ...] = (ACTIVE_PORT,),
                 memlock: int | None = None) -> None:
        self.fabric = fabric or SoftFabric()
        self.ports = ports
        self.memlock = memlock
        self.locked = 0
        self.still_mapped = 0  # regions deregistered while views of them were held

    def discover(self) -> tuple[list[PortInfo], str]:
        if not self.ports:
            return [], "no RDMA device (ibv_devices lists none)"
        if not any(p.active for p in self.ports):
            return list(self.ports), "no active RDMA port (" + "; ".join(p.describe() for p in self.ports) + ")"
        return list(self.ports), ""

    def memlock_available(self) -> int | None:
        return None if self.memlock is None else max(0, self.memlock - self.locked)

    def open(self, port: PortInfo) -> SoftContext:
        return SoftContext(self, port)


class SoftMR:
    """A registered region over an anonymous mmap (as the adapter's): `view` is its memory."""

    def __init__(self, addr: int, length: int, access: int) -> None:
        self.addr = addr
        self.length = length
        self.access = access
        self._buf = mmap.mmap(-1, max(length, 1))
        self.view = memoryview(self._buf)[:length]
        self.lkey = secrets.randbits(32)
        self.rkey = secrets.randbits(32)

    def contains(self, addr: int, length: int) -> bool:
        return self.addr <= addr and addr + length <= self.addr + self.length

    def unmap(self) -> None:
        """Free the memory; BufferError while views of it are still held."""
        self.view.release()
        self._buf.close()


class SoftContext:
    """An opened soft port: registrations (by key) and queue pairs (by number)."""

    def __init__(self, provider: SoftProvider, port: PortInfo) -> None:
        self.provider = provider
        self.fabric = provider.fabric
        self.gid = secrets.token_bytes(16)
        self.port = PortInfo(port.device, port.port, port.active, port.state, port.link_layer, self.gid,
                             port.gid_index, port.lid, port.mtu)
        self.by_lkey: dict[int, SoftMR] = {}
        self.by_rkey: dict[int, SoftMR] = {}
        self.qps: dict[int, SoftQP] = {}
        with self.fabric.lock:
            self.fabric.contexts[self.gid] = self

    def register(self, length: int, access: int = FULL_ACCESS) -> SoftMR:
        with self.fabric.lock:
            available = self.provider.memlock_available()
            if available is not None and length > available:
                raise memlock_error(length, available)
            mr = SoftMR(self.fabric.next_addr(), length, access)
            self.provider.locked += length
            self.by_lkey[mr.lkey] = mr
            self.by_rkey[mr.rkey] = mr
            return mr

    def deregister(self, mr: MemoryRegion) -> None:
        with self.fabric.lock:
            if self.by_lkey.pop(mr.lkey, None) is None:
                raise VerbsError(errno.EINVAL, "ibv_dereg_mr: not a registered region")
            self.by_rkey.pop(mr.rkey, None)
            self.provider.locked -= mr.length
            assert isinstance(mr, SoftMR)
            try:
                mr.unmap()
            except BufferError as exc:
                self.provider.still_mapped += 1
                raise VerbsError(errno.EBUSY, f"region of {mr.length} bytes deregistered, but views of it are "
                                              f"still held, so it stays mapped: {exc}") from exc

    def create_qp(self, send_depth: int, recv_depth: int) -> SoftQP:
        with self.fabric.lock:
            qp = SoftQP(self, send_depth, recv_depth)
            self.qps[qp.qp_num] = qp
            return qp

    def close(self) -> None:
        with self.fabric.lock:
            for qp in list(self.qps.values()):
                qp.close()
            self.fabric.contexts.pop(self.gid, None)


@dataclass
class _Write:
    """One posted RDMA WRITE WITH IMMEDIATE on its way."""

    wr_id: int
    mr: MemoryRegion
    offset: int
    length: int
    remote_addr: int
    rkey: int
    imm: int
    number: int  # 1-based, in posting order on its QP
    placed: int = 0  # bytes already written at the responder
    attempts: int = 0  # times the last packet was sent (each RNR NAK asks for one more)
    status: int | None = None  # decided; the completion is due at the next progress step
    due: bool = False


class SoftQP:
    """A reliable-connected queue pair with one completion queue."""

    def __init__(self, ctx: SoftContext, send_depth: int, recv_depth: int) -> None:
        self.ctx = ctx
        self.fabric = ctx.fabric
        self.qp_num = self.fabric.next_qpn()
        self.psn = secrets.randbits(24)
        self.send_depth = send_depth
        self.recv_depth = recv_depth
        self._state = QpState.RESET
        self.access = 0
        self.rnr_retry = 0
        self.remote: QpEndpoint | None = None
        self.recvs: collections.deque[int] = collections.deque()
        self.sq: collections.deque[_Write] = collections.deque()
        self.cq: collections.deque[Completion] = collections.deque()
        self.unpolled_sends = 0
        self.writes = 0  # writes posted
        self.executed = 0  # writes that reached the wire
        self.rnr_naks = 0
        self.fail_after_writes: int | None = None  # the link fails for every write posted after that many

    @property
    def state(self) -> QpState:
        return self._state

    def endpoint(self) -> QpEndpoint:
        return QpEndpoint(self.qp_num, self.ctx.gid, 0, self.psn, self.ctx.port.mtu)

    def modify(self, state: QpState, *, access: int | None = None, remote: QpEndpoint | None = None,
               rnr_retry: int | None = None) -> None:
        """ibv_modify_qp: the only way the state moves forward, with each step's attributes."""
        with self.fabric.lock:
            if state == QpState.ERROR:
                self._error()
                return
            if state == QpState.RESET:
                self._error()
                self._state, self.remote, self.access = QpState.RESET, None, 0
                self.cq.clear()
                self.sq.clear()
                self.unpolled_sends = 0
                return
            steps = {QpState.INIT: QpState.RESET, QpState.RTR: QpState.INIT, QpState.RTS: QpState.RTR}
            if steps.get(state) != self._state:
                raise VerbsError(errno.EINVAL, f"ibv_modify_qp: QP {self.qp_num} cannot go {self._state.name} -> "
                                               f"{state.name}")
            if state == QpState.INIT:
                if access is None:
                    raise VerbsError(errno.EINVAL, "ibv_modify_qp(INIT) needs the access flags")
                self.access = access
            elif state == QpState.RTR:
                if remote is None:
                    raise VerbsError(errno.EINVAL, "ibv_modify_qp(RTR) needs the remote QP")
                self.remote = remote
            elif state == QpState.RTS:
                if rnr_retry is None or not 0 <= rnr_retry <= RNR_RETRY_INFINITE:
                    raise VerbsError(errno.EINVAL, "ibv_modify_qp(RTS) needs rnr_retry 0..7")
                self.rnr_retry = rnr_retry
            self._state = state

    def connect(self, remote: QpEndpoint) -> None:
        """What the adapter does: INIT (local and remote write), RTR towards `remote`, RTS."""
        self.modify(QpState.INIT, access=FULL_ACCESS)
        self.modify(QpState.RTR, remote=remote)
        self.modify(QpState.RTS, rnr_retry=RNR_RETRY_INFINITE)

    def post_recv(self, wr_id: int, mr: MemoryRegion | None = None) -> None:
        with self.fabric.lock:
            if mr is None:
                raise VerbsError(errno.EINVAL, f"ibv_post_recv: {NO_SGE}")
            if self._state == QpState.RESET:
                raise VerbsError(errno.EINVAL, "post_recv on a QP in RESET")
            if self._state == QpState.ERROR:
                self._complete(Completion(wr_id, WcStatus.WR_FLUSH_ERR, WcOpcode.RECV_RDMA_WITH_IMM))
                return
            if len(self.recvs) >= self.recv_depth:
                raise VerbsError(errno.ENOMEM, f"receive queue full ({self.recv_depth})")
            self.recvs.append(wr_id)
            self.fabric.cond.notify_all()

    def post_write_imm(self, wr_id: int, mr: MemoryRegion, offset: int, length: int, remote_addr: int,
                       rkey: int, imm: int) -> None:
        with self.fabric.lock:
            if self._state not in (QpState.RTS, QpState.ERROR):
                raise VerbsError(errno.EINVAL, f"post_send on a QP in {self._state.name}")
            if self.unpolled_sends >= self.send_depth:
                raise VerbsError(errno.ENOMEM, f"send queue full ({self.send_depth})")
            if not 0 <= imm < 1 << 32:
                raise VerbsError(errno.EINVAL, "immediate data is 32 bits")
            self.unpolled_sends += 1
            self.writes += 1
            write = _Write(wr_id, mr, offset, length, remote_addr, rkey, imm, self.writes)
            if self._state == QpState.ERROR:
                write.status = WcStatus.WR_FLUSH_ERR
            self.sq.append(write)
            self.fabric.cond.notify_all()

    # -- the wire -----------------------------------------------------------------------------

    def _progress(self) -> bool:
        """Deliver completions that are due, then carry the queued writes as far as they go."""
        moved = False
        for w in self.sq:
            w.due = w.status is not None  # decided in an earlier step: its acknowledgement is back
        while self.sq and self.sq[0].due:
            w = self.sq.popleft()
            assert w.status is not None
            self._complete(Completion(w.wr_id, w.status, WcOpcode.RDMA_WRITE))
            moved = True
        for w in self.sq:
            if w.status is None:
                if self._state != QpState.RTS:
                    w.status = WcStatus.WR_FLUSH_ERR
                else:
                    moved = self._execute(w) or moved
                    if w.status is None:
                        break  # receiver not ready: later writes wait behind it (RC order)
        return moved

    def _execute(self, w: _Write) -> bool:
        """Send what can be sent of `w`; sets w.status once it is decided. True if anything moved."""
        if w.attempts == 0:
            self.executed += 1
            if self.fail_after_writes is not None and w.number > self.fail_after_writes:
                return self._decide(w, WcStatus.RETRY_EXC_ERR)
        local = self.ctx.by_lkey.get(w.mr.lkey)
        if local is not w.mr or w.offset < 0 or not local.contains(local.addr + w.offset, w.length):
            return self._decide(w, WcStatus.LOC_PROT_ERR)
        assert self.remote is not None
        peer_ctx = self.fabric.contexts.get(self.remote.gid)
        peer = peer_ctx.qps.get(self.remote.qp_num) if peer_ctx else None
        if peer is None or peer._state not in (QpState.RTR, QpState.RTS) or peer.remote is None \
                or peer.remote.qp_num != self.qp_num or peer.remote.gid != self.ctx.gid:
            return self._decide(w, WcStatus.RETRY_EXC_ERR)
        target = peer.ctx.by_rkey.get(w.rkey)
        if target is None or not target.contains(w.remote_addr, w.length) \
                or not target.access & ACCESS_REMOTE_WRITE or not peer.access & ACCESS_REMOTE_WRITE:
            peer._error()
            return self._decide(w, WcStatus.REM_ACCESS_ERR)
        mtu = min(self.ctx.port.mtu, self.remote.mtu)
        last_packet = w.length - (w.length - 1) // mtu * mtu if w.length else 0
        self._place(w, local, target, w.length - last_packet)  # first and middle packets need no receive
        w.attempts += 1
        if not peer.recvs:
            self.rnr_naks += 1
            if self.rnr_retry != RNR_RETRY_INFINITE and w.attempts > self.rnr_retry:
                return self._decide(w, WcStatus.RNR_RETRY_EXC_ERR)
            return w.attempts == 1
        self._place(w, local, target, w.length)
        peer._complete(Completion(peer.recvs.popleft(), WcStatus.SUCCESS, WcOpcode.RECV_RDMA_WITH_IMM, w.length,
                                  w.imm))
        w.status = WcStatus.SUCCESS
        return True

    def _place(self, w: _Write, local: SoftMR, target: SoftMR, upto: int) -> None:
        """Copy w's bytes [placed, upto) from local memory (read now) into the responder's region."""
        if upto <= w.placed:
            return
        src = w.offset + w.placed
        dst = w.remote_addr - target.addr + w.placed
        target.view[dst: dst + upto - w.placed] = local.view[src: src + upto - w.placed]
        w.placed = upto

    def _decide(self, w: _Write, status: int) -> bool:
        w.status = status
        if status != WcStatus.SUCCESS:
            self._error()
        return True

    def _complete(self, wc: Completion) -> None:
        self.cq.append(wc)
        self.fabric.cond.notify_all()

    def _error(self) -> None:
        """Enter ERROR: posted receives and undecided writes complete with WR_FLUSH_ERR, in order."""
        if self._state == QpState.ERROR:
            return
        self._state = QpState.ERROR
        while self.recvs:
            self._complete(Completion(self.recvs.popleft(), WcStatus.WR_FLUSH_ERR, WcOpcode.RECV_RDMA_WITH_IMM))
        for w in self.sq:
            if w.status is None:
                w.status = WcStatus.WR_FLUSH_ERR
        self.fabric.cond.notify_all()

    # -- completions --------------------------------------------------------------------------

    def poll(self, max_entries: int) -> list[Completion]:
        with self.fabric.lock:
            self.fabric.progress()
            out = [self.cq.popleft() for _ in range(min(max_entries, len(self.cq)))]
            self.unpolled_sends -= sum(1 for wc in out if wc.opcode == WcOpcode.RDMA_WRITE)
            return out

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.fabric.cond:
            while True:
                moved = self.fabric.progress()
                if self.cq:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                if not moved:
                    self.fabric.cond.wait(remaining)

    def to_error(self) -> None:
        self.modify(QpState.ERROR)

    def close(self) -> None:
        with self.fabric.lock:
            self._error()
            self.ctx.qps.pop(self.qp_num, None)
