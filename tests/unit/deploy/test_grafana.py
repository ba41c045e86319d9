"""Grafana dashboards: the ops guide's three dashboards with its uids and refresh rates; every
query is valid PromQL (promtool) and names only series the agent exports or the rules record."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml
from deploy_support import DEPLOY, need_tool
from promql import grafana_to_promql, metric_names
from test_prometheus_rules import exported_series, recorded

GRAFANA = DEPLOY / "grafana"
EXPECTED = {  # uid -> (refresh, panels the ops guide describes)
    "dwcp-v3-production-rollout": ("5s", {"GO/NO-GO Status", "Rollout Progress", "Error Rate Comparison (V3 vs V1)",
                                          "Latency Comparison (V3 vs V1)", "Throughput Comparison (V3 vs V1)",
                                          "Node Health Status"}),
    "dwcp-v3-real-time": ("1s", {"Active Migrations", "Current Mode", "Real-Time Bandwidth Utilization",
                                 "Byzantine Events (5m)", "PBFT Consensus P99", "Live VM Migrations by Mode",
                                 "Mode Switching Events", "Consensus Protocol Activity", "Component Latency Heatmap"}),
    "dwcp-v3-sla": ("30s", {"Availability", "P99 Latency", "Error Rate", "Throughput", "Availability SLI Tracking",
                            "Error Budget Remaining", "Uptime by Time Window", "Total Downtime by Window",
                            "SLA Compliance Status"}),
}


def dashboards() -> dict[str, dict]:
    out = {}
    for path in GRAFANA.glob("*.json"):
        data = json.loads(path.read_text())
        out[data["uid"]] = data
    return out


def queries() -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, PromQL) of every panel target and annotation."""
    out = []
    for uid, dash in dashboards().items():
        for panel in dash["panels"]:
            for t in panel.get("targets", []):
                out.append((uid, panel["title"], grafana_to_promql(t["expr"])))
        for ann in dash.get("annotations", {}).get("list", []):
            if ann.get("expr"):
                out.append((uid, f"annotation {ann['name']}", grafana_to_promql(ann["expr"])))
    return out


def test_the_three_dashboards_of_the_ops_guide():
    found = dashboards()
    assert set(found) == set(EXPECTED)
    for uid, (refresh, titles) in EXPECTED.items():
        assert found[uid]["refresh"] == refresh
        assert titles <= {p["title"] for p in found[uid]["panels"]}, uid
        ids = [p["id"] for p in found[uid]["panels"]]
        assert len(ids) == len(set(ids))


def test_every_query_names_only_exported_or_recorded_series():
    known = exported_series() | recorded() | {"up"}
    for uid, title, expr in queries():
        names = metric_names(expr)
        assert names, f"{uid} / {title}: no metric in {expr!r}"
        assert names <= known, f"{uid} / {title}: unknown {names - known}"


def test_every_query_is_valid_promql(tmp_path: Path):
    promtool = need_tool("promtool")
    rules = [{"record": f"dashboard:check:{i}", "expr": expr} for i, (_, _, expr) in enumerate(queries())]
    path = tmp_path / "dashboards.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
