"""Client of the agent's admin API, shared by the CLI, the demo, tests and benchmarks.

Every call carries the admin bearer token: from the `token` argument, else the file named by
`DWCP_ADMIN_TOKEN_FILE` (the same variable sets the agent's `admin_token_file`), else the file
the CLI's `--token-file` chose, else `admin_token_file` (or `state_dir`/admin.token) of the YAML
config in `DWCP_CONFIG` or /etc/dwcp-agent/config.yaml, else `/var/lib/dwcp-agent/admin.token`.
A missing file means no token: open routes (/health, /metrics) still answer.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from dwcp_agent.progress import ProgressBar

__all__ = ["DEFAULT_TOKEN_FILE", "TOKEN_ENV", "ApiError", "api_call", "follow", "read_token", "token_file",
           "use_token_file"]

TOKEN_ENV = "DWCP_ADMIN_TOKEN_FILE"
DEFAULT_TOKEN_FILE = "/var/lib/dwcp-agent/admin.token"
DEFAULT_CONFIG_FILE = "/etc/dwcp-agent/config.yaml"
_chosen_token_file: str | None = None


class ApiError(RuntimeError):
    """The agent refused the call (`status` is its HTTP status) or could not be reached (0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def use_token_file(path: str | None) -> None:
    """The CLI's `--token-file`: used when DWCP_ADMIN_TOKEN_FILE is not set."""
    global _chosen_token_file
    _chosen_token_file = path


def token_file() -> str:
    """Which file the token is read from (see the module docstring)."""
    return os.environ.get(TOKEN_ENV) or _chosen_token_file or _configured_token_file() or DEFAULT_TOKEN_FILE


def _configured_token_file() -> str | None:
    """admin_token_file (or state_dir/admin.token) of the agent's YAML config on this host."""
    path = os.environ.get("DWCP_CONFIG") or DEFAULT_CONFIG_FILE
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(data, dict):
        return None
    if data.get("admin_token_file"):
        return str(data["admin_token_file"])
    return str(Path(str(data["state_dir"])) / "admin.token") if data.get("state_dir") else None


def read_token(path: str | None = None) -> str | None:
    """The token in `path` (default: `token_file()`), or None when it cannot be read."""
    try:
        token = Path(path or token_file()).read_text().strip()
    except OSError:
        return None
    return token or None


def api_call(agent: str, method: str, path: str, body: dict[str, Any] | None = None,
             timeout: float = 30.0, token: str | None = None) -> dict[str, Any]:
    """Call the agent's admin API; errors carry the agent's own message."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    bearer = token if token is not None else read_token()
    if bearer:
        headers["Authorization"] = f"Bearer {bearer}"
    req = urllib.request.Request(agent.rstrip("/") + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            result: dict[str, Any] = json.loads(resp.read() or b"{}")
            return result
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except (ValueError, AttributeError):
            message = str(exc.reason)
        if exc.code == 401 and not bearer:
            message += (f" (no token: set {TOKEN_ENV} or --token-file; the agent writes one to "
                        "<state_dir>/admin.token unless admin_token_file is set)")
        raise ApiError(exc.code, f"agent answered {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ApiError(0, f"cannot reach the agent at {agent}: {reason} (is `dwcp-agent serve` running?)") from None


def follow(agent: str, migration_id: str, show_progress: bool, poll_s: float = 0.2) -> dict[str, Any]:
    """Poll a migration until it ends, drawing the progress bar."""
    bar = ProgressBar() if show_progress else None
    while True:
        m = api_call(agent, "GET", f"/api/v3/migrations/{migration_id}")
        if bar is not None:
            bar.update(m)
        if m["state"] not in ("running",):
            if bar is not None:
                bar.finish()
            return m
        time.sleep(poll_s)
