"""The agent process on a host as it is: TRANSPORT_MODE=auto picks a transport and says why;
rdma_only without usable RDMA refuses to start and names what is missing."""

from __future__ import annotations

import secrets
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from dwcp_agent.amst.pyverbs_adapter import PyverbsProvider
from dwcp_agent.client import api_call
from dwcp_agent.demo import LocalAgent

HOST_RDMA_PROBLEM = PyverbsProvider().discover()[1]


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[LocalAgent]]:
    started: list[LocalAgent] = []
    yield started
    for agent in started:
        agent.stop(timeout=5)


def start(tmp_path: Path, agents: list[LocalAgent], mode: str) -> LocalAgent:
    psk = tmp_path / "psk"
    psk.write_text(secrets.token_hex(32))
    agent = LocalAgent("a", tmp_path, psk, env={"TRANSPORT_MODE": mode})
    agents.append(agent)
    return agent


def test_auto_reports_the_transport_and_the_reason_in_health_metrics_and_log(tmp_path: Path,
                                                                            agents: list[LocalAgent]) -> None:
    agent = start(tmp_path, agents, "auto")
    agent.wait_ready()
    amst = api_call(agent.url, "GET", "/health/amst")
    assert amst["transport_mode"] == "auto"
    if HOST_RDMA_PROBLEM:
        assert amst["transport"] == "tcp"
        assert amst["rdma"] == HOST_RDMA_PROBLEM  # e.g. "no RDMA device (ibv_devices lists none)"
    else:
        assert amst["transport"] == "rdma"
    with urllib.request.urlopen(agent.url + "/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    assert f'dwcp_v3_transport_info{{transport="{amst["transport"]}"}} 1.0' in metrics
    log = agent.log_path.read_text()
    assert f"transport: {amst['transport']} ({amst['rdma']})" in log


@pytest.mark.skipif(not HOST_RDMA_PROBLEM, reason="this host has a usable RDMA device")
def test_rdma_only_without_usable_rdma_exits_nonzero_naming_what_is_missing(tmp_path: Path,
                                                                           agents: list[LocalAgent]) -> None:
    agent = start(tmp_path, agents, "rdma_only")
    assert agent.proc is not None
    code = agent.proc.wait(timeout=60)
    assert code != 0
    log = agent.log_path.read_text()
    assert "transport_mode=rdma_only but this host cannot use RDMA" in log
    assert HOST_RDMA_PROBLEM in log
    assert list(agent.images.iterdir()) == []
