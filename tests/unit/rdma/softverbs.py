"""An in-process software verbs provider that keeps the verbs rules the RDMA transport depends on.

Used by the RDMA tests in place of a device (this CI kernel has none, not even soft-RoCE). It is
not a mock: it moves real bytes between registered regions and enforces what hardware enforces,
so protocol bugs show up as they would on a NIC:
- a memory region is reachable only through a live key and only inside its bounds
  (LOC_PROT_ERR locally, REM_ACCESS_ERR remotely);
- a reliable-connected QP must be RTS to send and at least RTR to receive; after any error it is
  in ERROR and every posted or newly posted work request completes with WR_FLUSH_ERR;
- completions of one QP come out in the order their work requests were posted;
- RDMA WRITE WITH IMMEDIATE consumes one posted receive at the responder and reports the
  immediate there; with no receive posted the write fails with RNR_RETRY_EXC_ERR (retries happen
  instantly here, so receiver-not-ready is fatal, as with an exhausted rnr_retry);
- a write to a QP that is gone or in ERROR gets no acknowledgement: RETRY_EXC_ERR;
- registrations are charged against a memlock budget, failing with the agent's MemlockError.
Writes execute synchronously in the posting thread; waits block on a Condition (GIL released).
`fail_after_writes` on a QP models a link or port failure after that many writes.
"""

from __future__ import annotations

import collections
import errno
import itertools
import secrets
import threading

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


class SoftFabric:
    """The shared 'network' between every context of every SoftProvider built on it."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.contexts: dict[bytes, SoftContext] = {}
        self._addr = itertools.count(0x7F00_0000_0000, 1 << 32)
        self._qpn = itertools.count(0x100)

    def next_addr(self) -> int:
        return next(self._addr)

    def next_qpn(self) -> int:
        return next(self._qpn) & 0xFFFFFF


class SoftProvider:
    """A VerbsProvider over a SoftFabric: `ports` are what discovery reports."""

    name = "soft"

    def __init__(self, fabric: SoftFabric | None = None, ports: tuple[PortInfo, ...] = (ACTIVE_PORT,),
                 memlock: int | None = None) -> None:
        self.fabric = fabric or SoftFabric()
        self.ports = ports
        self.memlock = memlock
        self.locked = 0

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
    """A registered region: `view` is its memory; keys die on deregistration."""

    def __init__(self, addr: int, length: int) -> None:
        self.addr = addr
        self.length = length
        self.buf = bytearray(length)
        self.view = memoryview(self.buf)
        self.lkey = secrets.randbits(32)
        self.rkey = secrets.randbits(32)

    def contains(self, addr: int, length: int) -> bool:
        return self.addr <= addr and addr + length <= self.addr + self.length


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

    def register(self, length: int) -> MemoryRegion:
        with self.fabric.lock:
            available = self.provider.memlock_available()
            if available is not None and length > available:
                raise memlock_error(length, available)
            mr = SoftMR(self.fabric.next_addr(), length)
            self.provider.locked += length
            self.by_lkey[mr.lkey] = mr
            self.by_rkey[mr.rkey] = mr
            return mr

    def deregister(self, mr: MemoryRegion) -> None:
        with self.fabric.lock:
            if self.by_lkey.pop(mr.lkey, None) is not None:
                self.by_rkey.pop(mr.rkey, None)
                self.provider.locked -= mr.length

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
        self.remote: QpEndpoint | None = None
        self.recvs: collections.deque[int] = collections.deque()
        self.cq: collections.deque[Completion] = collections.deque()
        self.cond = threading.Condition(self.fabric.lock)
        self.unpolled_sends = 0
        self.writes = 0
        self.fail_after_writes: int | None = None

    @property
    def state(self) -> QpState:
        return self._state

    def endpoint(self) -> QpEndpoint:
        return QpEndpoint(self.qp_num, self.ctx.gid, 0, self.psn, self.ctx.port.mtu)

    def connect(self, remote: QpEndpoint) -> None:
        with self.fabric.lock:
            if self._state != QpState.RESET:
                raise VerbsError(errno.EINVAL, f"QP {self.qp_num} is {self._state.name}, not RESET")
            self.remote = remote
            self._state = QpState.RTS  # RESET -> INIT -> RTR -> RTS in one step

    def post_recv(self, wr_id: int) -> None:
        with self.fabric.lock:
            if self._state == QpState.RESET:
                raise VerbsError(errno.EINVAL, "post_recv on a QP in RESET")
            if self._state == QpState.ERROR:
                self._complete(Completion(wr_id, WcStatus.WR_FLUSH_ERR, WcOpcode.RECV_RDMA_WITH_IMM))
                return
            if len(self.recvs) >= self.recv_depth:
                raise VerbsError(errno.ENOMEM, f"receive queue full ({self.recv_depth})")
            self.recvs.append(wr_id)

    def post_write_imm(self, wr_id: int, mr: MemoryRegion, offset: int, length: int, remote_addr: int,
                       rkey: int, imm: int) -> None:
        with self.fabric.lock:
            if self._state == QpState.ERROR:
                self._complete(Completion(wr_id, WcStatus.WR_FLUSH_ERR, WcOpcode.RDMA_WRITE))
                return
            if self._state != QpState.RTS:
                raise VerbsError(errno.EINVAL, f"post_send on a QP in {self._state.name}")
            if self.unpolled_sends >= self.send_depth:
                raise VerbsError(errno.ENOMEM, f"send queue full ({self.send_depth})")
            if not 0 <= imm < 1 << 32:
                raise VerbsError(errno.EINVAL, "immediate data is 32 bits")
            self.unpolled_sends += 1
            self._complete(Completion(wr_id, self._execute(mr, offset, length, remote_addr, rkey, imm),
                                      WcOpcode.RDMA_WRITE))

    def _execute(self, mr: MemoryRegion, offset: int, length: int, remote_addr: int, rkey: int, imm: int) -> int:
        """Carry one write to the responder; returns the requester's completion status."""
        self.writes += 1
        if self.fail_after_writes is not None and self.writes > self.fail_after_writes:
            return self._error(WcStatus.RETRY_EXC_ERR)
        local = self.ctx.by_lkey.get(mr.lkey)
        if local is not mr or offset < 0 or not local.contains(local.addr + offset, length):
            return self._error(WcStatus.LOC_PROT_ERR)
        assert self.remote is not None
        peer_ctx = self.fabric.contexts.get(self.remote.gid)
        peer = peer_ctx.qps.get(self.remote.qp_num) if peer_ctx else None
        if peer is None or peer._state not in (QpState.RTR, QpState.RTS) or peer.remote is None \
                or peer.remote.qp_num != self.qp_num or peer.remote.gid != self.ctx.gid:
            return self._error(WcStatus.RETRY_EXC_ERR)
        target = peer.ctx.by_rkey.get(rkey)
        if target is None or not target.contains(remote_addr, length):
            peer._error(WcStatus.SUCCESS)
            return self._error(WcStatus.REM_ACCESS_ERR)
        if not peer.recvs:
            return self._error(WcStatus.RNR_RETRY_EXC_ERR)
        start = remote_addr - target.addr
        target.view[start: start + length] = local.view[offset: offset + length]
        peer._complete(Completion(peer.recvs.popleft(), WcStatus.SUCCESS, WcOpcode.RECV_RDMA_WITH_IMM, length, imm))
        return WcStatus.SUCCESS

    def _complete(self, wc: Completion) -> None:
        self.cq.append(wc)
        self.cond.notify_all()

    def _error(self, status: int) -> int:
        """Move to ERROR (flushing posted receives); returns `status` for the failing request."""
        if self._state != QpState.ERROR:
            self._state = QpState.ERROR
            while self.recvs:
                self._complete(Completion(self.recvs.popleft(), WcStatus.WR_FLUSH_ERR, WcOpcode.RECV_RDMA_WITH_IMM))
            self.cond.notify_all()
        return status

    def poll(self, max_entries: int) -> list[Completion]:
        with self.fabric.lock:
            out = [self.cq.popleft() for _ in range(min(max_entries, len(self.cq)))]
            self.unpolled_sends -= sum(1 for wc in out if wc.opcode == WcOpcode.RDMA_WRITE)
            return out

    def wait(self, timeout: float) -> bool:
        with self.cond:
            if not self.cq:
                self.cond.wait(timeout)
            return bool(self.cq)

    def to_error(self) -> None:
        with self.fabric.lock:
            self._error(WcStatus.WR_FLUSH_ERR)

    def close(self) -> None:
        with self.fabric.lock:
            self._error(WcStatus.WR_FLUSH_ERR)
            self.ctx.qps.pop(self.qp_num, None)
