"""Faults on the wire and on the destination: what is refused is counted, nothing bad is written,
and a migration that can finish does finish with its digest verified."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from datapath_support import PSK, CuttingProxy, Migrate, Receiver, run_migration

from dwcp_agent import wire
from dwcp_agent.amst.channel import TcpChannel
from dwcp_agent.hde.chunk import FLAG_ALL_ZERO, FLAG_PAGE_MAP, checksum
from dwcp_agent.hde.layout import PAGE_MAP_HEADER, PageKind
from dwcp_agent.migration.digest import object_digest
from dwcp_agent.migration.model import MigrationError, SendResult
from dwcp_agent.migration.receiver import open_session
from dwcp_agent.security import pki
from dwcp_agent.security.pki import ensure_ca
from dwcp_agent.security.sealed import TAG_BYTES
from dwcp_agent.telemetry.metrics import Metrics

MiB = 1 << 20


def _random_image(src_dir: Path, size: int) -> Path:
    path = src_dir / "random.img"
    path.write_bytes(os.urandom(size))
    return path


def test_data_stream_cut_mid_transfer_still_completes_verified(receiver: Receiver, migrate: Migrate,
                                                               src_dir: Path) -> None:
    source = _random_image(src_dir, 24 * MiB)
    proxy = CuttingProxy(receiver.port, cut_connection=2, cut_after=256 * 1024)
    try:
        result = migrate(receiver, source, port=proxy.port, compression_algo="none", stream_count=4,
                         pacing_rate_bytes="8MiB")
    finally:
        proxy.stop()
    assert proxy.cut_done.is_set()
    assert (receiver.dir / "out.img").read_bytes() == source.read_bytes()
    assert result.attempts == 1  # the other streams and a reconnected one carried the rest


def test_control_connection_cut_resumes_from_journal(receiver: Receiver, src_dir: Path, tmp_path: Path) -> None:
    size = 32 * MiB
    source = _random_image(src_dir, size)
    proxy = CuttingProxy(receiver.port, cut_connection=-1, cut_after=0)
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = run_migration(tmp_path, receiver, source, port=proxy.port, compression_algo="none",
                                              stream_count=2, pacing_rate_bytes="4MiB")
        except MigrationError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    deadline = time.monotonic() + 20
    sessions = receiver.server.sessions
    while time.monotonic() < deadline and not any(s.bytes_received > size // 3 for s in sessions.values()):
        time.sleep(0.02)
    time.sleep(0.2)  # let the journal group-commit what arrived
    proxy.cut(0)
    worker.join(60)
    proxy.stop()
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert isinstance(result, SendResult)
    assert result.attempts == 2
    assert result.skipped_bytes > size // 4  # the second attempt skipped what the journal held
    assert (receiver.dir / "out.img").read_bytes() == source.read_bytes()


# -- hostile or broken peers, driven frame by frame -------------------------------------------

def _connect(receiver: Receiver, role: str, key: bytes = PSK, session: int = 0, stream: int = 0,
             versions: tuple[int, ...] = wire.SUPPORTED_VERSIONS) -> socket.socket:
    sock = receiver.peer_channels("test-peer").wrap_client(
        socket.create_connection(("127.0.0.1", receiver.port), timeout=5))
    wire.client_handshake(sock, key, "test-peer", role, session, stream, versions=versions)
    return sock


def _data_stream(receiver: Receiver, session: int) -> TcpChannel:
    """A data stream as the source opens it (sealed after TLS), driven frame by frame."""
    return TcpChannel(_connect(receiver, "data", session=session))


def _send_raw_frame(stream: TcpChannel, frame: bytes | bytearray) -> None:
    """Any bytes as one frame: the first 56 as its header, the rest as its payload."""
    stream.send_frame(bytes(frame[:wire.HEADER_SIZE]), bytes(frame[wire.HEADER_SIZE:]))


def _open_session(receiver: Receiver, size: int = 2 * MiB) -> tuple[socket.socket, wire.Ready]:
    control = _connect(receiver, "control")
    wire.send_message(control, wire.Start("m-hostile", "vm-x", str(receiver.dir / "out.img"), size, MiB, 1))
    return control, wire.recv_message(control, wire.Ready)


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
            # ACKs (sealed: header + tag) may arrive before the close; anything else is not expected
            assert len(data) % (wire.HEADER_SIZE + TAG_BYTES) == 0
    except ConnectionResetError:
        return True


def _data_frame(ready: wire.Ready, payload: bytes, **changes: int) -> bytes:
    fields = dict(ftype=wire.FrameType.DATA, flags=0, codec=0, session=ready.session, stream=0, sequence=0,
                  offset=0, raw_len=len(payload), encoded_len=len(payload), checksum=checksum(payload))
    fields.update(changes)
    return wire.pack_header(**fields) + payload


@pytest.mark.parametrize(("mutate", "error_type"), [
    ("flip_payload_bit", "checksum"),
    ("bad_header_crc", "bad_header"),
    ("wrong_raw_length", "bad_length"),
    ("oversized_encoded_length", "bad_length"),
    ("bad_magic", "bad_header"),
    ("wrong_frame_version", "version"),
    ("offset_outside_image", "bad_offset"),
    ("sequence_gap", "sequence"),
])
def test_corrupt_frame_closes_the_stream_is_counted_and_never_written(receiver: Receiver, mutate: str,
                                                                     error_type: str) -> None:
    control, ready = _open_session(receiver)
    stream = _data_stream(receiver, ready.session)
    payload = os.urandom(MiB)
    if mutate == "flip_payload_bit":
        frame = bytearray(_data_frame(ready, payload))
        frame[wire.HEADER_SIZE + 12345] ^= 0x10
    elif mutate == "bad_header_crc":
        frame = bytearray(_data_frame(ready, payload))
        frame[wire.HEADER_SIZE - 1] ^= 0xFF
    elif mutate == "wrong_raw_length":
        frame = bytearray(_data_frame(ready, payload[:1000]))
    elif mutate == "oversized_encoded_length":
        frame = bytearray(_data_frame(ready, payload, encoded_len=64 * MiB))
    elif mutate == "bad_magic":
        frame = bytearray(_data_frame(ready, payload))
        frame[0] ^= 0xFF
    elif mutate == "wrong_frame_version":
        header = wire.pack_header(wire.FrameType.DATA, 0, 0, ready.session, 0, 0, 0, MiB, MiB, checksum(payload),
                                  version=9)
        frame = bytearray(header + payload)
    elif mutate == "offset_outside_image":
        frame = bytearray(_data_frame(ready, payload, offset=8 * MiB))
    else:
        frame = bytearray(_data_frame(ready, payload, sequence=5))
    # the receiver may close before we finish
    with contextlib.suppress(ConnectionResetError, BrokenPipeError, ssl.SSLError):
        _send_raw_frame(stream, frame)
    assert _closed_by_peer(stream.sock)
    assert receiver.wait_errors("amst", error_type) == 1
    control.close()
    stream.close()
    assert not (receiver.dir / "out.img").exists()


@pytest.mark.parametrize(("codec", "payload"), [(0, b"\0" * 4096), (1, b"")])
def test_all_zero_frame_with_a_payload_or_a_codec_is_refused(receiver: Receiver, codec: int, payload: bytes) -> None:
    """The receiver neither decodes nor writes an all-zero chunk of a fresh file, but still checks it."""
    control, ready = _open_session(receiver)
    stream = _data_stream(receiver, ready.session)
    frame = _data_frame(ready, payload, flags=FLAG_ALL_ZERO, codec=codec, raw_len=MiB, checksum=checksum(bytes(MiB)))
    with contextlib.suppress(ConnectionResetError, BrokenPipeError, ssl.SSLError):
        _send_raw_frame(stream, frame)
    assert _closed_by_peer(stream.sock)
    assert receiver.wait_errors("hde", "decode") == 1
    control.close()
    stream.close()
    assert not (receiver.dir / "out.img").exists()


def _page_map_payload(kinds: bytes, refs: tuple[int, ...], literals: bytes) -> bytes:
    body = kinds + b"".join(struct.pack("<Q", r) for r in refs) + literals
    return PAGE_MAP_HEADER.pack(len(body), 0) + body


@pytest.mark.parametrize(("fault", "component", "error_type"), [
    ("none", "", ""),
    ("checksum", "amst", "checksum"),
    ("forward_reference", "hde", "decode"),
    ("sections_do_not_add_up", "hde", "decode"),
])
def test_page_map_frame_is_verified_before_it_is_written(receiver: Receiver, fault: str, component: str,
                                                         error_type: str) -> None:
    """A page-map chunk (zero, literal and duplicate pages, as vm-mix sends them) goes through the
    receiver's page-map writer: written and acknowledged when it checks out, otherwise refused with
    the decoder's error kinds and nothing written."""
    control, ready = _open_session(receiver, size=MiB)
    stream = _data_stream(receiver, ready.session)
    pages = MiB // 4096
    literal = os.urandom(4096)
    kinds = bytes([PageKind.LITERAL] + [PageKind.ZERO, PageKind.DUP_IN] * ((pages - 1) // 2) + [PageKind.ZERO])
    refs = (0,) * ((pages - 1) // 2)
    chunk = literal + (bytes(4096) + literal) * ((pages - 1) // 2) + bytes(4096)
    payload = _page_map_payload(kinds, refs, literal)
    digest = checksum(chunk)
    if fault == "checksum":
        digest ^= 1
    elif fault == "forward_reference":
        payload = _page_map_payload(kinds, (5, *refs[1:]), literal)
    elif fault == "sections_do_not_add_up":
        payload = _page_map_payload(kinds, refs, literal + b"x")
    frame = _data_frame(ready, payload, flags=FLAG_PAGE_MAP, raw_len=MiB, checksum=digest)
    with contextlib.suppress(ConnectionResetError, BrokenPipeError, ssl.SSLError):
        _send_raw_frame(stream, frame)
    if fault == "none":
        assert stream.recv_ack(bytearray(wire.HEADER_SIZE)).sequence == 0
        wire.send_message(control, wire.Commit(object_digest(np.array([checksum(chunk)], dtype=np.uint64))))
        assert isinstance(wire.recv_message(control), wire.Committed)
        assert (receiver.dir / "out.img").read_bytes() == chunk
        assert (receiver.dir / "out.img").stat().st_blocks * 512 < MiB // 2 + 64 * 1024, "zero pages stay holes"
        # One hde operation, the decode, for the one chunk: the verify and the write are not in it.
        assert receiver.metrics.registry.get_sample_value("dwcp_v3_component_operations_total",
                                                          {"component": "hde"}) == 1
        assert receiver.metrics.registry.get_sample_value("dwcp_v3_migration_latency_seconds_count",
                                                          {"component": "hde"}) == 1
    else:
        assert _closed_by_peer(stream.sock)
        assert receiver.wait_errors(component, error_type) == 1
        assert not (receiver.dir / "out.img").exists()
        partial = receiver.dir / "out.img.dwcp-part"
        assert not partial.exists() or partial.stat().st_blocks == 0, "nothing written"
    control.close()
    stream.close()


def test_good_frame_is_acked_then_commit_with_missing_chunks_fails(receiver: Receiver) -> None:
    control, ready = _open_session(receiver, size=2 * MiB)
    stream = _data_stream(receiver, ready.session)
    payload = os.urandom(MiB)
    _send_raw_frame(stream, _data_frame(ready, payload))
    ack = stream.recv_ack(bytearray(wire.HEADER_SIZE))
    assert ack.type == wire.FrameType.ACK and ack.sequence == 0
    wire.send_message(control, wire.Commit(b"\0" * 16))
    with pytest.raises(wire.WireError, match="1 chunks are missing"):
        wire.recv_message(control)
    assert not (receiver.dir / "out.img").exists()


def test_unknown_version_is_refused_with_reason_on_both_sides(receiver: Receiver) -> None:
    with pytest.raises(wire.HandshakeError, match=r"unsupported protocol version.*\[7\].*speaks 3"):
        _connect(receiver, "control", versions=(7,))
    assert receiver.wait_errors("amst", "version") == 1


def test_wrong_key_is_refused_on_both_sides(receiver: Receiver) -> None:
    with pytest.raises(wire.HandshakeError, match="pre-shared keys differ"):
        _connect(receiver, "control", key=b"not-the-right-key-at-all-000000")
    assert receiver.wait_errors("amst", "auth") == 1


def test_sender_with_wrong_key_fails_without_retrying(receiver: Receiver, migrate: Migrate, src_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import datapath_support

    monkeypatch.setattr(datapath_support, "PSK", b"another-key-entirely-0000000000000")
    source = _random_image(src_dir, MiB)
    with pytest.raises(MigrationError, match="pre-shared keys differ") as err:
        migrate(receiver, source)
    assert err.value.error_type == "auth"
    assert not (receiver.dir / "out.img").exists()


# -- destination problems ------------------------------------------------------------------

UNPRIVILEGED = 65534  # nobody: the receiving agent as a non-root service user


@contextlib.contextmanager
def unprivileged_receiver(tmp_path: Path) -> Iterator[SimpleNamespace]:
    """A receiver whose destination directory it may not write to, running as an unprivileged uid.

    Root ignores directory permissions, so under root the receiver runs in a forked child that
    drops to uid/gid `nobody` before it starts (the sender stays here); otherwise in process."""
    if os.geteuid() != 0:
        receiver = Receiver(tmp_path)
        receiver.dir.chmod(0o500)
        try:
            yield SimpleNamespace(dir=receiver.dir, port=receiver.port, uid=os.geteuid())
        finally:
            receiver.dir.chmod(0o700)
            receiver.stop()
        return
    base = Path(tempfile.mkdtemp(prefix=f"dwcp-refs-perm-{os.getpid()}-"))
    # The sender's cluster CA (make_config of the test's tmp_path), and the receiver's certificate
    # issued now, readable by the unprivileged child.
    shutil.copytree(ensure_ca(tmp_path.parent / "cluster-ca"), base / "cluster-ca")
    pki.issue_node(base / "cluster-ca", "receiver", pki.NodeFiles.in_dir(base / "tls-receiver"))
    for path in [base, *base.rglob("*")]:
        os.chown(path, UNPRIVILEGED, UNPRIVILEGED)
    report_r, report_w = os.pipe()
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges for good, then serve until told to stop
        code = 1
        try:
            os.setgroups([])
            os.setgid(UNPRIVILEGED)
            os.setuid(UNPRIVILEGED)
            receiver = Receiver(base)
            receiver.dir.chmod(0o500)
            writable = os.access(receiver.dir, os.W_OK)
            os.write(report_w, f"{receiver.port} {os.geteuid()} {int(writable)}\n".encode())
            os.read(stop_r, 1)
            receiver.stop()
            code = 0
        except BaseException as exc:
            os.write(report_w, f"error {exc!r}\n".encode())
        finally:
            os._exit(code)
    try:
        ready, _, _ = select.select([report_r], [], [], 20)
        assert ready, "the unprivileged receiver did not start"
        line = os.read(report_r, 4096).decode().split()
        assert line[0] != "error", " ".join(line)
        port, uid, writable = map(int, line)
        assert not writable, "the receiver's uid can still write its destination directory"
        yield SimpleNamespace(dir=base / "dst", port=port, uid=uid)
    finally:
        os.write(stop_w, b"x")
        deadline = time.monotonic() + 10
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                break
            time.sleep(0.02)
        for fd in (report_r, report_w, stop_r, stop_w):
            os.close(fd)
        shutil.rmtree(base, ignore_errors=True)


def test_unwritable_destination_is_a_clear_error_and_source_untouched(migrate: Migrate, src_dir: Path,
                                                                      tmp_path: Path) -> None:
    source = _random_image(src_dir, MiB)
    before = source.read_bytes()
    with unprivileged_receiver(tmp_path / "receiver") as receiver:
        assert receiver.uid != 0
        with pytest.raises(MigrationError, match="not writable") as err:
            migrate(receiver, source)
        assert err.value.error_type == "unwritable"
        assert not (receiver.dir / "out.img").exists()
    assert source.read_bytes() == before


@pytest.fixture
def small_tmpfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill up needs root")
    mnt = tmp_path / "dst"
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_destination_without_space_refuses_before_sending(small_tmpfs: Path, migrate: Migrate,
                                                          src_dir: Path, tmp_path: Path) -> None:
    receiver = Receiver(tmp_path)
    try:
        source = _random_image(src_dir, 16 * MiB)
        before = source.read_bytes()
        with pytest.raises(MigrationError, match="not enough space") as err:
            migrate(receiver, source)
        assert err.value.error_type == "no_space"
        assert source.read_bytes() == before
        assert not (small_tmpfs / "out.img").exists()
        assert not any(s.bytes_received for s in receiver.server.sessions.values()), "refused before any data"
    finally:
        receiver.stop()


def test_destination_filling_up_mid_transfer_fails_cleanly(small_tmpfs: Path, migrate: Migrate,
                                                           src_dir: Path, tmp_path: Path) -> None:
    """Start checks and reserves the image's data bytes (below), but the journal beside the image
    grows as chunks arrive, and a landed chunk and its reservation both count until the next flush
    hands the reservation over: another writer that keeps taking every free byte once data flows
    makes a write fail (ENOSPC) mid-transfer, which must be reported as such, not as the up-front
    refusal. (A single write of the filler would race the reservation and could miss.)"""
    receiver = Receiver(tmp_path)
    filler = small_tmpfs / "filler"
    received_before_fill: list[int] = []
    migration_over = threading.Event()

    def fill_once_data_flows() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            received = sum(s.bytes_received for s in list(receiver.server.sessions.values()))
            if received:
                received_before_fill.append(received)
                break
            time.sleep(0.002)
        block = os.urandom(4096)
        with open(filler, "wb", buffering=0) as f:
            while not migration_over.is_set() and time.monotonic() < deadline:
                try:
                    f.write(block)
                except OSError:
                    time.sleep(0.0005)  # full: take whatever the destination frees next

    try:
        source = _random_image(src_dir, 3 * MiB)
        before = source.read_bytes()
        filling = threading.Thread(target=fill_once_data_flows, daemon=True)
        filling.start()
        try:
            with pytest.raises(MigrationError) as err:
                migrate(receiver, source, compression_algo="none", stream_count=1, pacing_rate_bytes="1MiB",
                        chunk_size="4KiB")
        finally:
            migration_over.set()
        filling.join(20)
        assert received_before_fill and received_before_fill[0] < 3 * MiB, "the fill came after the transfer"
        message = str(err.value)
        assert "No space left on device" in message, message  # a write failed (image or journal) ...
        assert "not enough space" not in message, message  # ... not the refusal at Start
        assert message.removeprefix("destination: peer failed: ").startswith(("cannot write", "cannot persist"))
        assert source.read_bytes() == before
        assert not (small_tmpfs / "out.img").exists()
        assert receiver.wait_errors("migration", err.value.error_type) >= 1
    finally:
        receiver.stop()


def test_space_reserved_at_start_is_not_taken_by_a_later_writer(small_tmpfs: Path, src_dir: Path,
                                                                tmp_path: Path) -> None:
    """The destination reserves the image's bytes at Start (issue 13 finding 8): a writer that
    grabs space afterwards gets ENOSPC instead of failing the migration mid-transfer."""
    receiver = Receiver(tmp_path)
    try:
        start = wire.Start("m-reserve", "vm", str(small_tmpfs / "out.img"), 3 * MiB, MiB, 1, "v3",
                           3 * MiB, [(0, 3 * MiB)])
        session = open_session(start, receiver.config.allowed_dest_dirs, Metrics())
        try:
            filler = small_tmpfs / "filler"
            with open(filler, "wb") as f, contextlib.suppress(OSError):
                f.write(os.urandom(3 * MiB + MiB // 2))
            assert filler.stat().st_size < 2 * MiB, "the reserved 3 MiB must stay with the migration"
            # on tmpfs the reservation is the partial's preallocated pages (space.PartialReservation)
            assert (small_tmpfs / "out.img.dwcp-part").stat().st_blocks * 512 >= 3 * MiB
            assert not (small_tmpfs / "out.img.dwcp-reserve").exists()
        finally:
            session.close()
    finally:
        receiver.stop()


def test_readonly_destination_is_a_clear_error(tmp_path: Path, migrate: Migrate, src_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    mnt = tmp_path / "dst"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,ro", "tmpfs", str(mnt)], check=True)
    receiver = Receiver(tmp_path)
    try:
        source = _random_image(src_dir, MiB)
        with pytest.raises(MigrationError, match=r"not writable|cannot create|Read-only") as err:
            migrate(receiver, source)
        assert err.value.error_type == "unwritable"
    finally:
        receiver.stop()
        subprocess.run(["umount", "-l", str(mnt)], check=False)
