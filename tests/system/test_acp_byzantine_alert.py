"""The ByzantineNodeDetected alert (deploy/prometheus, test-only fast rules) fires for a real PBFT
cluster whose primary equivocates through the test hook, scraped by a real Prometheus."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from acp_cluster_support import acp_clusters
from test_prometheus_stack import Prometheus, wait_until

from dwcp_agent.client import ApiError, api_call
from dwcp_agent.demo import LocalAgent

pytestmark = pytest.mark.system


def make_liar(agents: list[LocalAgent], behaviour: str) -> tuple[LocalAgent, list[LocalAgent]]:
    """Turn the replica the others agree is primary Byzantine (its hook file); returns it and the rest."""
    def agreed() -> str:
        names = {api_call(a.url, "GET", "/api/v3/cluster", timeout=5.0).get("primary", "") for a in agents}
        return names.pop() if len(names) == 1 and "" not in names else ""
    name = wait_until("an agreed primary", agreed, timeout=30, every=0.1)
    liar = next(a for a in agents if a.name == name)
    (liar.state_dir / "lie").write_text(behaviour)
    return liar, [a for a in agents if a is not liar]


def test_byzantine_alert_fires_when_the_primary_equivocates(tmp_path: Path) -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not found (apt package prometheus; `make test` installs it)")
    prom = None
    with acp_clusters(tmp_path) as start:
        agents = start(4, "pbft", byzantine_hook=True)
        try:
            prom = Prometheus(tmp_path, [f"127.0.0.1:{a.admin_port}" for a in agents])
            assert prom.alert_state("ByzantineNodeDetected") is None
            _liar, honest = make_liar(agents, "equivocate")

            def claimed() -> bool:
                try:
                    return api_call(honest[0].url, "POST", "/api/v3/vms/vm-1/claim", {"host": "h1"},
                                    timeout=10.0)["owner"] == "h1"
                except ApiError:
                    return False

            wait_until("a claim through an honest replica", claimed, timeout=60)
            wait_until("ByzantineNodeDetected firing", lambda: prom.alert_state("ByzantineNodeDetected") == "firing",
                       timeout=90)
            reasons = prom.query("sum by (reason) (dwcp_v3_acp_byzantine_detections_total)")
            assert any(r["metric"].get("reason") == "equivocation" and float(r["value"][1]) > 0
                       for r in reasons), reasons
        finally:
            if prom is not None:
                prom.stop()
