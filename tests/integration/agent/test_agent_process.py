"""Real agent processes: health and metrics endpoints, the migrations API, cancel, graceful stop,
and a destination killed with SIGKILL mid-transfer that resumes from its journal."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from dwcp_agent.client import ApiError, api_call, follow
from dwcp_agent.demo import LocalAgent

StartAgent = Callable[..., LocalAgent]

MiB = 1 << 20


def _image(agent: LocalAgent, size: int, name: str = "vm.img") -> Path:
    path = agent.images / name
    path.write_bytes(os.urandom(size))
    return path


def _migration(source: LocalAgent, dest: LocalAgent, image: Path, name: str = "vm.img") -> dict:
    return api_call(source.url, "POST", "/api/v3/migrations", {
        "source": str(image), "to": f"127.0.0.1:{dest.data_port}", "dest_path": str(dest.images / name),
        "vm_id": "vm-1"})


def _wait_progress(agent: LocalAgent, migration_id: str, fraction: float, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = api_call(agent.url, "GET", f"/api/v3/migrations/{migration_id}")
        if m["total_bytes"] and m["done_bytes"] >= fraction * m["total_bytes"]:
            return m
        assert m["state"] == "running", m
        time.sleep(0.02)
    raise AssertionError(f"migration did not reach {fraction:.0%}")


def _scrape(agent: LocalAgent) -> str:
    with urllib.request.urlopen(agent.url + "/metrics", timeout=5) as resp:
        return resp.read().decode()


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of every sample of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        series = line.split(" ", 1)[0]
        if series.split("{", 1)[0] == name and all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_health_reports_components_and_migration_is_visible_in_metrics(start_agent: StartAgent) -> None:
    source, dest = start_agent("src"), start_agent("dst")
    health = api_call(source.url, "GET", "/health")
    assert health["ready"] and health["status"] in ("ok", "degraded")
    assert health["components"]["amst"]["status"] == "ok"
    assert health["components"]["itp"]["status"] == "absent"
    assert api_call(source.url, "GET", "/health/ass")["status"] == "absent"
    with pytest.raises(ApiError) as unknown:
        api_call(source.url, "GET", "/health/nosuch")
    assert unknown.value.status == 404
    assert api_call(source.url, "GET", "/health/pba")["measured"] is False
    image = _image(source, 5 * MiB + 17)
    final = follow(source.url, _migration(source, dest, image)["id"], show_progress=False)
    pba = api_call(source.url, "GET", "/health/pba")
    assert pba["measured"] and pba["migration_id"] == final["id"] and pba["mode"] == "datacenter"
    assert pba["probe_rtt_s"] > 0 and pba["tcp_congestion"]
    assert final["mode"] == "datacenter" and final["tcp_congestion"] == pba["tcp_congestion"]
    assert final["streams_used"]["peak"] >= 1 and final["streams_used"]["mean"] > 0
    assert final["state"] == "completed" and final["digest_verified"]
    assert (dest.images / "vm.img").read_bytes() == image.read_bytes()
    src_metrics, dst_metrics = _scrape(source), _scrape(dest)
    assert _metric(src_metrics, "dwcp_v3_migrations_total", status="completed") == 1
    assert _metric(src_metrics, "dwcp_v3_migration_duration_seconds_count") == 1
    assert _metric(src_metrics, "dwcp_v3_bytes_transferred_total", direction="sent") >= final["wire_bytes"]
    assert _metric(dst_metrics, "dwcp_v3_bytes_transferred_total", direction="received") == final["wire_bytes"]
    assert _metric(src_metrics, "dwcp_v3_active_migrations") == 0
    listed = api_call(source.url, "GET", "/api/v3/migrations")["migrations"]
    assert [m["id"] for m in listed] == [final["id"]]


@pytest.mark.parametrize(("body", "message"), [
    ({"to": "127.0.0.1:1", "dest_path": "/x"}, "field 'source' is required"),
    ({"source": "/etc/passwd", "to": "127.0.0.1:1", "dest_path": "/x"}, "outside the allowed directories"),
    ({"source": "IMAGE", "to": "nowhere", "dest_path": "/x"}, "is not HOST:PORT"),
    ({"source": "IMAGE", "to": "127.0.0.1:1", "dest_path": "/x", "colour": "red"}, "unknown field"),
])
def test_bad_migration_requests_get_400_naming_the_field(start_agent: StartAgent, body: dict, message: str) -> None:
    source = start_agent("src")
    image = _image(source, 4096)
    body = {k: (str(image) if v == "IMAGE" else v) for k, v in body.items()}
    with pytest.raises(ApiError, match=message) as err:
        api_call(source.url, "POST", "/api/v3/migrations", body)
    assert err.value.status == 400
    # A client's mistake is counted under its own error_type and never as a service error.
    text = _scrape(source)
    assert _metric(text, "dwcp_v3_errors_total", component="migration", error_type="bad_request") \
        + _metric(text, "dwcp_v3_errors_total", component="migration", error_type="forbidden") == 1
    assert _metric(text, "dwcp_v3_component_errors_total", component="migration") == 0
    assert api_call(source.url, "GET", "/api/v3/sla")["windows"]["5m"]["errors"] == 0


def test_migration_history_survives_a_restart(start_agent: StartAgent) -> None:
    source, dest = start_agent("src", history_max_entries=2), start_agent("dst")
    ids = []
    for i in range(3):
        image = _image(source, MiB + i, name=f"vm{i}.img")
        started = api_call(source.url, "POST", "/api/v3/migrations", {
            "source": str(image), "to": f"127.0.0.1:{dest.data_port}", "dest_path": str(dest.images / image.name),
            "vm_id": f"vm-{i}"})  # one VM each: a completed migration makes the destination its owner
        ids.append(follow(source.url, started["id"], show_progress=False)["id"])
    assert source.stop() == 0
    source.start()
    source.wait_ready()
    listed = api_call(source.url, "GET", "/api/v3/migrations")["migrations"]
    assert [m["id"] for m in listed] == ids[1:]  # bounded by count: the oldest one is forgotten
    again = api_call(source.url, "GET", f"/api/v3/migrations/{ids[2]}")
    assert again["state"] == "completed" and again["digest_verified"] and again["finished"]


def test_cancel_discards_the_partial_destination_and_keeps_the_source(start_agent: StartAgent) -> None:
    source = start_agent("src", pacing_rate_bytes="4MiB", stream_count=2, compression_algo="none")
    dest = start_agent("dst")
    image = _image(source, 48 * MiB)
    before = image.read_bytes()
    started = _migration(source, dest, image)
    _wait_progress(source, started["id"], 0.1)
    cancelled = api_call(source.url, "DELETE", f"/api/v3/migrations/{started['id']}")
    assert cancelled["state"] == "cancelled"
    deadline = time.monotonic() + 5
    while (dest.images / "vm.img.dwcp-part").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (dest.images / "vm.img.dwcp-part").exists()
    assert not (dest.images / "vm.img").exists()
    assert image.read_bytes() == before


def test_destination_sigkill_mid_transfer_resumes_from_journal(start_agent: StartAgent) -> None:
    size = 96 * MiB
    source = start_agent("src", pacing_rate_bytes="8MiB", stream_count=4, compression_algo="none", retry_limit=10)
    dest = start_agent("dst")
    image = _image(source, size)
    started = _migration(source, dest, image)
    _wait_progress(source, started["id"], 0.5)
    dest.kill()
    assert (dest.images / "vm.img.dwcp-journal").exists()
    assert not (dest.images / "vm.img").exists()
    dest.start()
    final = follow(source.url, started["id"], show_progress=False)
    assert final["state"] == "completed", final
    assert final["attempts"] >= 2
    assert (dest.images / "vm.img").read_bytes() == image.read_bytes()
    resent = final["wire_bytes"] - size
    assert resent < 0.10 * size, f"re-sent {resent / size:.1%} of the image"


def test_sigterm_stops_within_bound_and_leaves_destination_resumable(start_agent: StartAgent) -> None:
    source = start_agent("src", pacing_rate_bytes="4MiB", stream_count=2, compression_algo="none",
                         shutdown_timeout_s=3)
    dest = start_agent("dst")
    image = _image(source, 64 * MiB)
    started = _migration(source, dest, image)
    _wait_progress(source, started["id"], 0.1)
    t0 = time.monotonic()
    assert source.stop(timeout=10) == 0
    assert time.monotonic() - t0 < 3.5
    logs = [json.loads(line) for line in source.log_path.read_text().splitlines() if line.startswith("{")]
    ended = [rec for rec in logs if rec.get("migration_id") == started["id"] and rec.get("migration_status")]
    assert ended[-1]["migration_status"] == "interrupted"
    assert (dest.images / "vm.img.dwcp-part").exists()  # kept for resume, final path untouched
    assert not (dest.images / "vm.img").exists()
    # a new migration of the same image resumes from the destination's journal
    source.start()
    source.wait_ready()
    api_call(source.url, "GET", "/health")
    again = api_call(source.url, "POST", "/api/v3/migrations", {
        "source": str(image), "to": f"127.0.0.1:{dest.data_port}", "dest_path": str(dest.images / "vm.img"),
        "vm_id": "vm-1"})
    final = follow(source.url, again["id"], show_progress=False)
    assert final["state"] == "completed"
    assert final["skipped_bytes"] > 0
    assert (dest.images / "vm.img").read_bytes() == image.read_bytes()


def test_destination_sigterm_makes_journal_durable(start_agent: StartAgent) -> None:
    source = start_agent("src", pacing_rate_bytes="4MiB", stream_count=2, compression_algo="none", retry_limit=0)
    dest = start_agent("dst", shutdown_timeout_s=3)
    image = _image(source, 32 * MiB)
    started = _migration(source, dest, image)
    _wait_progress(source, started["id"], 0.3)
    assert dest.proc is not None
    dest.proc.send_signal(signal.SIGTERM)
    assert dest.proc.wait(5) == 0
    journal = (dest.images / "vm.img.dwcp-journal").read_bytes()
    records = (len(journal) - journal.index(b"\n") - 1) // 20
    assert records * MiB >= 0.25 * 32 * MiB
    final = follow(source.url, started["id"], show_progress=False)
    assert final["state"] == "failed"
    assert not (dest.images / "vm.img").exists()


def test_one_migration_is_one_trace_on_both_agents(start_agent: StartAgent) -> None:
    from otlp_support import OtlpReceiver

    otlp = OtlpReceiver()
    try:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url, "TRACE_SAMPLING": "100", "OTEL_BSP_SCHEDULE_DELAY": "100"}
        source = start_agent("src", env={**env, "OTEL_SERVICE_NAME": "dwcp-src"})
        dest = start_agent("dst", env={**env, "OTEL_SERVICE_NAME": "dwcp-dst"})
        image = _image(source, 3 * MiB)
        final = follow(source.url, _migration(source, dest, image)["id"], show_progress=False)
        assert final["state"] == "completed"
        source.stop()
        dest.stop()  # shutdown flushes the span exporters
        spans = otlp.spans()
        kinds = otlp.kinds()
    finally:
        otlp.close()
    migration = [s for s in spans if s[:2] == ("dwcp-src", "migration")]
    assert len(migration) == 1, spans
    trace_id = migration[0][2]
    src_names = {name for service, name, tid in spans if service == "dwcp-src" and tid == trace_id}
    dst_names = {name for service, name, tid in spans if service == "dwcp-dst" and tid == trace_id}
    assert {"migration", "attempt", "commit"} <= src_names
    assert "receive" in dst_names
    # The span whose context crosses hosts is the client's; the destination's is the server's.
    assert kinds[("dwcp-src", "migration")] == "SPAN_KIND_CLIENT"
    assert kinds[("dwcp-dst", "receive")] == "SPAN_KIND_SERVER"


def test_ownership_moves_to_the_destination_only_when_the_migration_completes(start_agent: StartAgent) -> None:
    source = start_agent("src", retry_limit=0, connect_timeout_s=0.5)
    dest = start_agent("dst")
    image = _image(source, 2 * MiB)
    final = follow(source.url, _migration(source, dest, image)["id"], show_progress=False)
    assert final["state"] == "completed"
    assert api_call(source.url, "GET", "/api/v3/vms/vm-1/owner")["owner"] == "dst"
    # the source no longer owns vm-1: a second migration from here is refused before any byte moves
    again = follow(source.url, _migration(source, dest, image, name="again.img")["id"], show_progress=False)
    # (a client's refusal, not a service failure: it moves no SLA counter)
    assert again["state"] == "refused" and again["error_type"] == "vm_owned_elsewhere"
    assert not (dest.images / "again.img").exists()
    # a failed migration leaves the source authoritative
    other = source.images / "vm2.img"
    other.write_bytes(os.urandom(4096))
    failed = follow(source.url, api_call(source.url, "POST", "/api/v3/migrations", {
        "source": str(other), "to": "127.0.0.1:1", "dest_path": "/tmp/x.img", "vm_id": "vm-2"})["id"],
        show_progress=False)
    assert failed["state"] == "failed"
    assert api_call(source.url, "GET", "/api/v3/vms/vm-2/owner")["owner"] == "src"


def _reloads(agent: LocalAgent) -> int:
    """How many reloads the agent has finished (applied or refused), from its log."""
    logs = agent.log_path.read_text()
    return logs.count('"configuration reloaded"') + logs.count('"reload refused')


def _hup(agent: LocalAgent, config: Path, text: str) -> int:
    """Rewrite the config file, SIGHUP the agent, wait for the reload; return the rollout percentage."""
    assert agent.proc is not None
    before = _reloads(agent)
    config.write_text(text)
    agent.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while _reloads(agent) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    return int(api_call(agent.url, "GET", "/api/v3/rollout")["percentage"])


def test_sighup_rereads_the_configuration_and_keeps_it_when_the_new_one_is_bad(start_agent: StartAgent,
                                                                                tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("feature_flag_rollout: 100\n")
    agent = start_agent("src", env={"DWCP_CONFIG": str(config)})
    assert api_call(agent.url, "GET", "/api/v3/rollout")["percentage"] == 100
    assert _hup(agent, config, "feature_flag_rollout: 25\n") == 25
    assert _hup(agent, config, "feature_flag_rollout: 250\n") == 25  # out of range: refused, old config kept
    assert agent.proc is not None and agent.proc.poll() is None
    assert "reload refused" in agent.log_path.read_text()
