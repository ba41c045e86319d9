"""systemd unit: `systemd-analyze verify` passes, the security exposure is OK or better, and the
unit has what the agent relies on (notify, watchdog, reload, memlock, state directory)."""

from __future__ import annotations

import configparser
import re
import subprocess
from pathlib import Path

from deploy_support import ROOT, need_tool

from dwcp_agent.config import load_config

UNIT = ROOT / "systemd" / "dwcp-agent.service"


def installed_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's agent (verify checks the binary exists)."""
    agent = ROOT / ".venv" / "bin" / "dwcp-agent"
    text = UNIT.read_text().replace("/opt/dwcp-agent/bin/dwcp-agent", str(agent))
    path = tmp_path / "dwcp-agent.service"
    path.write_text(text)
    return path


def unit_options() -> dict[str, list[str]]:
    options: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            options.setdefault(key, []).append(value)
    return options


def test_systemd_analyze_verify(tmp_path):
    tool = need_tool("systemd-analyze")
    result = subprocess.run([tool, "verify", str(installed_copy(tmp_path))], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_security_exposure_is_ok_or_better(tmp_path):
    tool = need_tool("systemd-analyze")
    result = subprocess.run([tool, "security", "--offline=true", "--no-pager", str(installed_copy(tmp_path))],
                            capture_output=True, text=True)
    match = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    assert match.group(2) in ("SAFE", "OK"), match.group(0)


def test_unit_has_what_the_agent_relies_on():
    o = unit_options()
    assert o["Type"] == ["notify"] and o["NotifyAccess"] == ["main"]
    assert o["Restart"] == ["on-failure"]
    assert o["LimitMEMLOCK"] == ["infinity"]
    assert o["StateDirectory"] == ["dwcp-agent"]
    assert o["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert o["WatchdogSec"] and o["ExecStart"][0].split()[1] == "serve"
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(UNIT.read_text())
    assert parser.sections() == ["Unit", "Service", "Install"]


def test_example_config_and_env_file_use_real_keys():
    config = load_config(ROOT / "systemd" / "config.yaml", environ={})
    assert config.admin_port == 8080 and config.admin_host == "127.0.0.1" and config.metrics_port == 9878
    env = {}
    for line in (ROOT / "systemd" / "dwcp-agent.env").read_text().splitlines():
        line = line.lstrip("#").strip()
        if re.fullmatch(r"[A-Z_]+=\S+", line):
            key, _, value = line.partition("=")
            env[key] = value
    env["DWCP_PSK_FILE"] = "/etc/dwcp-agent/psk"
    load_config(environ={k: v for k, v in env.items() if not k.startswith("OTEL_")})
