"""Data-path test support: an in-process receiver on loopback, config and migrate helpers."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dwcp_agent.config import Config, load_config
from dwcp_agent.migration.sender import MigrationRequest, SendResult, SendSession
from dwcp_agent.migration.server import DataServer
from dwcp_agent.telemetry.metrics import Metrics

PSK = b"integration-test-key-0123456789abcdef"


def make_config(tmp: Path, **overrides: Any) -> Config:
    base: dict[str, Any] = dict(psk=PSK.decode(), data_port=0, listen_host="127.0.0.1", state_dir=str(tmp / "state"),
                                dest_dirs=[str(tmp / "dst")], source_dirs=[str(tmp / "src")], io_timeout_s=10.0,
                                connect_timeout_s=2.0, retry_limit=3)
    base.update(overrides)
    return load_config(environ={}, overrides=base)


class Receiver:
    """A DataServer on an ephemeral loopback port, with its metrics readable by the test."""

    def __init__(self, tmp: Path, **overrides: Any) -> None:
        (tmp / "dst").mkdir(exist_ok=True)
        self.dir = tmp / "dst"
        self.config = make_config(tmp, **overrides)
        self.metrics = Metrics()
        self.server = DataServer(self.config, self.metrics, PSK)
        self.server.start()
        self.port = self.server.port

    def errors(self, component: str, error_type: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "dwcp_v3_errors_total", {"component": component, "error_type": error_type})
        return value or 0.0

    def stop(self) -> None:
        self.server.stop(2.0)


Migrate = Callable[..., SendResult]


def run_migration(tmp_path: Path, receiver: Receiver, source: Path, dest_name: str = "out.img",
                  port: int | None = None, **overrides: Any) -> SendResult:
    """Run one migration to a receiver and return its result (raises MigrationError on failure)."""
    config = make_config(tmp_path, **overrides)
    request = MigrationRequest("m-" + os.urandom(4).hex(), "vm-test", source, "127.0.0.1",
                               port or receiver.port, str(receiver.dir / dest_name))
    return SendSession(config, Metrics(), PSK, request).run()
