"""Alertmanager config: valid for amtool, routes each alert to its team, and inhibits warnings
when a critical on the same SLI fires (checked on a real Alertmanager on loopback)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from deploy_support import DEPLOY, need_tool

from dwcp_agent.demo import free_port

CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
ALERTS = DEPLOY / "prometheus" / "rules" / "dwcp-alerts.yml"
PAGE = {"oncall": "page-oncall", "performance": "page-performance", "network": "page-network",
        "distributed-systems": "page-distributed-systems"}


def alert_labels() -> dict[str, dict[str, str]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {r["alert"]: {"alertname": r["alert"], **r["labels"]} for g in groups for r in g["rules"]}


def test_amtool_accepts_the_config():
    amtool = need_tool("amtool")
    result = subprocess.run([amtool, "check-config", str(CONFIG)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_reaches_its_team():
    amtool = need_tool("amtool")
    for name, labels in alert_labels().items():
        result = subprocess.run(
            [amtool, "config", "routes", "test", f"--config.file={CONFIG}",
             *(f"{k}={v}" for k, v in labels.items())],
            capture_output=True, text=True,
        )
        assert result.returncode == 0, result.stderr
        receivers = result.stdout.strip().split(",")
        expected = [PAGE[labels["team"]]] if labels["severity"] == "critical" else ["slack-dwcp-warnings"]
        if name == "ByzantineNodeDetected":
            expected = ["security", *expected]
        assert receivers == expected, name


@pytest.fixture
def alertmanager(tmp_path: Path):
    """A real Alertmanager with our routes and inhibitions; receivers emptied so nothing leaves
    the host."""
    binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if binary is None:
        pytest.skip("alertmanager not found (apt package prometheus-alertmanager; `make test` installs it)")
    config = yaml.safe_load(CONFIG.read_text())
    config["global"] = {"resolve_timeout": "5m"}
    config["receivers"] = [{"name": r["name"]} for r in config["receivers"]]
    (tmp_path / "am.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'am.yml'}", f"--storage.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"alertmanager did not start: {proc.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def post_alerts(url: str, alerts: list[dict[str, str]]) -> None:
    body = json.dumps([{"labels": labels} for labels in alerts]).encode()
    req = urllib.request.Request(f"{url}/api/v2/alerts", data=body, headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=5).read()


def inhibited(url: str) -> dict[str, bool]:
    data = json.loads(urllib.request.urlopen(f"{url}/api/v2/alerts", timeout=5).read())
    return {a["labels"]["alertname"]: bool(a["status"]["inhibitedBy"]) for a in data}


def wait_for(url: str, expected: dict[str, bool]) -> dict[str, bool]:
    deadline = time.monotonic() + 10
    while True:
        state = inhibited(url)
        if state == expected or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def test_a_critical_silences_warnings_on_the_same_sli_only(alertmanager):
    labels = alert_labels()
    post_alerts(alertmanager, [labels["DWCPv3LatencyP99Critical"], labels["HighLatencyWarning"],
                               labels["DWCPv3LatencyP95High"], labels["ThroughputDegradation"]])
    assert wait_for(alertmanager, {
        "DWCPv3LatencyP99Critical": False, "HighLatencyWarning": True, "DWCPv3LatencyP95High": True,
        "ThroughputDegradation": False,
    }) == {"DWCPv3LatencyP99Critical": False, "HighLatencyWarning": True, "DWCPv3LatencyP95High": True,
           "ThroughputDegradation": False}


def test_all_agents_down_silences_everything_else(alertmanager):
    labels = alert_labels()
    post_alerts(alertmanager, [labels["DWCPv3AllReplicasDown"], labels["SLAAvailabilityViolation"],
                               labels["ThroughputDegradation"]])
    expected = {"DWCPv3AllReplicasDown": False, "SLAAvailabilityViolation": True, "ThroughputDegradation": True}
    assert wait_for(alertmanager, expected) == expected
