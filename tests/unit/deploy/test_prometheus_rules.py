"""Prometheus rules: valid for promtool, every ops-guide alert defined as documented, unit tested
both ways, naming only series the agent exports, and the test-only fast copy in sync."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml
from deploy_support import DEPLOY, ROOT, need_tool
from promql import metric_names

from dwcp_agent.telemetry.metrics import Metrics

RULES = DEPLOY / "prometheus" / "rules"
TESTS = DEPLOY / "prometheus" / "tests"
FAST = DEPLOY / "prometheus" / "test-only" / "dwcp-alerts-fast.yml"
OPS = ROOT / "docs" / "ops-contract"  # a copy of ../shared/ops, the contract

# name -> (severity, team, for) as the ops guide and playbooks state them (docs/operations.md
# records the thresholds this project had to choose).
ALERTS = {
    "DWCPv3RolloutNoGo": ("critical", "oncall", "1m"),
    "DWCPv3LatencyP99Critical": ("critical", "performance", "2m"),
    "DWCPv3ThroughputCriticalLow": ("critical", "network", "3m"),
    "DWCPv3ErrorRateCritical": ("critical", "oncall", "1m"),
    "SLAAvailabilityViolation": ("critical", "oncall", "5m"),
    "SLALatencyViolation": ("critical", "oncall", "3m"),
    "ByzantineNodeDetected": ("critical", "distributed-systems", None),
    "DWCPv3AllReplicasDown": ("critical", "oncall", "1m"),
    "DWCPv3LatencyP95High": ("warning", "performance", "5m"),
    "DWCPv3ThroughputLow": ("warning", "performance", "5m"),
    "HighLatencyWarning": ("warning", "performance", "10m"),
    "ThroughputDegradation": ("warning", "network", "10m"),
}
THRESHOLDS = {
    "DWCPv3LatencyP99Critical": "mode:sla_latency_p99:5m > on (mode) 5 * mode:slo_latency_p99_seconds",
    "DWCPv3ThroughputCriticalLow": "mode:sla_throughput_bytes_per_second:5m < on (mode) 0.8 * "
                                   "mode:slo_throughput_bytes_per_second",
    "DWCPv3ErrorRateCritical": "sum(rate(dwcp_v3_errors_total[1m])) > 10",
    "SLAAvailabilityViolation": "sla:availability:5m < 0.999",
    "SLALatencyViolation": "mode:sla_latency_p99:5m > on (mode) mode:slo_latency_p99_seconds",
    "HighLatencyWarning": "mode:sla_latency_p99:5m > on (mode) 0.8 * mode:slo_latency_p99_seconds",
    "ThroughputDegradation": "mode:sla_throughput_bytes_per_second:5m < on (mode) mode:slo_throughput_bytes_per_second",
}
# The base comes from the agents' `runbook_base_url` (dwcp_v3_runbook_info); docs/runbooks without one.
RUNBOOK_URL = ('{{{{ with query "max by (base_url) (dwcp_v3_runbook_info)" }}}}{{{{ . | first | label "base_url" }}}}'
               '{{{{ else }}}}docs/runbooks{{{{ end }}}}/{name}.md')
FAST_HEADER = """# TEST ONLY: deploy/prometheus/rules/dwcp-alerts.yml with every `for` shortened to 5s, so the
# full-stack system test (tests/system/test_prometheus_stack.py) sees alerts reach `firing` in
# seconds. Never load this file in production. tests/unit/deploy/test_prometheus_rules.py checks
# it matches the production file except for `for`; regenerate it with
# `.venv/bin/python tests/unit/deploy/test_prometheus_rules.py` after changing the alerts.
"""


def rules(path: Path) -> list[dict]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def alerts() -> dict[str, dict]:
    return {r["alert"]: r for r in rules(RULES / "dwcp-alerts.yml")}


def recorded() -> set[str]:
    return {r["record"] for r in rules(RULES / "dwcp-recording.yml")}


def exported_series() -> set[str]:
    """Every series name a scrape of the agent can carry (histogram parts, counter _total)."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        if family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
        elif family.type == "counter":
            names.add(family.name + "_total")
        else:
            names.add(family.name)
    return names


def fast_rules_text() -> str:
    """The test-only rule file as it must read: production alerts with `for: 5s`."""
    data = yaml.safe_load((RULES / "dwcp-alerts.yml").read_text())
    for group in data["groups"]:
        group["name"] += "-fast"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "5s"

    class Dumper(yaml.SafeDumper):
        pass

    def block(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, block)
    return FAST_HEADER + yaml.dump(data, Dumper=Dumper, sort_keys=False, width=200)


def test_promtool_accepts_every_rule_file():
    promtool = need_tool("promtool")
    files = [*sorted(RULES.glob("*.yml")), FAST]
    result = subprocess.run([promtool, "check", "rules", *map(str, files)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_example_server_config():
    promtool = need_tool("promtool")
    result = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=DEPLOY / "prometheus",
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass():
    promtool = need_tool("promtool")
    files = sorted(p.name for p in TESTS.glob("*_test.yml"))
    result = subprocess.run([promtool, "test", "rules", *files], cwd=TESTS, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_ops_alert_is_defined_with_its_severity_team_for_and_runbook():
    defined = alerts()
    assert set(defined) == set(ALERTS)
    for name, (severity, team, hold) in ALERTS.items():
        rule = defined[name]
        assert rule["labels"]["severity"] == severity, name
        assert rule["labels"]["team"] == team, name
        assert rule.get("for") == hold, name
        assert rule["annotations"]["runbook_url"] == RUNBOOK_URL.format(name=name)
        assert (ROOT / "docs" / "runbooks" / f"{name}.md").is_file(), f"runbook for {name} missing"
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        if name in THRESHOLDS:
            assert " ".join(rule["expr"].split()) == THRESHOLDS[name]


def test_alert_list_matches_the_ops_documents():
    text = "\n".join(p.read_text() for p in OPS.glob("*.md"))
    named = set(re.findall(r"^#+ (?:\S+ )?(?:\d+\. )?([A-Z][A-Za-z0-9]+(?:Violation|Detected|Down|NoGo|Critical|"
                           r"CriticalLow|High|Low|Warning|Degradation))\s*$", text, re.MULTILINE))
    assert named == set(ALERTS)


def test_every_alert_has_a_firing_and_a_silent_unit_test():
    fired: set[str] = set()
    silent: set[str] = set()
    for path in TESTS.glob("*_test.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    assert fired == set(ALERTS), f"no firing test: {set(ALERTS) - fired}"
    assert silent == set(ALERTS), f"no silent test: {set(ALERTS) - silent}"


def test_rules_only_read_series_the_agent_exports():
    known = exported_series() | recorded() | {"up"}
    for path in RULES.glob("*.yml"):
        for rule in rules(path):
            unknown = metric_names(rule["expr"]) - known
            assert not unknown, f"{rule.get('alert') or rule.get('record')} reads {unknown}"


def test_the_ops_guide_recording_rules_exist():
    assert {"sla:availability:5m", "sla:latency_p99:5m", "sla:error_rate:5m"} <= recorded()


def test_fast_rule_file_matches_production_except_for():
    assert FAST.read_text() == fast_rules_text(), (
        "deploy/prometheus/test-only/dwcp-alerts-fast.yml is stale: "
        "run `.venv/bin/python tests/unit/deploy/test_prometheus_rules.py`"
    )


if __name__ == "__main__":
    FAST.write_text(fast_rules_text())
    sys.stdout.write(f"wrote {FAST}\n")
