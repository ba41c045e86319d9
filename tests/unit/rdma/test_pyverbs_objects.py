"""The adapter's pyverbs objects, built by the installed pyverbs (rdma-core) without a device.

Every work request, SGE, QP attribute set and address-handle attribute the adapter hands to
the device is built here through the adapter itself, so pyverbs' own validation runs on the
adapter's real values (a receive without an SGE, a hop limit out of range, a wrong type all
raise in pyverbs). Only what needs an opened device sits on a stub: the QP the work requests are
posted to (it checks their pyverbs types) and the MR under a region.
"""

from __future__ import annotations

import collections
import errno
import mmap
import socket
from types import SimpleNamespace
from typing import Any

import pytest
import pyverbs.enums as e
from pyverbs.addr import AHAttr
from pyverbs.pyverbs_error import PyverbsRDMAError, PyverbsUserError
from pyverbs.qp import QPAttr, QPInitAttr
from pyverbs.wr import RecvWR, SendWR

from dwcp_agent.amst import pyverbs_adapter as adapter
from dwcp_agent.amst.select import default_provider
from dwcp_agent.amst.verbs import PortInfo, QpEndpoint, VerbsError
from dwcp_agent.config import Config

ROCE_PORT = PortInfo("mlx5_0", 1, True, "ACTIVE", "Ethernet", bytes(10) + b"\xff\xff\x0a\x00\x00\x01", 3, 0, 4096)
IB_PORT = PortInfo("mlx5_1", 1, True, "ACTIVE", "InfiniBand", bytes(16), 0, 7, 2048)
REMOTE = QpEndpoint(0x1234, bytes(10) + b"\xff\xff\x0a\x00\x00\x02", 9, 0xABCDE, 4096)


class DeviceQp:
    """Stands in for pyverbs.qp.QP (creating one needs a device): keeps what is posted, type-checked."""

    qp_num = 0x77

    def __init__(self) -> None:
        self.recvs: list[RecvWR] = []
        self.sends: list[SendWR] = []
        self.steps: list[tuple[str, QPAttr]] = []

    def post_recv(self, wr: RecvWR) -> None:
        assert isinstance(wr, RecvWR)
        self.recvs.append(wr)

    def post_send(self, wr: SendWR) -> None:
        assert isinstance(wr, SendWR)
        self.sends.append(wr)

    def to_rtr(self, attr: QPAttr) -> None:
        assert isinstance(attr, QPAttr) and isinstance(attr.ah_attr, AHAttr)
        self.steps.append(("rtr", attr))

    def to_rts(self, attr: QPAttr) -> None:
        assert isinstance(attr, QPAttr)
        self.steps.append(("rts", attr))


def adapter_qp(port: PortInfo, hop_limit: int = 64) -> tuple[adapter.PyverbsQp, DeviceQp]:
    """The adapter's QP over a stub device QP (what __init__ would create needs a device)."""
    qp = adapter.PyverbsQp.__new__(adapter.PyverbsQp)
    device = DeviceQp()
    qp.owner = SimpleNamespace(port=port, hop_limit=hop_limit)  # type: ignore[assignment]
    qp.psn = 0x2468A
    qp.qp = device
    qp._ready = collections.deque()
    return qp, device


REGION = SimpleNamespace(addr=0x7F00_0000_0000, length=1 << 20, lkey=0x1111, rkey=0x2222)


def test_pyverbs_refuses_a_receive_without_an_sge() -> None:
    """The check the adapter once failed on a real NIC: every receive was declined."""
    with pytest.raises(PyverbsUserError, match="at least one SGE"):
        RecvWR(wr_id=0, num_sge=0)


def test_receives_carry_one_zero_length_sge_that_pyverbs_accepts() -> None:
    qp, device = adapter_qp(ROCE_PORT)
    for slot in range(4):
        qp.post_recv(slot, REGION)
    assert [wr.wr_id for wr in device.recvs] == [0, 1, 2, 3]
    assert all(wr.num_sge == 1 for wr in device.recvs)


def test_write_with_immediate_is_a_valid_signaled_rdma_write() -> None:
    qp, device = adapter_qp(ROCE_PORT)
    qp.post_write_imm(5, REGION, 8192, 4000, 0x5000_0000_2000, 0x3333, 5)
    (wr,) = device.sends
    assert (wr.wr_id, wr.num_sge, wr.opcode) == (5, 1, e.IBV_WR_RDMA_WRITE_WITH_IMM)
    assert wr.send_flags == e.IBV_SEND_SIGNALED
    assert wr.imm_data == socket.htonl(5)


def test_queue_pair_init_attributes_are_an_rc_qp_with_the_requested_depths() -> None:
    attr = adapter.qp_init_attr(None, 8, 16)  # the CQ needs a device; pyverbs accepts none here
    assert isinstance(attr, QPInitAttr)
    assert attr.qp_type == e.IBV_QPT_RC
    assert (attr.max_send_wr, attr.max_recv_wr, attr.max_send_sge, attr.max_recv_sge) == (8, 16, 1, 1)


def test_roce_v2_connect_routes_beyond_the_first_router_from_the_configured_gid() -> None:
    qp, device = adapter_qp(ROCE_PORT, hop_limit=32)
    qp.connect(REMOTE)
    (rtr_step, rtr), (rts_step, rts) = device.steps
    assert (rtr_step, rts_step) == ("rtr", "rts")
    ah = rtr.ah_attr
    assert ah.is_global == 1 and ah.port_num == 1
    assert ah.sgid_index == ROCE_PORT.gid_index == 3
    assert ah.hop_limit == 32, "pyverbs' default hop limit of 1 drops routed RoCE v2 at the first router"
    assert str(ah.dgid) == "0000:0000:0000:0000:0000:ffff:0a00:0002"
    assert rtr.qp_access_flags == e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
    assert (rtr.dest_qp_num, rtr.rq_psn, rtr.path_mtu) == (REMOTE.qp_num, REMOTE.psn, e.IBV_MTU_4096)
    assert rts.rnr_retry == adapter.RNR_RETRY_INFINITE == 7
    assert rts.sq_psn == qp.psn


def test_infiniband_connect_uses_the_lid_without_a_global_route() -> None:
    qp, device = adapter_qp(IB_PORT)
    qp.connect(REMOTE)
    rtr = device.steps[0][1]
    assert rtr.ah_attr.is_global == 0 and rtr.ah_attr.dlid == REMOTE.lid
    assert rtr.path_mtu == e.IBV_MTU_2048  # the smaller of the two ports


@pytest.mark.parametrize("hop_limit", [0, 256])
def test_a_hop_limit_pyverbs_cannot_carry_is_refused_by_config(hop_limit: int) -> None:
    from dwcp_agent.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="rdma_hop_limit"):
        load_config(environ={}, overrides={"rdma_hop_limit": hop_limit})


def test_config_reaches_the_provider() -> None:
    provider = default_provider(Config(rdma_device="mlx5_0", rdma_gid_index=2, rdma_hop_limit=16))
    assert isinstance(provider, adapter.PyverbsProvider)
    assert (provider.device, provider.gid_index, provider.hop_limit) == ("mlx5_0", 2, 16)


class DeviceMr:
    """Stands in for pyverbs.mr.MR; `error` is what ibv_dereg_mr fails with."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.closed = False

    def close(self) -> None:
        self.closed = True
        if self.error is not None:
            raise self.error


def region(mr: Any) -> adapter._Region:
    r = adapter._Region.__new__(adapter._Region)
    r._buf = mmap.mmap(-1, 8192)
    r.length = 8192
    r._mr = mr
    r.view = memoryview(r._buf)
    return r


def test_closing_a_region_whose_memory_is_still_viewed_reports_ebusy_not_buffererror() -> None:
    mr = DeviceMr()
    r = region(mr)
    held = r.view[4096:8192]
    with pytest.raises(VerbsError) as info:
        r.close()
    assert info.value.errno == errno.EBUSY
    assert mr.closed, "the MR is deregistered even though the memory stays mapped"
    held.release()
    r.close()  # the views are gone: the memory can go too
    assert r._buf.closed


def test_a_failing_deregistration_is_a_verbs_error() -> None:
    r = region(DeviceMr(PyverbsRDMAError("Failed to dereg MR", errno.EBUSY)))
    with pytest.raises(VerbsError) as info:
        r.close()
    assert info.value.errno == errno.EBUSY and "ibv_dereg_mr" in str(info.value)
    assert r._buf.closed
