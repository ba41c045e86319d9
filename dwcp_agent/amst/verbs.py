"""The verbs-provider interface: the part of libibverbs the RDMA transport uses, and nothing more.

`amst/rdma.py` (slots, credits, ordering, QP-state handling) talks only to these protocols, so the
same protocol code runs over the real device (`pyverbs_adapter.py`) and over the in-process
software provider the tests use. The names and the semantics follow verbs: a memory region is
reachable remotely only through its rkey and only inside its bounds; a reliable-connected QP
moves RESET -> INIT -> RTR -> RTS and, on any failure, to ERROR, after which every outstanding
and newly posted work request completes with a flush error; completions of one QP arrive in
the order their work requests were posted; RDMA WRITE WITH IMMEDIATE consumes one posted
receive at the responder (none posted: receiver-not-ready).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "Completion", "MemlockError", "MemoryRegion", "PortInfo", "QpEndpoint", "QpState", "QueuePair",
    "VerbsContext", "VerbsError", "VerbsProvider", "WcOpcode", "WcStatus",
]


class QpState(enum.IntEnum):
    """ibv_qp_state values."""

    RESET = 0
    INIT = 1
    RTR = 2
    RTS = 3
    ERROR = 6


class WcStatus(enum.IntEnum):
    """The ibv_wc_status values the transport tells apart (others are reported by number)."""

    SUCCESS = 0
    LOC_LEN_ERR = 1
    LOC_QP_OP_ERR = 2
    LOC_PROT_ERR = 4
    WR_FLUSH_ERR = 5
    REM_INV_REQ_ERR = 9
    REM_ACCESS_ERR = 10
    REM_OP_ERR = 11
    RETRY_EXC_ERR = 12
    RNR_RETRY_EXC_ERR = 13


class WcOpcode(enum.IntEnum):
    """ibv_wc_opcode values of the two completions this transport produces."""

    RDMA_WRITE = 1
    RECV_RDMA_WITH_IMM = 129


@dataclass(frozen=True, slots=True)
class Completion:
    """One polled work completion (ibv_wc)."""

    wr_id: int
    status: int
    opcode: int
    byte_len: int = 0
    imm: int = 0

    @property
    def ok(self) -> bool:
        return self.status == WcStatus.SUCCESS

    def status_name(self) -> str:
        try:
            return WcStatus(self.status).name.lower()
        except ValueError:
            return f"status_{self.status}"


@dataclass(frozen=True, slots=True)
class QpEndpoint:
    """What a peer needs to connect an RC QP to ours (exchanged over the control connection)."""

    qp_num: int
    gid: bytes
    lid: int
    psn: int
    mtu: int


@dataclass(frozen=True, slots=True)
class PortInfo:
    """One port of one RDMA device, as discovery saw it."""

    device: str
    port: int
    active: bool
    state: str
    link_layer: str
    gid: bytes = b""
    gid_index: int = 0
    lid: int = 0
    mtu: int = 1024

    def describe(self) -> str:
        return f"{self.device} port {self.port} ({self.link_layer}, {self.state}, mtu {self.mtu})"


class VerbsError(OSError):
    """A verbs call failed (ibv_* returned an error, a QP is in the wrong state, a queue is full)."""


class MemlockError(VerbsError):
    """Registering a buffer pool would exceed RLIMIT_MEMLOCK; the message says how to raise it."""


class MemoryRegion(Protocol):
    """A registered buffer: `view` is the memory itself (writes land there, reads see RDMA writes)."""

    addr: int
    length: int
    lkey: int
    rkey: int
    view: memoryview


class QueuePair(Protocol):
    """A reliable-connected QP with its own completion queue (send and receive completions)."""

    qp_num: int

    @property
    def state(self) -> QpState: ...

    def endpoint(self) -> QpEndpoint:
        """Our side's connection parameters."""
        ...

    def connect(self, remote: QpEndpoint) -> None:
        """RESET -> INIT -> RTR -> RTS towards `remote`; allows remote writes into our regions."""
        ...

    def post_recv(self, wr_id: int, mr: MemoryRegion) -> None:
        """Post a receive with one zero-length SGE in `mr`: one WRITE WITH IMMEDIATE consumes it."""
        ...

    def post_write_imm(self, wr_id: int, mr: MemoryRegion, offset: int, length: int, remote_addr: int,
                       rkey: int, imm: int) -> None:
        """RDMA WRITE WITH IMMEDIATE of mr[offset:offset+length] to remote_addr, signaled."""
        ...

    def poll(self, max_entries: int) -> list[Completion]:
        """Completions ready now, oldest first; never blocks."""
        ...

    def wait(self, timeout: float) -> bool:
        """Block up to `timeout` s (without holding the GIL) until a completion may be ready."""
        ...

    def to_error(self) -> None:
        """Move to ERROR: outstanding work requests complete with WR_FLUSH_ERR."""
        ...

    def close(self) -> None: ...


class VerbsContext(Protocol):
    """An opened device port with its protection domain."""

    port: PortInfo

    def register(self, length: int) -> MemoryRegion:
        """Allocate and register `length` bytes with local and remote write access."""
        ...

    def deregister(self, mr: MemoryRegion) -> None:
        """Deregister and free; VerbsError (EBUSY) while memoryviews of `mr.view` are still held."""
        ...

    def create_qp(self, send_depth: int, recv_depth: int) -> QueuePair: ...

    def close(self) -> None: ...


class VerbsProvider(Protocol):
    """Where RDMA devices come from: pyverbs on a real host, the software provider in tests."""

    name: str

    def discover(self) -> tuple[list[PortInfo], str]:
        """(ports, problem): every port seen, and why RDMA cannot be used ('' when a port is active)."""
        ...

    def memlock_available(self) -> int | None:
        """Bytes this process may still lock for registrations; None when unlimited."""
        ...

    def open(self, port: PortInfo) -> VerbsContext: ...


# ---------------------------------------------------------------------------------------------
# Locked memory: registered buffers are pinned and count against RLIMIT_MEMLOCK

CAP_IPC_LOCK = 14
MEMLOCK_ADVICE = ("raise it: systemd unit LimitMEMLOCK=infinity (the shipped dwcp-agent.service sets it); "
                  "Kubernetes: the DaemonSet adds the IPC_LOCK capability; shell: ulimit -l unlimited "
                  "(or a memlock line in /etc/security/limits.conf)")


def memlock_available(status_text: str | None = None, limit: int | None = None) -> int | None:
    """Bytes this process may still lock (None = unlimited: RLIM_INFINITY or CAP_IPC_LOCK).

    The kernel charges registrations against RLIMIT_MEMLOCK unless the process holds
    CAP_IPC_LOCK; pages already locked (VmLck) count against the same limit."""
    import resource

    if status_text is None:
        try:
            with open("/proc/self/status") as f:
                status_text = f.read()
        except OSError:
            status_text = ""
    fields = dict(line.split(":", 1) for line in status_text.splitlines() if ":" in line)
    cap_eff = int(fields.get("CapEff", "0").strip() or "0", 16)
    if cap_eff >> CAP_IPC_LOCK & 1:
        return None
    if limit is None:
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        if soft == resource.RLIM_INFINITY:
            return None
        limit = soft
    locked_kb = int((fields.get("VmLck", "0 kB").split() or ["0"])[0])
    return max(0, limit - locked_kb * 1024)


def memlock_error(needed: int, available: int) -> MemlockError:
    """The error for a pool that does not fit: how much, the limit, and how to raise it."""
    return MemlockError(f"RDMA buffer pool needs {_mib(needed)} of locked memory but RLIMIT_MEMLOCK leaves "
                        f"{_mib(available)}; {MEMLOCK_ADVICE}")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
