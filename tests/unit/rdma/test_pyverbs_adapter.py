"""The pyverbs adapter: the real pyverbs from the venv, discovery on this host, and (where a device
with an active port exists) a real RDMA stream over loopback queue pairs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from rdma_support import open_pair, transfer

from dwcp_agent.amst.pyverbs_adapter import NO_DEVICE, PyverbsProvider

NEEDS_DEVICE = "needs an RDMA device with an active port (ibv_devices lists none with one here)"


def test_real_pyverbs_imports_from_the_venv() -> None:
    import pyverbs
    import pyverbs.device

    assert Path(pyverbs.__file__).is_relative_to(Path(sys.prefix)), (
        f"pyverbs comes from {pyverbs.__file__}, not the venv: run tools/link_pyverbs.py (make test does)")
    assert callable(pyverbs.device.get_device_list)


def test_discovery_reports_what_it_found_without_raising() -> None:
    ports, problem = PyverbsProvider().discover()
    if not ports:
        assert problem == NO_DEVICE
    elif not any(p.active for p in ports):
        assert problem.startswith("no active RDMA port (")
    else:
        assert problem == ""


def test_a_named_device_that_does_not_exist_is_reported_by_name() -> None:
    ports, problem = PyverbsProvider("no_such_dev0").discover()
    assert ports == []
    assert "no_such_dev0" in problem and "ibv_devices" in problem


@pytest.fixture
def device() -> PyverbsProvider:
    provider = PyverbsProvider()
    _ports, problem = provider.discover()
    if problem:
        pytest.skip(f"{NEEDS_DEVICE}: {problem}")
    return provider


def test_frames_cross_a_real_device_intact(device: PyverbsProvider) -> None:
    pair = open_pair(device, slots=4)
    try:
        sent, result = transfer(pair, 64, seed=11)
    finally:
        pair.close()
    assert result.errors == []
    assert result.received == sent


def test_queue_pair_in_error_fails_the_real_stream(device: PyverbsProvider) -> None:
    pair = open_pair(device, slots=4)
    try:
        pair.dst.qp.to_error()
        _, _result = transfer(pair, 8, seed=12)
    finally:
        pair.close()
    assert pair.failures
