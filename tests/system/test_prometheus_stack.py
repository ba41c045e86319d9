"""Full stack on loopback: the distribution's Prometheus, loaded with the project's recording
rules and the test-only fast alert rules, scrapes two real agents while they migrate.

It reads the SLIs back through the Prometheus HTTP API and checks them against the agents' own
SLA guard (computed independently from the same migrations); then injects failing migrations
and checks that the SLA alerts reach `firing` and that the agent's guard rolls the rollout back
to 0 % by itself. A second test scrapes an agent after a migration and checks every metric of
the contract is exported.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dwcp_agent.client import api_call, follow
from dwcp_agent.demo import LocalAgent, free_port
from dwcp_agent.migration.images import generate
from dwcp_agent.telemetry.metrics import contract_names

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
RULES = [ROOT / "deploy/prometheus/rules/dwcp-recording.yml",
         ROOT / "deploy/prometheus/test-only/dwcp-alerts-fast.yml"]
FAILURES = 20
NOGO_HOLD_S = 3


def wait_until(what: str, check: Callable[[], Any], timeout: float = 60.0, every: float = 0.5) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` and the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; last value: {last!r}")


class Prometheus:
    """A Prometheus server process with its own storage in a temporary directory."""

    def __init__(self, workdir: Path, targets: list[str]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.skip("prometheus not found (apt package prometheus; `make test` installs it)")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in RULES],
            "scrape_configs": [{"job_name": "dwcp-agent", "static_configs": [{"targets": targets}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address={self.url.removeprefix('http://')}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_until("prometheus ready", self._ready, timeout=60)
        # Service discovery hands targets to the scraper on a 5 s tick: wait for the first
        # scrape of every agent, so the counters' starting values are in the TSDB before any
        # migration (rate() cannot see an increase that happened before the first sample).
        wait_until("first scrape of every agent",
                   lambda: self.value('count(up{job="dwcp-agent"} == 1)') == len(targets), timeout=60)
        time.sleep(1.5)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"prometheus exited with {self.proc.returncode}; see {self.log.name}")
        try:
            return urllib.request.urlopen(f"{self.url}/-/ready", timeout=1).status == 200
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        body = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def alert_state(self, name: str) -> str | None:
        body = json.loads(urllib.request.urlopen(f"{self.url}/api/v1/alerts", timeout=10).read())
        states = [a["state"] for a in body["data"]["alerts"] if a["labels"]["alertname"] == name]
        return "firing" if "firing" in states else (states[0] if states else None)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalAgent, LocalAgent, Prometheus, Path]]:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not found (apt package prometheus; `make test` installs it)")
    root = tmp_path_factory.mktemp("stack")
    psk = root / "psk"
    psk.write_text(secrets.token_hex(16))
    # retry_limit 0: a migration to a destination that is down fails at once instead of retrying.
    env = {"DWCP_SLA_NOGO_HOLD_S": str(NOGO_HOLD_S), "FEATURE_FLAG_ROLLOUT": "100", "DWCP_RETRY_LIMIT": "0"}
    source, dest = LocalAgent("src", root, psk, env), LocalAgent("dst", root, psk, env)
    prom = None
    try:
        source.wait_ready()
        dest.wait_ready()
        prom = Prometheus(root, [f"127.0.0.1:{source.admin_port}", f"127.0.0.1:{dest.admin_port}"])
        image = generate(source.images / "vm.img", 2 << 20, "vm-mix", 7)
        yield source, dest, prom, image
    finally:
        if prom is not None:
            prom.stop()
        source.stop()
        dest.stop()


def migrate(source: LocalAgent, dest: LocalAgent, image: Path, dest_path: str) -> dict[str, Any]:
    # One VM per destination file: after a completed migration the registry names the
    # destination as the VM's owner, so the same VM cannot leave the source twice.
    started = api_call(source.url, "POST", "/api/v3/migrations",
                       {"source": str(image), "to": f"127.0.0.1:{dest.data_port}", "dest_path": dest_path,
                        "vm_id": Path(dest_path).stem})
    return follow(source.url, started["id"], show_progress=False)


def scrape(agent: LocalAgent) -> str:
    return urllib.request.urlopen(f"{agent.url}/metrics", timeout=10).read().decode()


def test_every_contract_metric_is_exported_after_a_migration(stack):
    source, dest, _, image = stack
    assert migrate(source, dest, image, str(dest.images / "contract.img"))["state"] == "completed"
    for agent in (source, dest):
        text = scrape(agent)
        declared = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
        missing = [name for name in contract_names() if name not in declared]
        assert not missing, f"{agent.name} does not export {missing}"


def test_recording_rules_alerts_and_automatic_rollback(stack):
    source, dest, prom, image = stack
    # Phase 1: healthy migrations.
    results = [migrate(source, dest, image, str(dest.images / f"ok-{i}.img")) for i in range(4)]
    assert [r["state"] for r in results] == ["completed"] * 4
    assert {r["protocol"] for r in results} == {"v3"}
    completed = int(float(next(line.split()[-1] for line in scrape(source).splitlines()
                                if line.startswith('dwcp_v3_migrations_total{') and 'status="completed"' in line
                                and 'protocol="v3"' in line and not line.endswith(" 0.0"))))
    assert completed >= 4

    def scraped_all() -> bool:
        v = prom.value('sum(dwcp_v3_migrations_total{status="completed"})')
        return v is not None and v >= completed

    wait_until("Prometheus to scrape the completed migrations", scraped_all)
    wait_until("sla:throughput_bytes_per_second:5m", lambda: prom.value("sla:throughput_bytes_per_second:5m"))
    time.sleep(2.5)  # two more rule evaluations over the final counters
    guard = api_call(source.url, "GET", "/api/v3/sla")["windows"]["5m"]
    assert prom.value("sla:availability:5m") == 1.0 == guard["availability"]
    assert prom.value("sla:error_rate:5m") == 0.0 == guard["error_rate"]
    assert prom.value("sla:violations:5m") == 0 and prom.value("sla:go:5m") == 1
    # Ratios of counters from one target: Prometheus and the guard agree to float precision.
    assert prom.value("sla:throughput_bytes_per_second:5m") == pytest.approx(
        guard["throughput_bytes_per_second"], rel=1e-6)
    assert prom.value("sla:migration_duration_p99:5m") == pytest.approx(guard["migration_duration_p99_s"], rel=1e-6)
    assert prom.value("sla:migration_duration_p50:5m") == pytest.approx(guard["migration_duration_p50_s"], rel=1e-6)
    assert prom.value('protocol:dwcp_v3_migrations:rate5m{protocol="v3"}') > 0
    assert prom.alert_state("SLAAvailabilityViolation") is None
    assert api_call(source.url, "GET", "/api/v3/rollout")["percentage"] == 100

    # Phase 2: the destination refuses migrations to a path outside its dest_dirs: the client's
    # mistake, counted under its own error_type, moves neither the rules nor the guard.
    refused = [migrate(source, dest, image, f"/forbidden/fail-{i}.img") for i in range(3)]
    assert [(r["state"], r["error_type"]) for r in refused] == [("refused", "forbidden")] * 3
    wait_until("refusals scraped", lambda: prom.value(
        f'sum(dwcp_v3_migrations_total{{status="refused",instance="127.0.0.1:{source.admin_port}"}})') == 3)
    assert prom.value("sla:availability:5m") == 1.0 and prom.value("sla:error_rate:5m") == 0.0
    assert api_call(source.url, "GET", "/api/v3/sla")["decision"] == "GO"

    # Phase 3: the destination is down (nothing listens): a service failure, FAILURES of them, enough
    # for the guard's minimum sample count (sla_min_samples, default 20).
    failed = [follow(source.url, api_call(source.url, "POST", "/api/v3/migrations", {
        "source": str(image), "to": "127.0.0.1:1", "dest_path": f"/tmp/never-{i}.img", "vm_id": f"down-{i}"})["id"],
        show_progress=False) for i in range(FAILURES)]
    assert {(r["state"], r["error_type"]) for r in failed} == {("failed", "connect")}

    wait_until("SLAAvailabilityViolation firing", lambda: prom.alert_state("SLAAvailabilityViolation") == "firing")
    wait_until("DWCPv3RolloutNoGo firing", lambda: prom.alert_state("DWCPv3RolloutNoGo") == "firing")
    expected = completed / (completed + FAILURES)
    assert prom.value("sla:availability:5m") == pytest.approx(expected)

    # The agent's own guard: NO-GO held NOGO_HOLD_S rolls v3 back to 0 % and freezes it.
    rollout = wait_until("automatic rollback", lambda: (r := api_call(source.url, "GET", "/api/v3/rollout"))
                         ["percentage"] == 0 and r, timeout=30)
    assert rollout["frozen"] and rollout["reason"].startswith("sla_nogo")
    wait_until("rollback visible in Prometheus",
               lambda: prom.value(f'dwcp_v3_rollout_percentage{{instance="127.0.0.1:{source.admin_port}"}}') == 0
               and prom.value(f'dwcp_v3_rollbacks_total{{reason="sla_nogo",instance="127.0.0.1:{source.admin_port}"}}')
               == 1)
    after = migrate(source, dest, image, str(dest.images / "after-rollback.img"))
    assert after["state"] == "completed" and after["protocol"] == "v1"


def test_every_dashboard_query_runs_on_the_real_prometheus(stack):
    _, _, prom, _ = stack
    grafana = ROOT / "deploy" / "grafana"
    answered = 0
    for path in sorted(grafana.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$__rate_interval", "1m")
                result = prom.query(expr)  # raises on a query Prometheus refuses
                answered += bool(result)
    # After the migrations above most panels have data (consensus, RDMA, mode switches may not).
    assert answered >= 20
