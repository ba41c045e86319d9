"""`dwcp-agent demo`: two agents on loopback migrate a synthetic VM image, end to end.

Everything real: two agent processes with their own ports and state directories, the admin API,
multi-stream TCP, journal and verified commit. The image is generated once and reused.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from dwcp_agent.client import TOKEN_ENV, ApiError, api_call, follow
from dwcp_agent.config import FIELDS
from dwcp_agent.migration.images import generate
from dwcp_agent.progress import human_bytes, summary
from dwcp_agent.security import pki

READY_TIMEOUT_S = 30.0


_HANDED_OUT: set[int] = set()  # never the same port twice from one process


def free_port() -> int:
    """A loopback port that is free now, chosen below the kernel's ephemeral range.

    An ephemeral port (what binding to port 0 returns) can be taken by any outgoing connection
    before the agent binds it; a port below that range is only ever taken by another bind.
    """
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(10_000, max(low, 10_001))
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free loopback port below {low}")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _harness_knob(name: str) -> bool:
    """DWCP_ variables of test and benchmark harnesses (DWCP_FUZZ_ITERATIONS, DWCP_SIM_SCHEDULES...):
    not config keys, so an agent would refuse to start with them in its environment."""
    return name.startswith("DWCP_") and name != "DWCP_CONFIG" and name[5:].lower() not in FIELDS


def _shared_token_file(root: Path) -> Path:
    """One admin token for the agents this process starts, and for its own `api_call`s.

    DWCP_ADMIN_TOKEN_FILE names it when set (tests set it once per session); otherwise it is
    created under `root` and exported to this process, so `api_call` finds it without arguments.
    """
    path = Path(os.environ.get(TOKEN_ENV) or root / "admin.token")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    os.environ[TOKEN_ENV] = str(path)
    return path


class LocalAgent:
    """An agent subprocess on loopback with its own state directory; restartable on the same ports."""

    def __init__(self, name: str, root: Path, psk_file: Path, env: dict[str, str] | None = None,
                 settings: dict[str, str] | None = None) -> None:
        self.name = name
        self.state_dir = root / name
        self.images = self.state_dir / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self.data_port = free_port()
        self.admin_port = free_port()
        self.log_path = self.state_dir / "agent.log"
        self.token_file = _shared_token_file(root)
        inherited = {k: v for k, v in os.environ.items() if not _harness_knob(k)}
        self.env = {**inherited, **(env or {}), TOKEN_ENV: str(self.token_file)}
        self.cmd = [sys.executable, "-m", "dwcp_agent", "serve", "--node-id", name, "--state-dir", str(self.state_dir),
                    "--data-port", str(self.data_port), "--admin-port", str(self.admin_port),
                    "--listen-host", "127.0.0.1", "--admin-host", "127.0.0.1", "--psk-file", str(psk_file),
                    "--set", f"dest_dirs={self.images}", "--set", f"source_dirs={self.images}",
                    # Agents under one root share a cluster CA and get node certificates from it.
                    "--set", f"tls_auto_issue_ca_dir={pki.ensure_ca(root / 'cluster-ca')}"]
        for key, value in (settings or {}).items():
            self.cmd += ["--set", f"{key}={value}"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(self.cmd, stdout=log_file, stderr=subprocess.STDOUT, env=self.env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent {self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if api_call(self.url, "GET", "/health", timeout=1.0).get("ready"):
                    return
            except ApiError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"agent {self.name} not ready after {timeout:.0f} s; see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as in a crash."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit status (SIGKILL after `timeout`)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def run_demo(size: int, state_dir: str, streams: int, codec: str, profile: str) -> int:
    root = Path(state_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    psk_file = root / "psk"
    if not psk_file.exists():
        psk_file.write_text(secrets.token_hex(32))
        psk_file.chmod(0o600)
    for name in ("source", "destination"):  # a fresh cluster each time; the generated image is kept
        for entry in (root / name).glob("*"):
            if entry.name != "images":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    env = {"STREAM_COUNT": str(streams), "COMPRESSION_ALGO": codec}
    source = LocalAgent("source", root, psk_file, env)
    dest = LocalAgent("destination", root, psk_file, env)
    try:
        image = source.images / f"vm-{profile}-{size}.img"
        if not image.exists() or image.stat().st_size != size:
            print(f"generating a {human_bytes(size)} {profile} VM image at {image} ...", file=sys.stderr)
            generate(image, size, profile, seed=42)
        target = dest.images / "vm-demo.img"
        target.unlink(missing_ok=True)
        source.wait_ready()
        dest.wait_ready()
        print(f"agents ready: source admin {source.url}, destination data 127.0.0.1:{dest.data_port}",
              file=sys.stderr)
        started = api_call(source.url, "POST", "/api/v3/migrations",
                           {"source": str(image), "to": f"127.0.0.1:{dest.data_port}", "dest_path": str(target),
                            "vm_id": "demo-vm"})
        final = follow(source.url, started["id"], show_progress=True)
        print(summary(final))
        (root / "last-demo.json").write_text(json.dumps(final, indent=1))
        return 0 if final["state"] == "completed" and final.get("digest_verified") else 1
    finally:
        for agent in (source, dest):
            code = agent.stop()
            print(f"agent {agent.name} stopped (exit {code}); log: {agent.log_path}", file=sys.stderr)
