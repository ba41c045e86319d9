"""The operator's view of a WAN migration with default settings: /metrics scraped while it runs.

Internet profile (50 ms, 0.1 % loss, 1 Gbit/s), two real agents in their namespaces, nothing
configured: PBA must measure the path for every v3 migration, so bandwidth, RTT, mode and
prediction accuracy are live and right while the migration runs, and the migration is labelled
with the mode it measured.
"""

from __future__ import annotations

import secrets
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import wanbed
from prometheus_client.parser import text_string_to_metric_families

from dwcp_agent.client import api_call
from dwcp_agent.migration.images import generate

pytestmark = pytest.mark.system

Bed = Callable[[wanbed.Profile | str], wanbed.WanBed]
MiB = 1 << 20
ADMIN = f"http://127.0.0.1:{wanbed.BedAgent.ADMIN_PORT}"


def _scrape(bed: wanbed.WanBed) -> str:
    with bed.enter("a"), urllib.request.urlopen(ADMIN + "/metrics", timeout=10) as resp:
        return resp.read().decode()


def _api(bed: wanbed.WanBed, path: str, body: dict | None = None) -> dict:
    with bed.enter("a"):
        return api_call(ADMIN, "POST" if body else "GET", path, body)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_during_a_default_wan_migration_show_the_measured_path(wan_bed: Bed, tmp_path: Path) -> None:
    bed = wan_bed("internet")
    psk = tmp_path / "psk"
    psk.write_text(secrets.token_hex(16))
    src = wanbed.BedAgent(bed, "a", tmp_path / "src", psk)
    dst = wanbed.BedAgent(bed, "b", tmp_path / "dst", psk)
    try:
        src.wait_ready()
        dst.wait_ready()
        image = generate(src.images / "vm.img", 256 * MiB, "random", seed=11)
        started = _api(bed, "/api/v3/migrations", {
            "source": str(image), "to": dst.address, "dest_path": str(dst.images / "vm.img")})
        live: list[dict] = []  # scrapes taken while the migration was running
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            samples = _samples(_scrape(bed))
            record = _api(bed, f"/api/v3/migrations/{started['id']}")
            if record["state"] != "running":
                break
            live.append(samples)
            time.sleep(0.25)
        assert record["state"] == "completed", record
    finally:
        src.stop()
        dst.stop()

    def seen(name: str, **labels: str) -> list[float]:
        key = (name, tuple(sorted(labels.items())))
        return [s[key] for s in live if key in s]

    assert len(live) >= 4, f"migration over after {len(live)} scrapes"
    bandwidth = [v for v in seen("dwcp_v3_amst_throughput_bytes_per_second") if v > 0]
    assert bandwidth and max(bandwidth) <= 1.1 * 125e6  # a 1 Gbit/s path
    rtt = [v for v in seen("dwcp_v3_amst_rtt_seconds") if v > 0]
    assert rtt and min(rtt) >= 0.045 and max(rtt) < 2.0  # 50 ms path plus our own queue
    internet = seen("dwcp_v3_current_mode", mode="internet")
    assert internet and internet[-1] == 1 and seen("dwcp_v3_current_mode", mode="datacenter")[-1] == 0
    accuracy = [v for v in seen("dwcp_v3_prediction_accuracy") if v > 0]
    assert accuracy and all(0 < v <= 1 for v in accuracy)
    assert record["mode"] == "internet" and record["mode_measured"]
    assert record["streams_used"]["peak"] >= 1
