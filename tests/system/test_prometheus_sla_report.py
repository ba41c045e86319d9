"""`dwcp-agent sla-report` against the distribution's Prometheus holding a month of history
backfilled with `promtool tsdb create-blocks-from openmetrics`."""

from __future__ import annotations

import calendar
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from dwcp_agent.cli import main
from dwcp_agent.demo import free_port

pytestmark = pytest.mark.system

STEP = 300
START = calendar.timegm((2024, 2, 10, 0, 0, 0))
POINTS = 576  # two days
OUTAGE = range(100, 106)  # 30 minutes at 90 % availability


def history() -> str:
    """OpenMetrics text: SLIs as the recording rules would have written them, counters, ALERTS."""
    lines = ["# TYPE sla:availability:5m gauge"]
    lines += [f"sla:availability:5m {0.9 if i in OUTAGE else 1.0} {START + i * STEP}" for i in range(POINTS)]
    for name, value in (("sla:latency_p99:5m", 0.05), ("sla:error_rate:5m", 0.001),
                        ("sla:throughput_bytes_per_second:5m", 2.5e9)):
        lines.append(f"# TYPE {name} gauge")
        lines += [f"{name} {value} {START + i * STEP}" for i in range(POINTS)]
    # The agent is up throughout; it is not ready (unavailable) during the outage.
    lines.append("# TYPE up gauge")
    lines += [f'up{{job="dwcp-agent",instance="a:8080"}} 1 {START + i * STEP}' for i in range(POINTS)]
    lines.append("# TYPE instance:dwcp_v3_unavailable gauge")
    lines += [f'instance:dwcp_v3_unavailable{{instance="a:8080"}} {1 if i in OUTAGE else 0} {START + i * STEP}'
              for i in range(POINTS)]
    lines.append("# TYPE dwcp_v3_migrations counter")
    lines += [f'dwcp_v3_migrations_total{{status="completed"}} {i * 100} {START + i * STEP}' for i in range(POINTS)]
    lines.append("# TYPE ALERTS gauge")
    lines += [f'ALERTS{{alertname="SLAAvailabilityViolation",alertstate="firing",severity="critical"}} 1 '
              f"{START + i * STEP}" for i in OUTAGE]
    return "\n".join(lines) + "\n# EOF\n"


@pytest.fixture
def prometheus(tmp_path: Path):
    promtool, binary = shutil.which("promtool"), shutil.which("prometheus")
    if promtool is None or binary is None:
        pytest.skip("prometheus/promtool not found (apt package prometheus; `make test` installs it)")
    (tmp_path / "history.om").write_text(history())
    tsdb = tmp_path / "tsdb"
    subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", str(tmp_path / "history.om"), str(tsdb)],
                   check=True, capture_output=True)
    (tmp_path / "prometheus.yml").write_text("global: {}\n")
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tsdb}",
                             "--storage.tsdb.retention.time=100y", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"prometheus did not start; see {log.name}")
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def test_monthly_report_from_prometheus(prometheus, capsys):
    assert main(["sla-report", "--prometheus", prometheus, "--month", "2024-02", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected_availability = (POINTS - len(OUTAGE) + 0.9 * len(OUTAGE)) / POINTS
    assert data["availability"] == pytest.approx(expected_availability)
    assert data["latency_p99_s"] == pytest.approx(0.05)
    assert data["error_rate"] == pytest.approx(0.001)
    assert data["throughput_bytes_per_second"] == pytest.approx(2.5e9)
    # Two days of data in a 29-day month: figures are for those two days, never extrapolated.
    covered = (POINTS - 1) * STEP
    assert (data["data_from"], data["data_to"], data["covered_s"]) == (START, START + covered, covered)
    assert data["downtime_s"] == pytest.approx(covered * len(OUTAGE) / POINTS)  # ~30 min unavailable
    assert data["allowed_downtime_s"] == pytest.approx(covered * 0.001)
    assert data["successful_migrations"] == pytest.approx((POINTS - 1) * 100, rel=0.01)
    assert data["complete_month"] is True
    (incident,) = data["incidents"]
    assert incident["alertname"] == "SLAAvailabilityViolation"
    assert incident["start"] == pytest.approx(START + OUTAGE[0] * STEP, abs=600)
    assert 20 * 60 <= incident["duration_s"] <= 45 * 60

    assert main(["sla-report", "--prometheus", prometheus, "--month", "2024-02"]) == 0
    markdown = capsys.readouterr().out
    assert markdown.startswith("# DWCP v3 Monthly SLA Report - February 2024")
    assert "_Period: data from 2024-02-10 00:00 UTC to 2024-02-11 23:55 UTC (2.0 days)" in markdown
    assert "- [✗] Availability: VIOLATION" in markdown
    assert "- [✓] Latency: COMPLIANT" in markdown
    assert "- [✓] Throughput: COMPLIANT" in markdown
    assert "SLAAvailabilityViolation" in markdown


def test_bad_month_and_unreachable_prometheus(capsys):
    assert main(["sla-report", "--prometheus", "http://127.0.0.1:9", "--month", "2024-13"]) == 2
    assert main(["sla-report", "--prometheus", "http://127.0.0.1:9", "--month", "2024-02"]) == 1
    assert "cannot query Prometheus" in capsys.readouterr().err
