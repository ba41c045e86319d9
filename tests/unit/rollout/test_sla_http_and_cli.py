"""The SLA/rollout admin routes served on loopback, driven by the real `dwcp-agent rollout` CLI."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request

import pytest
from aiohttp import web

from dwcp_agent.cli import main
from dwcp_agent.rollout.http import sla_routes
from dwcp_agent.rollout.sla import SlaGuard


@pytest.fixture
def served(config, metrics, clock):
    """The guard's routes on an aiohttp server on 127.0.0.1 in a background loop."""
    guard = SlaGuard(config, metrics, clock)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, object] = {}

    async def start() -> None:
        app = web.Application()
        app.add_routes(sla_routes(guard))
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        box["runner"] = runner
        box["url"] = f"http://127.0.0.1:{runner.addresses[0][1]}"
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert started.wait(10)
    yield guard, box["url"]
    asyncio.run_coroutine_threadsafe(box["runner"].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def get(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url, timeout=5).read())


def test_summary_and_sla_endpoints(served, clock):
    guard, url = served
    for _ in range(5):
        guard.record_migration("completed", 0.04, 1 << 26, "v3")
        clock.advance(1)
    summary = get(f"{url}/metrics/summary")
    assert set(summary) >= {"latency_ms", "throughput_bytes_per_second", "error_rate", "sla_status", "decision",
                            "error_budget_remaining", "migration_duration_ms"}
    assert set(summary["latency_ms"]) == {"p50", "p95", "p99"}
    assert summary["migration_duration_ms"]["p99"] == pytest.approx(49.75)
    sla = get(f"{url}/api/v3/sla")
    assert set(sla["windows"]) == {"5m", "1h", "24h", "7d", "30d"}
    assert sla["windows"]["5m"]["completed"] == 5 and sla["decision"] == "GO"


def test_rollout_cli_set_rollback_unfreeze(served, capsys):
    guard, url = served
    assert main(["rollout", "set", "25", "--agent", url]) == 0
    assert guard.rollout.state.percentage == 25
    assert "25% of migrations on protocol v3" in capsys.readouterr().out
    assert main(["rollout", "rollback", "--reason", "canary errors", "--agent", url]) == 0
    assert guard.rollout.state.frozen and guard.rollout.state.reason == "manual: canary errors"
    capsys.readouterr()
    assert main(["rollout", "set", "50", "--agent", url]) == 1  # frozen: refused, agent's message shown
    assert "frozen" in capsys.readouterr().err
    assert main(["rollout", "unfreeze", "--agent", url]) == 0
    capsys.readouterr()
    assert main(["rollout", "set", "50", "--agent", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["percentage"] == 50
    assert main(["rollout", "status", "--agent", url, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["rollout"]["percentage"] == 50 and status["decision"] == "GO"


def test_bad_requests_get_json_errors(served):
    _, url = served
    req = urllib.request.Request(f"{url}/api/v3/rollout", data=b'{"percentage": "lots"}', method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 409 and "integer" in json.loads(err.value.read())["error"]
    req = urllib.request.Request(f"{url}/api/v3/rollout", data=b"not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 400


def test_percentage_outside_0_100_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["rollout", "set", "150"])
    assert exc.value.code == 2
