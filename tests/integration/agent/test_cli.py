"""The command line: complete help everywhere, `migrate` with progress and summary, `status`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from dwcp_agent.cli import build_parser
from dwcp_agent.demo import LocalAgent

StartAgent = Callable[..., LocalAgent]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dwcp_agent", *args], capture_output=True, text=True,
                          timeout=timeout)


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)  # type: ignore[arg-type]


def test_top_level_help_lists_every_subcommand() -> None:
    out = _cli("--help")
    assert out.returncode == 0
    for name in ("serve", "migrate", "status", "cancel", "gen-image", "demo", "cluster", "vm", "rollout",
                 "sla-report"):
        assert name in out.stdout


@pytest.mark.parametrize("command", _subcommands())
def test_every_subcommand_has_a_description_and_documents_every_option(command: str) -> None:
    out = _cli(command, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: dwcp-agent" in out.stdout
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]  # type: ignore[index]
    assert sub.description, f"{command} has no description"
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help text"


def test_migrate_shows_progress_and_summary_then_status_lists_it(start_agent: StartAgent) -> None:
    source, dest = start_agent("src"), start_agent("dst")
    image = source.images / "vm.img"
    gen = _cli("gen-image", str(image), "--size", "6MiB", "--seed", "3")
    assert gen.returncode == 0, gen.stderr
    out = _cli("migrate", "--agent", source.url, "--source", str(image), "--to", f"127.0.0.1:{dest.data_port}",
               "--dest-path", str(dest.images / "vm.img"), "--vm-id", "vm-42")
    assert out.returncode == 0, out.stderr
    assert "100.0%" in out.stderr  # the progress line (not a terminal: one line per second and the last)
    for field in ("logical bytes:", "wire bytes:", "ratio:", "duration:", "throughput:", "digest verified: yes"):
        assert field in out.stdout
    assert "streams:         peak " in out.stdout and "network mode:    datacenter" in out.stdout
    listed = _cli("status", "--agent", source.url, "--json")
    migrations = json.loads(listed.stdout)["migrations"]
    assert [m["vm_id"] for m in migrations] == ["vm-42"]
    as_yaml = yaml.safe_load(_cli("status", "--agent", source.url, "-o", "yaml").stdout)
    assert as_yaml["migrations"][0]["id"] == migrations[0]["id"]
    wide = _cli("status", "--agent", source.url, "-o", "wide").stdout.splitlines()
    assert wide[0].split()[:6] == ["ID", "STATE", "VM", "DONE", "RATE", "MODE"]
    assert "datacenter" in wide[1] and migrations[0]["tcp_congestion"] in wide[1]
    assert (dest.images / "vm.img").read_bytes() == image.read_bytes()


def test_migrate_json_reports_failure_with_exit_1_and_source_untouched(start_agent: StartAgent) -> None:
    source = start_agent("src", retry_limit=0, connect_timeout_s=0.5)
    image = source.images / "vm.img"
    image.write_bytes(os.urandom(65536))
    out = _cli("migrate", "--agent", source.url, "--source", str(image), "--to", "127.0.0.1:1",
               "--dest-path", "/tmp/never.img", "--json")
    assert out.returncode == 1
    final = json.loads(out.stdout)
    assert final["state"] == "failed" and final["error_type"] == "connect"
    assert not Path("/tmp/never.img").exists()


def test_unreachable_agent_is_a_clear_error() -> None:
    out = _cli("status", "--agent", "http://127.0.0.1:1")
    assert out.returncode == 1
    assert "cannot reach the agent" in out.stderr


def test_config_check_validates_without_starting_anything(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(f"psk: {'k' * 32}\nstream_count: auto\nstate_dir: {tmp_path / 'never'}\n")
    out = _cli("config", "check", "--config", str(good), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["stream_count"] == 0 and json.loads(out.stdout)["psk"] == "<set>"
    assert not (tmp_path / "never").exists()  # nothing was started or created
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"psk: {'k' * 32}\nstream_count: 999\n")
    out = _cli("config", "check", "--config", str(bad))
    assert out.returncode == 2 and "stream_count" in out.stderr and "above the maximum 256" in out.stderr


def test_migrate_help_says_what_ctrl_c_does() -> None:
    out = _cli("migrate", "--help")
    assert "Ctrl-C cancels the running migration" in " ".join(out.stdout.split())
