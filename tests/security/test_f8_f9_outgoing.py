"""Findings 8 and 9, outgoing side (issue 13): any host:port is a target, migrations are not
capped and take their buffers before connecting, records never expire, space is not reserved up
front, and errors echo the remote's bytes. Each test here failed on commit 73d0f58."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dwcp_agent.config import load_config
from dwcp_agent.migration.manager import MigrationManager, RequestError
from dwcp_agent.telemetry.metrics import Metrics
from tests.security.security_support import tls_overrides

MiB = 1 << 20
KEY = b"security-test-key-0123456789abcdef"


def _manager(tmp_path: Path, **overrides: object) -> MigrationManager:
    (tmp_path / "src").mkdir(exist_ok=True)
    base: dict[str, object] = {"psk": KEY.decode(), "state_dir": str(tmp_path / "state"),
                               "source_dirs": [str(tmp_path / "src")], "connect_timeout_s": 1.0,
                               "io_timeout_s": 2.0, "retry_limit": 0, **tls_overrides(tmp_path)}
    base.update(overrides)
    return MigrationManager(load_config(environ={}, overrides=base), Metrics(), KEY)


def _image(tmp_path: Path, name: str = "vm.img") -> str:
    path = tmp_path / "src" / name
    path.write_bytes(os.urandom(MiB))
    return str(path)


@contextlib.contextmanager
def _listener(banner: bytes = b"") -> Iterator[int]:
    """A loopback TCP service that is not an agent: it sends `banner` (or nothing) and waits."""
    server = socket.create_server(("127.0.0.1", 0))
    conns: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conns.append(conn)
            if banner:
                with contextlib.suppress(OSError):
                    conn.sendall(banner)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(2)
        server.close()
        for conn in conns:
            conn.close()


def _close(request: object) -> None:
    image = getattr(request, "image", None)
    if image is not None:
        image.close()


def test_to_must_be_a_member_or_in_the_allowlist(tmp_path: Path) -> None:
    manager = _manager(tmp_path, acp_peers=["b=10.1.2.3:9877"])  # default migration_targets: loopback
    source = _image(tmp_path)
    for to in ("192.0.2.7:22", "[2001:db8::1]:9876", "10.1.2.4:9876"):
        with pytest.raises(RequestError, match="field 'to'"):
            _close(manager.parse_request({"source": source, "to": to, "dest_path": "/d/x.img"}))
    for to in ("10.1.2.3:9876", "127.0.0.1:9876"):
        _close(manager.parse_request({"source": source, "to": to, "dest_path": "/d/x.img"}))


def test_configured_targets_are_allowed(tmp_path: Path) -> None:
    manager = _manager(tmp_path, migration_targets=["*.dc1.example:9876", "[2001:db8::1]:*"])
    source = _image(tmp_path)
    for to in ("hv7.dc1.example:9876", "[2001:db8::1]:1234"):
        _close(manager.parse_request({"source": source, "to": to, "dest_path": "/d/x.img"}))
    for to in ("hv7.dc1.example:22", "127.0.0.1:9876", "evil.example:9876"):
        with pytest.raises(RequestError, match="field 'to'"):
            manager.parse_request({"source": source, "to": to, "dest_path": "/d/x.img"})


def test_errors_about_the_remote_do_not_echo_its_bytes(tmp_path: Path) -> None:
    manager = _manager(tmp_path)
    banner = b"SSH-2.0-OpenSSH_9.6 internal-build-secret\r\n" + b"\x00" * 64
    with _listener(banner) as port:
        request = manager.parse_request({"source": _image(tmp_path), "to": f"127.0.0.1:{port}",
                                         "dest_path": "/d/x.img"})
        migration = manager.start(request)
        assert migration.done.wait(20)
    assert migration.state == "failed"
    for leaked in ("SSH", "OpenSSH", "secret", "2d485353", "0x2d48"):
        assert leaked not in migration.error, migration.error
    assert "not a DWCP agent" in migration.error


def test_concurrent_outgoing_migrations_are_capped(tmp_path: Path) -> None:
    manager = _manager(tmp_path, connect_timeout_s=5.0, io_timeout_s=5.0)  # max_outgoing_migrations: 4
    with _listener() as port:  # accepts, never answers: migrations hang in the handshake
        started = []
        for i in range(4):
            request = manager.parse_request({"source": _image(tmp_path, f"vm{i}.img"), "to": f"127.0.0.1:{port}",
                                             "dest_path": f"/d/{i}.img"})
            started.append(manager.start(request))
        request = manager.parse_request({"source": _image(tmp_path, "vm9.img"), "to": f"127.0.0.1:{port}",
                                         "dest_path": "/d/9.img"})
        with pytest.raises(RequestError, match="max_outgoing_migrations"):
            manager.start(request)
        for m in started:
            manager.cancel(m.request.migration_id)
            assert m.done.wait(20)


def test_finished_records_expire(tmp_path: Path) -> None:
    manager = _manager(tmp_path, finished_record_ttl_s=1.0)
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    request = manager.parse_request({"source": _image(tmp_path), "to": f"127.0.0.1:{port}", "dest_path": "/d/x.img"})
    migration = manager.start(request)
    assert migration.done.wait(20)
    assert manager.get(request.migration_id) is migration
    time.sleep(1.2)
    assert manager.get(request.migration_id) is None
    assert manager.list() == []


BUFFERS = r"""
import os, socket, sys, time
from pathlib import Path
from dwcp_agent.config import load_config
from dwcp_agent.migration.manager import MigrationManager
from dwcp_agent.telemetry.metrics import Metrics
tmp, port = Path(sys.argv[1]), int(sys.argv[2])
key = b"k" * 32
config = load_config(environ={}, overrides={"psk": key.decode(), "state_dir": str(tmp / "state"),
    "source_dirs": [str(tmp / "src")], "connect_timeout_s": 5.0, "io_timeout_s": 5.0, "retry_limit": 0,
    "max_inflight_bytes": "64MiB", **({"tls_auto_issue_ca_dir": sys.argv[3]} if len(sys.argv) > 3 else {})})
manager = MigrationManager(config, Metrics(), key)
def rss():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) * 1024
before = rss()
migrations = []
for i in range(4):
    request = manager.parse_request({"source": str(tmp / "src" / "vm.img"), "to": f"127.0.0.1:{port}",
                                     "dest_path": f"/d/{i}.img", "migration_id": f"m{i}"})
    migrations.append(manager.start(request))
time.sleep(1.0)
print(rss() - before, sum(m.state == "running" for m in migrations), flush=True)
for m in migrations:
    manager.cancel(m.request.migration_id)
"""


def test_buffers_are_not_taken_before_the_destination_accepts(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "vm.img").write_bytes(os.urandom(256 * MiB // 64) * 64)  # 256 MiB: 4 full pools
    with _listener() as port:
        tls = list(tls_overrides(tmp_path).values())
        out = subprocess.run([sys.executable, "-c", BUFFERS, str(tmp_path), str(port), *tls], capture_output=True,
                             text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    growth, running = map(int, out.stdout.split()[:2])
    assert running == 4
    # Before: 4 x 64 MiB of chunk buffers while still connecting. Now: none until Ready.
    assert growth < 48 * MiB, f"RSS grew by {growth >> 20} MiB for 4 migrations still connecting"


def test_space_is_reserved_so_two_migrations_that_each_fit_do_not_both_fail(tmp_path: Path) -> None:
    """48 MiB free, two 32 MiB images: the second is refused at Start, the first keeps its space."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    from dwcp_agent import wire
    from dwcp_agent.migration.receiver import ReceiveError, open_session

    mnt = tmp_path / "dst"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)], check=True)
    try:
        first = open_session(wire.Start("m-a", "vm-a", str(mnt / "a.img"), 32 * MiB, MiB, 1), [mnt], Metrics())
        try:
            with pytest.raises(ReceiveError) as refused:
                open_session(wire.Start("m-b", "vm-b", str(mnt / "b.img"), 32 * MiB, MiB, 1), [mnt], Metrics())
            assert refused.value.error_type == "no_space"
            # on tmpfs the first migration's reservation is preallocated inside its partial
            assert sorted(p.name for p in mnt.iterdir()) == ["a.img.dwcp-journal", "a.img.dwcp-part"]
            assert (mnt / "a.img.dwcp-part").stat().st_blocks * 512 >= 32 * MiB
        finally:
            first.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
