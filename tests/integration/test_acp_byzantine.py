"""A real PBFT cluster (4 agent processes on loopback) with one replica made Byzantine through the
test hook (ACP_TEST_BYZANTINE): each behaviour is detected by the honest replicas, counted in
`dwcp_v3_acp_byzantine_detections_total`, and no client of an honest node gets a wrong answer.

Every agent reads its behaviour from a file (`@file`, empty = honest); once the cluster is up the
test writes the behaviour into the file of the current primary (for the behaviours that matter
from a primary) or of a backup, whichever replica start-up made primary.
"""

from __future__ import annotations

import secrets
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from acp_cluster_support import acp_clusters

from dwcp_agent.acp.auth import public_key_hex
from dwcp_agent.acp.pbft.byzantine_faults import HOOK_ENV, HOOK_UNLOCK
from dwcp_agent.client import ApiError, api_call
from dwcp_agent.demo import LocalAgent, free_port

pytestmark = pytest.mark.slow

Cluster = Callable[[], list[LocalAgent]]


@pytest.fixture
def byzantine_cluster(tmp_path: Path) -> Iterator[Cluster]:
    with acp_clusters(tmp_path) as start:
        yield lambda: start(4, "pbft", byzantine_hook=True)


def detections(agent: LocalAgent) -> dict[str, float]:
    text = urllib.request.urlopen(f"{agent.url}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("dwcp_v3_acp_byzantine_detections_total{"):
            labels, value = line.rsplit(" ", 1)
            reason = labels.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = out.get(reason, 0.0) + float(value)
    return out


def make_liar(agents: list[LocalAgent], primary: bool, behaviour: str) -> tuple[LocalAgent, list[LocalAgent]]:
    """Turn the current primary (or a backup) Byzantine; returns it and the honest replicas."""
    deadline = time.monotonic() + 30
    leaders: set[str] = set()
    while time.monotonic() < deadline:
        leaders = {api_call(a.url, "GET", "/api/v3/cluster", timeout=5.0).get("primary", "") for a in agents}
        if len(leaders) == 1 and "" not in leaders:
            break
        time.sleep(0.1)
    assert len(leaders) == 1, leaders
    name = leaders.pop()
    liar = next(a for a in agents if (a.name == name) == primary)
    (liar.state_dir / "lie").write_text(behaviour)
    time.sleep(0.5)  # the hook re-reads its file every 0.2 s
    return liar, [a for a in agents if a is not liar]


def _claim(agent: LocalAgent, vm: str, host: str) -> Any:
    return api_call(agent.url, "POST", f"/api/v3/vms/{vm}/claim", {"host": host}, timeout=15.0)["owner"]


def _owner(agent: LocalAgent, vm: str) -> Any:
    return api_call(agent.url, "GET", f"/api/v3/vms/{vm}/owner", timeout=15.0)["owner"]


def _workload(honest: list[LocalAgent], count: int, deadline_s: float = 60.0) -> None:
    """Claims then reads through every honest node: every answer must be the true one."""
    deadline = time.monotonic() + deadline_s
    for i in range(count):
        node = honest[i % len(honest)]
        while True:
            try:
                assert _claim(node, f"vm-{i}", f"h{i % 3}") == f"h{i % 3}"
                break
            except ApiError as exc:
                assert exc.status == 503, exc  # an unknown outcome may be retried, a refusal may not
                assert time.monotonic() < deadline, f"no progress on vm-{i}"
    for i in range(count):
        assert _owner(honest[(i + 1) % len(honest)], f"vm-{i}") == f"h{i % 3}"


def _wait_detection(honest: list[LocalAgent], reasons: set[str], timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    seen: dict[str, float] = {}
    while time.monotonic() < deadline:
        seen = {}
        for agent in honest:
            for reason, value in detections(agent).items():
                seen[reason] = seen.get(reason, 0.0) + value
        if any(seen.get(r, 0.0) > 0 for r in reasons):
            return seen
        time.sleep(0.2)
    raise AssertionError(f"no detection of {sorted(reasons)} by the honest replicas; saw {seen}")


@pytest.mark.parametrize("behaviour,as_primary,reasons", [
    ("equivocate", True, {"equivocation"}),
    ("forge", False, {"invalid_signature"}),
    ("unsigned", True, {"invalid_signature"}),
    ("wrong_result", False, {"wrong_result"}),
    ("replay", False, {"replay"}),
])
def test_byzantine_replica_is_detected_and_clients_get_true_answers(
        byzantine_cluster: Cluster, behaviour: str, as_primary: bool, reasons: set[str]) -> None:
    _liar, honest = make_liar(byzantine_cluster(), as_primary, behaviour)
    _workload(honest, 12)
    seen = _wait_detection(honest, reasons)
    assert sum(seen.get(r, 0.0) for r in reasons) >= 1


def test_selectively_silent_primary_is_replaced_by_a_view_change(byzantine_cluster: Cluster) -> None:
    """The primary talks to one backup only: the other two never see its pre-prepares, no quorum
    prepares, requests time out, and the honest replicas move to a view it does not lead. Silence
    leaves no evidence to quarantine on; the view change is the detection."""
    agents = byzantine_cluster()
    liar, honest = make_liar(agents, True, "selective")
    before = api_call(honest[0].url, "GET", "/api/v3/cluster", timeout=5.0)["view"]
    _workload(honest, 6)
    views = [api_call(a.url, "GET", "/api/v3/cluster", timeout=5.0) for a in honest]
    assert all(v["view"] > before and v["primary"] != liar.name for v in views), views


def test_byzantine_hook_is_refused_outside_tests(tmp_path: Path) -> None:
    """Without the unlock variable the agent refuses to start instead of lying."""
    psk = tmp_path / "psk"
    psk.write_text(secrets.token_hex(32))
    port = free_port()
    keys = f"a1={public_key_hex(tmp_path / 'a1')},a2={public_key_hex(tmp_path / 'a2')}"
    agent = LocalAgent("a1", tmp_path, psk, {HOOK_ENV: "equivocate", HOOK_UNLOCK: ""},
                       {"acp_port": port, "acp_peers": f"a1=127.0.0.1:{port},a2=127.0.0.1:{free_port()}",
                        "acp_peer_keys": keys, "acp_protocol": "pbft"})
    try:
        with pytest.raises(RuntimeError, match="exited"):
            agent.wait_ready(timeout=60)
        assert "refused outside tests" in agent.log_path.read_text()
    finally:
        agent.stop(timeout=5)
