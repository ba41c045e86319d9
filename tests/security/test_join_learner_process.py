"""Membership through the authenticated admin API, with real agent processes: a member added with
its key joins as a learner over the pinned-key transport, is promoted once caught up, and serves
linearizable reads; a ghost stays a learner and the cluster keeps committing."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dwcp_agent.acp.auth import public_key_hex
from dwcp_agent.client import ApiError, api_call
from dwcp_agent.demo import LocalAgent, free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[LocalAgent]]:
    started: list[LocalAgent] = []
    yield started
    for agent in started:
        agent.stop(timeout=5)


def _wait(predicate: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except (ApiError, KeyError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_join_as_learner_then_voter_over_pinned_keys(tmp_path: Path, agents: list[LocalAgent]) -> None:
    psk = tmp_path / "psk"
    psk.write_text(secrets.token_hex(32))
    p1, p2 = free_port(), free_port()
    k1, k2 = public_key_hex(tmp_path / "a1"), public_key_hex(tmp_path / "a2")
    first = LocalAgent("a1", tmp_path, psk, settings={
        "acp_port": str(p1), "acp_peers": f"a1=127.0.0.1:{p1}", "acp_peer_keys": f"a1={k1}", "acp_protocol": "raft"})
    agents.append(first)
    first.wait_ready()
    _wait(lambda: api_call(first.url, "GET", "/api/v3/cluster")["leader"] == "a1", "a1 to lead")
    api_call(first.url, "POST", "/api/v3/vms/before/claim", {"host": "h1"}, timeout=10)
    joiner = LocalAgent("a2", tmp_path, psk, settings={
        "acp_port": str(p2), "acp_peers": f"a1=127.0.0.1:{p1}", "acp_peer_keys": f"a1={k1}", "acp_protocol": "raft"})
    agents.append(joiner)
    joiner.wait_ready()
    joined = api_call(first.url, "POST", "/api/v3/cluster/join",
                      {"node_id": "a2", "addr": f"127.0.0.1:{p2}", "public_key": k2}, timeout=40)
    assert joined["node_id"] == "a2"
    _wait(lambda: api_call(first.url, "GET", "/api/v3/cluster")["voters"] == ["a1", "a2"], "a2 promoted to voter")
    # The joiner holds the registry: its linearizable read sees what was committed before it joined.
    _wait(lambda: api_call(joiner.url, "GET", "/api/v3/vms/before/owner", timeout=5)["owner"] == "h1",
          "the joiner to read the registry")
    ghost = api_call(first.url, "POST", "/api/v3/cluster/join",
                     {"node_id": "ghost", "addr": "127.0.0.1:1", "public_key": "cd" * 32}, timeout=40)
    assert ghost["role"] == "learner"
    assert api_call(first.url, "POST", "/api/v3/vms/after/claim", {"host": "h2"}, timeout=10)["owner"] == "h2"
    cluster = api_call(first.url, "GET", "/api/v3/cluster")
    assert cluster["voters"] == ["a1", "a2"] and cluster["learners"] == ["ghost"]
