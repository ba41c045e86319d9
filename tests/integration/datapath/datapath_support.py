"""Data-path test support: an in-process receiver on loopback, config and migrate helpers."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dwcp_agent.config import Config, load_config
from dwcp_agent.migration.model import MigrationRequest, SendResult
from dwcp_agent.migration.sender import SendSession
from dwcp_agent.migration.server import DataServer
from dwcp_agent.security import channels as channel_security
from dwcp_agent.security.channels import ChannelSecurity
from dwcp_agent.security.pki import ensure_ca
from dwcp_agent.telemetry.metrics import Metrics

PSK = b"integration-test-key-0123456789abcdef"


def make_config(tmp: Path, **overrides: Any) -> Config:
    base: dict[str, Any] = dict(psk=PSK.decode(), data_port=0, listen_host="127.0.0.1", state_dir=str(tmp / "state"),
                                dest_dirs=[str(tmp / "dst")], source_dirs=[str(tmp / "src")], io_timeout_s=10.0,
                                connect_timeout_s=2.0, retry_limit=3, node_id="source",
                                tls_auto_issue_ca_dir=str(ensure_ca(tmp / "cluster-ca")))
    base.update(overrides)
    return load_config(environ={}, overrides=base)


class Receiver:
    """A DataServer on an ephemeral loopback port, with its metrics readable by the test."""

    def __init__(self, tmp: Path, **overrides: Any) -> None:
        (tmp / "dst").mkdir(exist_ok=True)
        self.dir = tmp / "dst"
        self.tmp = tmp
        self.config = make_config(tmp, **{"node_id": "receiver", "tls_dir": str(tmp / "tls-receiver"), **overrides})
        self.metrics = Metrics()
        self.server = DataServer(self.config, self.metrics, PSK)
        self.server.start()
        self.port = self.server.port

    def peer_channels(self, node_id: str) -> ChannelSecurity:
        """TLS for a hand-driven test peer: a certificate from the same cluster CA."""
        config = make_config(self.tmp, node_id=node_id, tls_dir=str(self.tmp / f"tls-{node_id}"))
        return channel_security.for_config(config)

    def errors(self, component: str, error_type: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "dwcp_v3_errors_total", {"component": component, "error_type": error_type})
        return value or 0.0

    def wait_errors(self, component: str, error_type: str, at_least: float = 1, timeout: float = 5.0) -> float:
        """The error count once it reaches `at_least` (the server counts after it has answered)."""
        deadline = time.monotonic() + timeout
        while (value := self.errors(component, error_type)) < at_least and time.monotonic() < deadline:
            time.sleep(0.01)
        return value

    def stop(self) -> None:
        self.server.stop(2.0)


Migrate = Callable[..., SendResult]


def run_migration(tmp_path: Path, receiver: Receiver, source: Path, dest_name: str = "out.img",
                  port: int | None = None, protocol: str = "v3", **overrides: Any) -> SendResult:
    """Run one migration to a receiver and return its result (raises MigrationError on failure)."""
    config = make_config(tmp_path, **overrides)
    request = MigrationRequest("m-" + os.urandom(4).hex(), "vm-test", source, "127.0.0.1",
                               port or receiver.port, str(receiver.dir / dest_name), protocol=protocol)
    return SendSession(config, Metrics(), PSK, request).run()


class CuttingProxy:
    """A loopback TCP proxy that can cut one connection after it has carried `cut_after` bytes
    (with `flip`: alter that byte instead, once, and carry on, as a faulty link would).

    Connection 0 is the migration's control connection; 1..N are its data streams, in the
    order the source opened them.
    """

    def __init__(self, target_port: int, cut_connection: int, cut_after: int, flip: bool = False) -> None:
        self.target_port = target_port
        self.cut_connection = cut_connection
        self.cut_after = cut_after
        self.flip = flip
        self.cut_done = threading.Event()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._count = 0
        self._stopping = False
        self.connections: list[tuple[socket.socket, socket.socket]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.connections.append((client, upstream))
            number = self._count
            self._count += 1
            limit = self.cut_after if number == self.cut_connection else None
            threading.Thread(target=self._pump, args=(client, upstream, limit), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        carried = 0
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if self.flip and limit is not None and carried + len(data) > limit:
                    at = limit - carried
                    data = data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]
                    limit = None
                    self.cut_done.set()
                dst.sendall(data)
                carried += len(data)
                if limit is not None and carried >= limit:
                    self.cut_done.set()
                    break
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def cut(self, number: int) -> None:
        """Break connection `number` now, both directions (as a failing link would)."""
        for s in self.connections[number]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.cut_done.set()

    def stop(self) -> None:
        self._stopping = True
        self._listener.close()
