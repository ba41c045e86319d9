"""The byte stream over TLS-authenticated connections switched to sealed frames (issue #13 item 2).

Live migration carries guest memory through this object; on a TLS connection both ends call
security.sealed.seal_stream and every frame (data, ACK, reverse, END) is sealed. A recording relay
between the two ends must see none of a known plaintext pattern (and does see it on the plaintext
path, so the check can fail), and one flipped ciphertext byte must break the connection without a
single altered byte reaching the output.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from dwcp_agent import wire
from dwcp_agent.migration.bytestream import ByteStreamDestination, ByteStreamError, ByteStreamSource, StreamConfig
from dwcp_agent.security import pki
from dwcp_agent.security.sealed import FrameKey, seal_stream
from tests.security.security_support import Relay

KEY = b"s" * 32
MARKER = b"GUEST-SECRET-PAGE-CONTENT-0123456789"
CONFIG = StreamConfig(chunk_size=64 << 10, window_bytes=1 << 20, tick_s=0.05, max_idle_ticks=20)
Keys = tuple[FrameKey, FrameKey] | None


def _context(ca_dir: Path, name: str, purpose: int) -> ssl.SSLContext:
    files = pki.NodeFiles.in_dir(ca_dir.parent / f"tls-{name}")
    pki.issue_node(ca_dir, name, files)
    ctx = ssl.SSLContext(purpose)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(files.cert), str(files.key))
    ctx.load_verify_locations(str(files.ca))
    return ctx


def _payload() -> bytes:
    """Random bytes with the marker in every 4 KiB page (nothing for HDE to squeeze away)."""
    pages = bytearray(os.urandom(2 << 20))
    for at in range(0, len(pages), 4096):
        pages[at:at + len(MARKER)] = MARKER
    return bytes(pages)


class _Pair:
    """A destination listening on loopback, a source connected to it through `relay_transform`."""

    def __init__(self, tmp_path: Path, sealed: bool, transform: Callable[[int, str, bytes], bytes] | None) -> None:
        self.output = bytearray()
        self.dest = ByteStreamDestination(7, self.output.extend, CONFIG)
        self.src = ByteStreamSource(7, CONFIG)
        self.server_ctx = self.client_ctx = None
        if sealed:
            ca = pki.ensure_ca(tmp_path / "ca")
            self.server_ctx = _context(ca, "dst", ssl.PROTOCOL_TLS_SERVER)
            self.client_ctx = _context(ca, "src", ssl.PROTOCOL_TLS_CLIENT)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.relay = Relay(self.listener.getsockname()[1], transform)
        self.accepted = threading.Thread(target=self._accept, daemon=True)
        self.accepted.start()

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(10)
        if self.server_ctx is not None:
            conn = self.server_ctx.wrap_socket(conn, server_side=True)
        peer = wire.server_handshake(conn, KEY, "dst")
        conn, keys = _seal(conn)
        self.dest.add_stream(conn, peer.stream, keys)

    def connect(self) -> Keys:
        sock = socket.create_connection(("127.0.0.1", self.relay.port), timeout=10)
        if self.client_ctx is not None:
            sock = self.client_ctx.wrap_socket(sock)
        wire.client_handshake(sock, KEY, "src", "live", 7, 1)
        sock, keys = _seal(sock)
        self.src.add_stream(sock, 1, keys)
        return keys

    def close(self) -> None:
        self.src.close(linger_s=1.0)
        self.dest.close(linger_s=1.0)
        self.relay.stop()
        self.listener.close()


def _seal(sock: socket.socket) -> tuple[socket.socket, Keys]:
    if not isinstance(sock, ssl.SSLSocket):
        return sock, None
    plain, send_key, recv_key = seal_stream(sock)
    return plain, (send_key, recv_key)


@pytest.mark.parametrize("sealed", [True, False], ids=["tls-sealed", "plaintext"])
def test_a_relay_sees_no_plaintext_of_the_stream_or_its_reverse_channel(tmp_path: Path, sealed: bool) -> None:
    data = _payload()
    pair = _Pair(tmp_path, sealed, None)
    try:
        assert (pair.connect() is not None) == sealed
        pair.src.write(data)
        pair.src.close_input()
        pair.dest.send_reverse(MARKER * 64)
        pair.dest.close_reverse()
        pair.src.wait(30)
        pair.dest.wait(30)
        back = b""
        while chunk := pair.src.recv_reverse(10):
            back += chunk
    finally:
        pair.close()
    assert bytes(pair.output) == data
    assert back == MARKER * 64
    recorded = bytes(pair.relay.recorded)
    assert len(recorded) > len(data)
    assert (MARKER in recorded) == (not sealed)


def test_a_flipped_ciphertext_byte_breaks_the_connection_and_delivers_nothing_altered(tmp_path: Path) -> None:
    data = _payload()
    seen = {"up": 0}

    def flip_once(_index: int, direction: str, chunk: bytes) -> bytes:
        if direction != "up":
            return chunk
        at = 600_000 - seen["up"]  # well past TLS and the handshakes: inside the sealed frames
        seen["up"] += len(chunk)
        if 0 <= at < len(chunk):
            return chunk[:at] + bytes([chunk[at] ^ 0x01]) + chunk[at + 1:]
        return chunk

    pair = _Pair(tmp_path, True, flip_once)
    try:
        pair.connect()
        writer = threading.Thread(target=_write_quietly, args=(pair.src, data), daemon=True)
        writer.start()
        with pytest.raises(ByteStreamError):
            pair.src.wait(30)  # its only connection broke: the session fails, nothing is guessed
        writer.join(10)
    finally:
        pair.close()
    assert pair.dest.frame_faults["tag"] == 1
    assert len(pair.output) < len(data)
    assert bytes(pair.output) == data[:len(pair.output)]


def _write_quietly(src: ByteStreamSource, data: bytes) -> None:
    try:
        src.write(data)
        src.close_input()
    except ByteStreamError:
        pass
