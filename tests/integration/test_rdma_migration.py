"""Real migrations through the data path with RDMA streams over the software verbs provider.

Source and destination run in this process on loopback: the control connection and each
stream's setup are real authenticated TCP, the chunk bytes move by RDMA WRITE WITH IMMEDIATE
between registered regions of the software provider (`tests/unit/rdma/softverbs.py`). Both sides
get their provider through the documented injection point, `amst.select.Transports(provider=...)`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit" / "rdma"))

from softverbs import SoftContext, SoftFabric, SoftProvider, SoftQP

from dwcp_agent.amst.select import Transports
from dwcp_agent.config import Config, load_config
from dwcp_agent.migration.model import MigrationError, MigrationRequest
from dwcp_agent.migration.sender import SendSession
from dwcp_agent.migration.server import DataServer
from dwcp_agent.security.pki import ensure_ca
from dwcp_agent.telemetry.metrics import Metrics

PSK = b"rdma-integration-key-0123456789abcdef"
CHUNK = 256 * 1024


def make_config(tmp: Path, **overrides: Any) -> Config:
    base: dict[str, Any] = dict(psk=PSK.decode(), data_port=0, listen_host="127.0.0.1", state_dir=str(tmp / "state"),
                                dest_dirs=[str(tmp / "dst")], source_dirs=[str(tmp / "src")], io_timeout_s=10.0,
                                connect_timeout_s=2.0, retry_limit=3, chunk_size=CHUNK, stream_count=3,
                                rdma_slots=4, node_id="source",
                                tls_auto_issue_ca_dir=str(ensure_ca(tmp / "cluster-ca")))
    base.update(overrides)
    return load_config(environ={}, overrides=base)


class Destination:
    def __init__(self, tmp: Path, provider: SoftProvider, **overrides: Any) -> None:
        self.dir = tmp / "dst"
        self.dir.mkdir(exist_ok=True)
        self.config = make_config(tmp, **{"node_id": "receiver", "tls_dir": str(tmp / "tls-receiver"), **overrides})
        self.metrics = Metrics()
        self.transports = Transports(self.config, self.metrics, provider)
        self.server = DataServer(self.config, self.metrics, PSK, transports=self.transports)
        self.server.start()

    def received(self, transport: str) -> float:
        return self.metrics.registry.get_sample_value("dwcp_v3_bytes_transferred_total", {
            "direction": "received", "mode": "datacenter", "transport": transport}) or 0.0

    def stop(self) -> None:
        self.server.stop(2.0)
        self.transports.close()


@pytest.fixture
def fabric() -> SoftFabric:
    return SoftFabric()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    path = src / "vm.img"
    rng = os.urandom(4 * 1024 * 1024)
    with open(path, "wb") as f:  # random, a 2 MiB hole (a HOLE frame), repeats
        f.write(rng)
        f.seek(2 * 1024 * 1024, os.SEEK_CUR)
        f.write(rng[: 1024 * 1024])
    return path


@pytest.fixture
def destination(tmp_path: Path, fabric: SoftFabric) -> Iterator[Destination]:
    d = Destination(tmp_path, SoftProvider(fabric))
    yield d
    d.stop()


def migrate(tmp: Path, dest: Destination, source: Path, provider: SoftProvider,
            **overrides: Any) -> tuple[SendSession, Any]:
    config = make_config(tmp, **overrides)
    request = MigrationRequest("m-" + os.urandom(4).hex(), "vm-rdma", source, "127.0.0.1", dest.server.port,
                               str(dest.dir / "out.img"))
    session = SendSession(config, Metrics(), PSK, request, transports=Transports(config, Metrics(), provider))
    return session, session.run()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_migration_over_rdma_arrives_identical_with_bytes_labelled_rdma(tmp_path: Path, destination: Destination,
                                                                        image: Path, fabric: SoftFabric) -> None:
    session, result = migrate(tmp_path, destination, image, SoftProvider(fabric))
    assert digest(destination.dir / "out.img") == digest(image)
    assert result.attempts == 1
    assert destination.received("rdma") > 0
    assert destination.received("tcp") == 0
    assert session.rdma_disabled == ""


class FailingProvider(SoftProvider):
    """The link fails at the source's `after`-th RDMA write: that queue pair goes to ERROR, and so
    does every other queue pair of the link at its next write, as when a port goes down. (With the
    other queue pairs left working, the lost chunk could be redone on them and the attempt finish
    over RDMA before the error was reaped: the test then saw one attempt, about 1 run in 8.)

    The failing write first waits (bounded) until `delivered()` holds, so that the destination has
    processed some RDMA chunks before the link breaks however the threads happen to be scheduled.
    """

    def __init__(self, fabric: SoftFabric, after: int, delivered: Callable[[], bool] = lambda: True) -> None:
        super().__init__(fabric)
        self.after = after
        self.delivered = delivered
        self.total = 0
        self.failed: list[SoftQP] = []
        self.qps: list[SoftQP] = []

    def open(self, port: Any) -> SoftContext:
        ctx = super().open(port)
        create = ctx.create_qp

        def create_qp(send_depth: int, recv_depth: int) -> SoftQP:
            qp = create(send_depth, recv_depth)
            self.qps.append(qp)
            if self.failed:  # the link is down: a queue pair made now fails at its first write
                qp.fail_after_writes = 0
            post = qp.post_write_imm

            def counted(*args: Any) -> None:
                self.total += 1
                if self.total == self.after:  # waits in the posting thread, outside the fabric
                    deadline = time.monotonic() + 10.0
                    while not self.delivered() and time.monotonic() < deadline:
                        time.sleep(0.005)
                    for other in self.qps:  # this very write is the first that fails
                        other.fail_after_writes = other.writes
                    self.failed.append(qp)
                post(*args)

            qp.post_write_imm = counted  # type: ignore[method-assign]
            return qp

        ctx.create_qp = create_qp  # type: ignore[method-assign]
        return ctx


def test_qp_error_mid_migration_fails_the_attempt_and_the_next_resumes_over_tcp_verified(
        tmp_path: Path, destination: Destination, image: Path, fabric: SoftFabric,
        caplog: pytest.LogCaptureFixture) -> None:
    provider = FailingProvider(fabric, after=6, delivered=lambda: destination.received("rdma") > 0)
    with caplog.at_level(logging.INFO, logger="dwcp_agent"):
        session, result = migrate(tmp_path, destination, image, provider)
    assert digest(destination.dir / "out.img") == digest(image)  # the destination verified the object digest too
    assert len(provider.failed) == 1
    assert result.attempts >= 2
    assert "wc_retry_exc_err" in session.rdma_disabled or "retry_exc_err" in session.rdma_disabled
    assert destination.received("rdma") > 0 and destination.received("tcp") > 0
    assert result.skipped_bytes > 0, "the TCP attempt did not resume from the journal"
    assert any("RDMA off for this migration" in r.getMessage() for r in caplog.records)


def test_peer_without_rdma_gets_tcp_and_the_log_says_why(tmp_path: Path, fabric: SoftFabric, image: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    dest = Destination(tmp_path, SoftProvider(fabric, ports=()))
    try:
        with caplog.at_level(logging.INFO, logger="dwcp_agent"):
            _, _result = migrate(tmp_path, dest, image, SoftProvider(fabric))
        assert digest(dest.dir / "out.img") == digest(image)
        assert dest.received("tcp") > 0 and dest.received("rdma") == 0
        assert any("does not offer RDMA" in r.getMessage() for r in caplog.records)
    finally:
        dest.stop()


def test_rdma_only_without_a_device_fails_clearly_and_writes_nothing(tmp_path: Path, destination: Destination,
                                                                     image: Path, fabric: SoftFabric) -> None:
    with pytest.raises(MigrationError) as info:
        migrate(tmp_path, destination, image, SoftProvider(fabric, ports=()), transport_mode="rdma_only")
    assert info.value.error_type == "rdma_unavailable"
    assert "no RDMA device (ibv_devices lists none)" in str(info.value)
    assert list(destination.dir.iterdir()) == []


def test_rdma_only_towards_a_peer_without_rdma_fails_before_anything_is_written(tmp_path: Path, fabric: SoftFabric,
                                                                                image: Path) -> None:
    dest = Destination(tmp_path, SoftProvider(fabric, ports=()))
    try:
        with pytest.raises(MigrationError) as info:
            migrate(tmp_path, dest, image, SoftProvider(fabric), transport_mode="rdma_only")
        assert info.value.error_type == "rdma_unavailable"
        assert "does not offer RDMA" in str(info.value)
        assert list(dest.dir.iterdir()) == []
    finally:
        dest.stop()


def test_destination_short_of_locked_memory_declines_and_the_stream_runs_over_tcp(tmp_path: Path,
                                                                                  fabric: SoftFabric,
                                                                                  image: Path) -> None:
    """The destination advertised RDMA, but registering its ring fails: each stream says why and uses TCP."""
    provider = SoftProvider(fabric)
    dest = Destination(tmp_path, provider)
    provider.memlock = 1  # shrinks after selection, as when other registrations used the budget
    try:
        _, _result = migrate(tmp_path, dest, image, SoftProvider(fabric))
        assert digest(dest.dir / "out.img") == digest(image)
        assert dest.received("tcp") > 0 and dest.received("rdma") == 0
        assert dest.metrics.registry.get_sample_value("dwcp_v3_rdma_errors_total", {"error_type": "declined"}) >= 1
    finally:
        dest.stop()
