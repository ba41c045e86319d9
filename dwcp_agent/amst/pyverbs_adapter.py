"""The verbs provider over rdma-core's pyverbs: device discovery plus a thin QP/MR/CQ adapter.

Only translation lives here (pyverbs objects and errors to `amst.verbs`); slots, credits and
failure handling are in `amst/rdma.py`, which the tests run against a software provider. pyverbs
is imported lazily: an agent without python3-pyverbs still starts, and discovery says what is
missing. Buffers are anonymous mmaps (page aligned) registered by address, so `view` is the
registered memory itself and frames are read without a copy.

Every pyverbs object the adapter hands to the device is built by the module-level functions
below (`recv_wr`, `write_wr`, `qp_init_attr`, `rtr_attr`, `rts_attr`), so a test can build
them from the installed pyverbs without a device and let pyverbs' own checks run. Two such
checks shaped them: a receive needs at least one SGE (ours is zero-length: a WRITE WITH
IMMEDIATE places no data in the receive buffer), and a routed RoCE v2 path needs a hop limit
above pyverbs' default of 1.

Completion waiting: pyverbs exposes no completion-channel descriptor to select on, and its
blocking calls do not release the GIL, so `wait` polls the CQ and sleeps between polls
(time.sleep releases the GIL), backing off from 20 us to 1 ms.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import mmap
import os
import socket
import time
from typing import Any

from dwcp_agent.amst.verbs import (
    Completion,
    PortInfo,
    QpEndpoint,
    QpState,
    VerbsError,
    memlock_available,
    memlock_error,
)

__all__ = ["NO_DEVICE", "PyverbsProvider"]

NO_DEVICE = "no RDMA device (ibv_devices lists none)"
NOT_INSTALLED = ("pyverbs is not importable ({}); install python3-pyverbs (rdma-core) and run "
                 "tools/link_pyverbs.py (make does both)")
# enum ibv_mtu: 1 -> 256 bytes ... 5 -> 4096 bytes
MTU_BYTES = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}
MTU_ENUM = {v: k for k, v in MTU_BYTES.items()}
MIN_SLEEP_S = 20e-6
MAX_SLEEP_S = 1e-3
DEFAULT_HOP_LIMIT = 64
RNR_RETRY_INFINITE = 7  # rnr_retry 7: retry receiver-not-ready without limit
AUTO_GID = -1


def _verbs_error(exc: Exception, what: str) -> VerbsError:
    code = getattr(exc, "error_code", 0) or errno.EIO
    return VerbsError(abs(int(code)), f"{what}: {exc}")


def _access_flags() -> int:
    import pyverbs.enums as e

    return int(e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE)


def recv_wr(wr_id: int, addr: int, lkey: int) -> Any:
    """A receive for one WRITE WITH IMMEDIATE: one zero-length SGE (pyverbs refuses zero SGEs)."""
    from pyverbs.wr import SGE, RecvWR

    return RecvWR(wr_id=wr_id, num_sge=1, sg=[SGE(addr, 0, lkey)])


def write_wr(wr_id: int, addr: int, length: int, lkey: int, remote_addr: int, rkey: int, imm: int) -> Any:
    """A signaled RDMA WRITE WITH IMMEDIATE of [addr, addr+length) to remote_addr."""
    import pyverbs.enums as e
    from pyverbs.wr import SGE, SendWR

    wr = SendWR(wr_id=wr_id, opcode=e.IBV_WR_RDMA_WRITE_WITH_IMM, num_sge=1, sg=[SGE(addr, length, lkey)],
                send_flags=e.IBV_SEND_SIGNALED, imm_data=socket.htonl(imm))
    wr.set_wr_rdma(rkey, remote_addr)
    return wr


def qp_init_attr(cq: Any, send_depth: int, recv_depth: int) -> Any:
    """An RC QP, one SGE each way, both directions completing on `cq`."""
    import pyverbs.enums as e
    from pyverbs.qp import QPCap, QPInitAttr

    cap = QPCap(max_send_wr=send_depth, max_recv_wr=recv_depth, max_send_sge=1, max_recv_sge=1)
    return QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=cap)


def rtr_attr(port: PortInfo, remote: QpEndpoint, hop_limit: int) -> Any:
    """INIT and RTR attributes towards `remote` (RoCE: a global route from our GID index)."""
    from pyverbs.addr import GID, AHAttr, GlobalRoute
    from pyverbs.qp import QPAttr

    attr = QPAttr(port_num=port.port)
    attr.qp_access_flags = _access_flags()
    attr.path_mtu = MTU_ENUM.get(min(port.mtu, remote.mtu), 3)
    attr.dest_qp_num = remote.qp_num
    attr.rq_psn = remote.psn
    attr.max_dest_rd_atomic = 1
    attr.min_rnr_timer = 12
    if port.link_layer == "Ethernet":
        route = GlobalRoute(dgid=GID(_gid_text(remote.gid)), sgid_index=port.gid_index)
        route.hop_limit = hop_limit
        attr.ah_attr = AHAttr(port_num=port.port, is_global=1, gr=route, dlid=remote.lid)
    else:
        attr.ah_attr = AHAttr(port_num=port.port, dlid=remote.lid)
    return attr


def rts_attr(attr: Any, psn: int) -> Any:
    """Adds the RTS attributes: retries (rnr_retry=7 retries receiver-not-ready without limit)."""
    attr.timeout = 14
    attr.retry_cnt = 7
    attr.rnr_retry = RNR_RETRY_INFINITE
    attr.sq_psn = psn
    attr.max_rd_atomic = 1
    return attr


def _gid_bytes(gid: Any) -> bytes:
    text = str(getattr(gid, "gid", gid))
    return bytes.fromhex(text.replace(":", ""))


def _gid_text(raw: bytes) -> str:
    h = raw.hex()
    return ":".join(h[i: i + 4] for i in range(0, 32, 4))


class PyverbsProvider:
    """Real devices through pyverbs (rdma-core)."""

    name = "pyverbs"

    def __init__(self, device: str = "", gid_index: int = AUTO_GID, hop_limit: int = DEFAULT_HOP_LIMIT) -> None:
        self.device = device
        self.gid_index = gid_index
        self.hop_limit = hop_limit

    def discover(self) -> tuple[list[PortInfo], str]:
        try:
            import pyverbs.device as d
        except ImportError as exc:
            return [], NOT_INSTALLED.format(exc)
        try:
            devices = d.get_device_list()
        except Exception:  # PyverbsRDMAError "Failed to get devices list": kernel without RDMA
            devices = []
        names = [dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name) for dev in devices]
        if self.device:
            if self.device not in names:
                return [], f"RDMA device {self.device!r} not found (ibv_devices lists: {', '.join(names) or 'none'})"
            names = [self.device]
        if not names:
            return [], NO_DEVICE
        ports: list[PortInfo] = []
        for name in names:
            ports.extend(_device_ports(name, self.gid_index))
        if not any(p.active for p in ports):
            return ports, "no active RDMA port (" + "; ".join(p.describe() for p in ports) + ")"
        return ports, ""

    def memlock_available(self) -> int | None:
        return memlock_available()

    def open(self, port: PortInfo) -> PyverbsContext:
        return PyverbsContext(port, self.hop_limit)


def _device_ports(name: str, gid_index: int = AUTO_GID) -> list[PortInfo]:
    import pyverbs.device as d
    import pyverbs.enums as e

    try:
        ctx = d.Context(name=name)
    except Exception as exc:
        return [PortInfo(name, 0, False, f"cannot open: {exc}", "unknown")]
    try:
        ports = []
        for port in range(1, ctx.query_device().phys_port_cnt + 1):
            pa = ctx.query_port(port)
            ethernet = pa.link_layer == e.IBV_LINK_LAYER_ETHERNET
            if gid_index == AUTO_GID:
                index, gid = _pick_gid(ctx, port, pa.gid_tbl_len, ethernet)
            elif gid_index < pa.gid_tbl_len:
                index, gid = gid_index, _gid_bytes(ctx.query_gid(port, gid_index))
            else:
                ports.append(PortInfo(name, port, False, f"rdma_gid_index {gid_index} is beyond the GID table "
                                      f"({pa.gid_tbl_len} entries)", "Ethernet" if ethernet else "InfiniBand"))
                continue
            ports.append(PortInfo(name, port, pa.state == e.IBV_PORT_ACTIVE, d.port_state_to_str(pa.state),
                                  "Ethernet" if ethernet else "InfiniBand", gid, index, pa.lid,
                                  MTU_BYTES.get(pa.active_mtu, 1024)))
        return ports
    except Exception as exc:
        return [PortInfo(name, 0, False, f"cannot query: {exc}", "unknown")]
    finally:
        ctx.close()


def _pick_gid(ctx: Any, port: int, table_len: int, ethernet: bool) -> tuple[int, bytes]:
    """InfiniBand: GID 0. RoCE: the first RoCE v2 GID with an IPv4-mapped address (routable), else GID 0."""
    first = (0, _gid_bytes(ctx.query_gid(port, 0)))
    if not ethernet:
        return first
    import pyverbs.enums as e

    for index in range(table_len):
        try:
            raw = _gid_bytes(ctx.query_gid(port, index))
            roce_v2 = ctx.query_gid_type(port, index) == e.IBV_GID_TYPE_SYSFS_ROCE_V2
        except Exception:
            continue
        if roce_v2 and raw[:12] == b"\0" * 10 + b"\xff\xff":
            return index, raw
    return first


class _Region:
    """An mmap registered as one MR; `view` is that memory.

    Closing deregisters the MR and unmaps the memory. An mmap cannot be closed while memoryviews
    of it are alive (BufferError): the region then reports EBUSY, its keys are already dead, and
    the memory is unmapped when the last view goes."""

    def __init__(self, pd: Any, length: int) -> None:
        from pyverbs.mr import MR

        self._buf = mmap.mmap(-1, length)
        self._anchor = ctypes.c_char.from_buffer(self._buf)
        self.addr = ctypes.addressof(self._anchor)
        self.length = length
        try:
            self._mr = MR(pd, length, _access_flags(), address=self.addr)
        except Exception as exc:
            del self._anchor
            self._buf.close()
            if getattr(exc, "error_code", 0) in (errno.ENOMEM, -errno.ENOMEM):
                raise memlock_error(length, memlock_available() or 0) from exc
            raise _verbs_error(exc, "ibv_reg_mr") from exc
        self.lkey: int = self._mr.lkey
        self.rkey: int = self._mr.rkey
        self.view = memoryview(self._buf)

    def close(self) -> None:
        if self._buf.closed:
            return
        self.view.release()
        failure: VerbsError | None = None
        try:
            self._mr.close()
        except Exception as exc:  # PyverbsRDMAError from ibv_dereg_mr
            failure = _verbs_error(exc, "ibv_dereg_mr")
        with contextlib.suppress(AttributeError):
            del self._anchor
        try:
            self._buf.close()
        except BufferError as exc:
            failure = failure or VerbsError(errno.EBUSY, f"region of {self.length} bytes deregistered, but views "
                                                         f"of it are still held, so it stays mapped: {exc}")
        if failure is not None:
            raise failure


class PyverbsContext:
    """An opened device port with its protection domain."""

    def __init__(self, port: PortInfo, hop_limit: int = DEFAULT_HOP_LIMIT) -> None:
        from pyverbs.device import Context
        from pyverbs.pd import PD

        self.port = port
        self.hop_limit = hop_limit
        try:
            self.ctx = Context(name=port.device)
            self.pd = PD(self.ctx)
        except Exception as exc:
            raise _verbs_error(exc, f"opening {port.device}") from exc

    def register(self, length: int) -> _Region:
        available = memlock_available()
        if available is not None and length > available:
            raise memlock_error(length, available)
        return _Region(self.pd, length)

    def deregister(self, mr: Any) -> None:
        mr.close()

    def create_qp(self, send_depth: int, recv_depth: int) -> PyverbsQp:
        return PyverbsQp(self, send_depth, recv_depth)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.pd.close()
        with contextlib.suppress(Exception):
            self.ctx.close()


class PyverbsQp:
    """An RC QP with one CQ for both directions."""

    def __init__(self, owner: PyverbsContext, send_depth: int, recv_depth: int) -> None:
        from pyverbs.cq import CQ
        from pyverbs.qp import QP

        self.owner = owner
        self.psn = int.from_bytes(os.urandom(3), "little")
        self._ready: collections.deque[Completion] = collections.deque()
        try:
            self.cq = CQ(owner.ctx, send_depth + recv_depth + 1)
            self.qp = QP(owner.pd, qp_init_attr(self.cq, send_depth, recv_depth))
        except Exception as exc:
            raise _verbs_error(exc, "creating an RC queue pair") from exc
        self.qp_num: int = self.qp.qp_num

    @property
    def state(self) -> QpState:
        """The device's view (ibv_query_qp): pyverbs' qp_state only follows our own modify calls."""
        import pyverbs.enums as e

        try:
            attr, _ = self.qp.query(e.IBV_QP_STATE)
            return QpState(attr.qp_state)
        except Exception:
            return QpState.ERROR

    def endpoint(self) -> QpEndpoint:
        p = self.owner.port
        return QpEndpoint(self.qp_num, p.gid, p.lid, self.psn, p.mtu)

    def connect(self, remote: QpEndpoint) -> None:
        try:
            attr = rtr_attr(self.owner.port, remote, self.owner.hop_limit)
            self.qp.to_rtr(attr)
            self.qp.to_rts(rts_attr(attr, self.psn))
        except Exception as exc:
            raise _verbs_error(exc, "connecting the queue pair") from exc

    def post_recv(self, wr_id: int, mr: Any) -> None:
        try:
            self.qp.post_recv(recv_wr(wr_id, mr.addr, mr.lkey))
        except Exception as exc:
            raise _verbs_error(exc, "ibv_post_recv") from exc

    def post_write_imm(self, wr_id: int, mr: Any, offset: int, length: int, remote_addr: int, rkey: int,
                       imm: int) -> None:
        try:
            self.qp.post_send(write_wr(wr_id, mr.addr + offset, length, mr.lkey, remote_addr, rkey, imm))
        except Exception as exc:
            raise _verbs_error(exc, "ibv_post_send") from exc

    def _poll_cq(self, max_entries: int) -> None:
        try:
            _, wcs = self.cq.poll(max_entries)
        except Exception as exc:
            raise _verbs_error(exc, "ibv_poll_cq") from exc
        for wc in wcs:
            self._ready.append(Completion(wc.wr_id, wc.status, wc.opcode, wc.byte_len, socket.ntohl(wc.imm_data)))

    def poll(self, max_entries: int) -> list[Completion]:
        if len(self._ready) < max_entries:
            self._poll_cq(max_entries - len(self._ready))
        return [self._ready.popleft() for _ in range(min(max_entries, len(self._ready)))]

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        sleep = MIN_SLEEP_S
        while not self._ready:
            self._poll_cq(16)
            if self._ready or time.monotonic() >= deadline:
                break
            time.sleep(sleep)
            sleep = min(sleep * 2, MAX_SLEEP_S)
        return bool(self._ready)

    def to_error(self) -> None:
        import pyverbs.enums as e
        from pyverbs.qp import QPAttr

        try:
            self.qp.modify(QPAttr(qp_state=e.IBV_QPS_ERR), e.IBV_QP_STATE)
        except Exception as exc:
            raise _verbs_error(exc, "moving the queue pair to ERROR") from exc

    def close(self) -> None:
        for obj in (self.qp, self.cq):
            with contextlib.suppress(Exception):
                obj.close()
