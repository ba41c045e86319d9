"""Finding 1: the admin API had no authentication, bound 0.0.0.0, took text/plain cross-site POSTs,
let anyone join a ghost voter, and `PUT /cluster/rollout` skipped the rollout checks."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from dwcp_agent.client import TOKEN_ENV, ApiError, api_call, token_file, use_token_file
from dwcp_agent.config import load_config
from dwcp_agent.demo import LocalAgent, free_port
from tests.security.admin_support import jbody, raw

MUTATING = [
    ("POST", "/api/v3/migrations", {"source": "/etc/passwd", "to": "127.0.0.1:1", "dest_path": "/tmp/x"}),
    ("DELETE", "/api/v3/migrations/m-1", None),
    ("POST", "/api/v3/vms/vm-1/claim", {"host": "evil"}),
    ("POST", "/api/v3/vms/vm-1/lease", {"holder": "evil", "ttl_s": 3600}),
    ("POST", "/api/v3/vms/vm-1/transfer", {"from_host": "a", "to_host": "evil", "fencing_token": 1}),
    ("POST", "/api/v3/cluster/join", {"node_id": "ghost", "addr": "127.0.0.1:1"}),
    ("POST", "/api/v3/cluster/leave", {"node_id": "guarded"}),
    ("POST", "/api/v3/cluster/protocol", {"target": "pbft", "forced": True}),
    ("POST", "/api/v3/cluster/reinstate", {"peer": "x"}),
    ("PUT", "/api/v3/cluster/rollout", {"percentage": 0}),
    ("POST", "/api/v3/rollout", {"percentage": 0}),
    ("POST", "/api/v3/rollout/rollback", {}),
    ("POST", "/api/v3/rollout/unfreeze", {}),
]


def test_admin_api_binds_loopback_by_default() -> None:
    assert load_config(environ={}).admin_host == "127.0.0.1"


@pytest.mark.parametrize("method,path,body", MUTATING, ids=[f"{m} {p}" for m, p, _ in MUTATING])
def test_every_mutating_route_needs_the_token(agent: LocalAgent, method: str, path: str, body: object) -> None:
    payload = None if body is None else jbody(body)
    for token in (None, "wrong-token-wrong-token-wrong"):
        status, answer = raw(agent.admin_port, method, path, payload, token=token)
        assert status == 401, (token, answer)
    assert api_call(agent.url, "GET", "/api/v3/vms/vm-1/owner")["owner"] is None  # nothing was claimed


def test_probes_stay_open_and_reads_need_the_token(agent: LocalAgent) -> None:
    assert raw(agent.admin_port, "GET", "/health", token=None)[0] == 200
    assert raw(agent.admin_port, "GET", "/metrics", token=None)[0] == 200
    assert raw(agent.admin_port, "GET", "/api/v3/migrations", token=None)[0] == 401
    assert raw(agent.admin_port, "GET", "/api/v3/migrations")[0] == 200


def test_cross_site_requests_are_refused_even_with_the_token(agent: LocalAgent) -> None:
    port = agent.admin_port
    claim = "/api/v3/vms/vm-x/claim"
    # What a malicious page can make a browser send: text/plain, foreign Host (DNS rebinding) / Origin.
    assert raw(port, "POST", claim, b'{"host": "evil"}', token=None, content_type="text/plain",
               host="evil.example:8080", headers={"Origin": "http://evil.example:8080"})[0] in (401, 403, 415)
    assert raw(port, "POST", claim, jbody({"host": "evil"}), host="evil.example:8080")[0] == 403
    assert raw(port, "POST", claim, jbody({"host": "evil"}), headers={"Origin": "http://evil.example"})[0] == 403
    assert raw(port, "POST", claim, jbody({"host": "evil"}), headers={"Sec-Fetch-Site": "cross-site"})[0] == 403
    assert raw(port, "POST", claim, b'{"host": "evil"}', content_type="text/plain")[0] == 415
    assert api_call(agent.url, "GET", "/api/v3/vms/vm-x/owner")["owner"] is None
    # The same request from the operator's CLI (JSON, own Host, token) is accepted.
    assert raw(port, "POST", claim, jbody({"host": "good"}), host=f"localhost:{port}",
               headers={"Origin": f"http://localhost:{port}"})[0] == 200


def test_put_cluster_rollout_cannot_bypass_the_freeze(agent: LocalAgent) -> None:
    api_call(agent.url, "POST", "/api/v3/rollout/rollback", {"reason": "test"})
    try:
        status, _ = raw(agent.admin_port, "PUT", "/api/v3/cluster/rollout",
                        jbody({"percentage": 100, "frozen": False}))
        assert status == 405
        state = api_call(agent.url, "GET", "/api/v3/rollout")
        assert state["frozen"] and state["percentage"] == 0
        with pytest.raises(ApiError) as err:
            api_call(agent.url, "POST", "/api/v3/rollout", {"percentage": 100})
        assert err.value.status == 409
    finally:
        api_call(agent.url, "POST", "/api/v3/rollout/unfreeze", {})
        api_call(agent.url, "POST", "/api/v3/rollout", {"percentage": 100})


def test_cli_sends_the_token_and_explains_a_missing_one(agent: LocalAgent) -> None:
    assert api_call(agent.url, "GET", "/api/v3/cluster")["status"] == "ok"
    with pytest.raises(ApiError, match="no token") as err:
        api_call(agent.url, "GET", "/api/v3/cluster", token="")
    assert err.value.status == 401


def test_a_ghost_joins_as_a_learner_and_the_single_node_registry_keeps_working(agent: LocalAgent) -> None:
    ghost_key = "ab" * 32
    joined = api_call(agent.url, "POST", "/api/v3/cluster/join",
                      {"node_id": "ghost", "addr": "127.0.0.1:1", "public_key": ghost_key}, timeout=30)
    assert joined["role"] == "learner"
    cluster = api_call(agent.url, "GET", "/api/v3/cluster")
    assert cluster["voters"] == ["guarded"] and cluster["learners"] == ["ghost"]
    assert api_call(agent.url, "POST", "/api/v3/vms/after-ghost/claim", {"host": "h"}, timeout=10)["owner"] == "h"
    with pytest.raises(ApiError) as err:  # leave checks the voters and learners in force
        api_call(agent.url, "POST", "/api/v3/cluster/leave", {"node_id": "nobody"})
    assert err.value.status == 400
    with pytest.raises(ApiError) as err:
        api_call(agent.url, "POST", "/api/v3/cluster/leave", {"node_id": "guarded"})
    assert err.value.status == 400 and "last voter" in str(err.value)
    api_call(agent.url, "POST", "/api/v3/cluster/leave", {"node_id": "ghost"}, timeout=30)
    assert api_call(agent.url, "GET", "/api/v3/cluster")["learners"] == []


def test_metrics_port_serves_probes_only_and_the_switch_protects_them(tmp_path: Path) -> None:
    psk = tmp_path / "psk"
    psk.write_text(secrets.token_hex(32))
    metrics_port = free_port()
    node = LocalAgent("probed", tmp_path, psk,
                      settings={"metrics_port": str(metrics_port), "admin_auth_health": "true"})
    try:
        node.wait_ready()  # with the session token
        assert raw(metrics_port, "GET", "/health")[0] == 200
        assert raw(metrics_port, "GET", "/metrics", token=None)[0] == 401  # admin_auth_health=true
        assert raw(metrics_port, "GET", "/metrics")[0] == 200
        assert raw(metrics_port, "POST", "/api/v3/vms/v/claim", jbody({"host": "h"}))[0] == 404  # not served there
        assert raw(node.admin_port, "GET", "/health", token=None)[0] == 401
    finally:
        node.stop(timeout=5)


def test_cli_finds_the_token_file_of_the_agents_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    monkeypatch.delenv(TOKEN_ENV)
    monkeypatch.setenv("DWCP_CONFIG", str(config))
    assert token_file() == str(tmp_path / "state" / "admin.token")
    config.write_text(f"admin_token_file: {tmp_path / 'tok'}\n")
    assert token_file() == str(tmp_path / "tok")
    use_token_file(str(tmp_path / "flag"))
    try:
        assert token_file() == str(tmp_path / "flag")  # --token-file wins over the config
    finally:
        use_token_file(None)
