"""Attackers for the security tests: relays on loopback, and raw clients that may hold a certificate.

Every helper works against the code before channel encryption (plain TCP) and after it (TLS with
a cluster certificate), so a test shows the behaviour changed, not only that an API appeared.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from dwcp_agent import wire

CA_DIRNAME = "cluster-ca"
PSK = b"security-test-key-0123456789abcdef"


def tls_overrides(root: Path) -> dict[str, Any]:
    """Certificates for an in-process server, on code that has channel encryption."""
    from dwcp_agent.config import FIELDS

    if "tls_auto_issue_ca_dir" not in FIELDS:
        return {}
    from dwcp_agent.security.pki import ensure_ca

    return {"tls_auto_issue_ca_dir": str(ensure_ca(root / CA_DIRNAME))}


def attacker_context(ca_dir: Path, name: str = "mallory") -> ssl.SSLContext | None:
    """A TLS client context with a genuine cluster certificate for `name`, when the code under
    test has channel encryption (a CA directory exists); None for the plaintext code."""
    if not (ca_dir / "ca.key").exists():
        return None
    from dwcp_agent.security import pki  # only present with channel encryption

    files = pki.NodeFiles.in_dir(ca_dir.parent / f"tls-{name}")
    pki.issue_node(ca_dir, name, files)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_cert_chain(str(files.cert), str(files.key))
    ctx.load_verify_locations(str(files.ca))
    return ctx


def open_raw(port: int, ctx: ssl.SSLContext | None, timeout: float = 5.0) -> socket.socket:
    """A connection to a loopback agent port, TLS-wrapped when `ctx` is given."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return ctx.wrap_socket(sock) if ctx is not None else sock


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the peer closes (or resets) the connection within `seconds`."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


class Relay:
    """A loopback TCP relay to `target_port`; `transform(conn_index, direction, data)` sees and may
    change every byte (direction 'up' is client -> target); all bytes are recorded."""

    def __init__(self, target_port: int,
                 transform: Callable[[int, str, bytes], bytes] | None = None) -> None:
        self.target_port = target_port
        self.transform = transform or (lambda _i, _d, data: data)
        self.recorded = bytearray()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._stopped = False
        self._count = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            index = self._count
            self._count += 1
            self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, index, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, index, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, index: int, direction: str) -> None:
        try:
            while data := src.recv(1 << 16):
                with self._lock:
                    self.recorded += data
                    out = self.transform(index, direction, data)
                dst.sendall(out)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.close()


class FrameRewriter:
    """An on-path attacker that rewrites one chunk of a migration and fixes everything unkeyed.

    On a plaintext DWCP stream it parses frames, replaces the first 16 bytes of chunk 0 (codec
    none), recomputes that frame's xxh3 and header CRC, and rewrites the Commit digest from the
    checksums it saw, so unkeyed integrity cannot notice. On anything it cannot parse (TLS) it
    flips one byte after the first 8 KiB of each connection's upstream direction.
    """

    EVIL = b"rewritten-by-mitm"[:16]

    def __init__(self) -> None:
        self.buffers: dict[int, bytearray] = {}
        self.blind: dict[int, int] = {}  # connection -> bytes passed in blind mode
        self.checksums: dict[int, int] = {}
        self.chunk_size = 0
        self.size = 0
        self.rewrote_chunk = False
        self.rewrote_commit = False

    def __call__(self, index: int, direction: str, data: bytes) -> bytes:
        if direction != "up":
            return data
        if index in self.blind:
            return self._flip(index, data)
        buf = self.buffers.setdefault(index, bytearray())
        buf += data
        out = bytearray()
        while len(buf) >= wire.HEADER_SIZE:
            try:
                h = wire.unpack_header(bytes(buf[:wire.HEADER_SIZE]))
            except wire.FrameError:
                self.blind[index] = 0
                rest = bytes(buf)
                buf.clear()
                return bytes(out) + self._flip(index, rest)
            if h.type == wire.FrameType.ACK:
                out += buf[:wire.HEADER_SIZE]
                del buf[:wire.HEADER_SIZE]
                continue
            total = wire.HEADER_SIZE + h.encoded_len
            if len(buf) < total:
                break
            payload = bytes(buf[wire.HEADER_SIZE:total])
            del buf[:total]
            out += self._rewrite(h, payload)
        return bytes(out)

    def _flip(self, index: int, data: bytes) -> bytes:
        passed = self.blind[index]
        self.blind[index] = passed + len(data)
        at = 8192 - passed
        if 0 <= at < len(data):
            data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
        return data

    def _rewrite(self, h: wire.FrameHeader, payload: bytes) -> bytes:
        if h.type == wire.FrameType.CONTROL:
            msg = wire.decode_message(h, payload)
            if isinstance(msg, wire.Start):
                self.chunk_size, self.size = msg.chunk_size, msg.size
            if isinstance(msg, wire.Commit) and self.chunk_size:
                count = (self.size + self.chunk_size - 1) // self.chunk_size
                sums = np.array([self.checksums.get(i, 0) for i in range(count)], dtype="<u8")
                self.rewrote_commit = True
                return wire.encode_message(wire.Commit(xxhash.xxh3_128_digest(sums.tobytes())))
            return h.pack() + payload
        index = h.offset // self.chunk_size if self.chunk_size else -1
        if index == 0 and h.codec == 0 and h.flags == 0 and len(payload) >= 16:
            payload = self.EVIL + payload[16:]
            self.rewrote_chunk = True
            h = wire.FrameHeader(h.version, h.type, h.flags, h.codec, h.session, h.stream, h.sequence, h.offset,
                                 h.raw_len, h.encoded_len, xxhash.xxh3_64_intdigest(payload))
        self.checksums[index] = h.checksum
        return h.pack() + payload


def first_flight(ctx: ssl.SSLContext | None) -> bytes:
    """The first bytes a client sends: a TLS ClientHello, or (plaintext code) a DWCP Hello frame."""
    if ctx is None:
        return wire.encode_message(wire.Hello([wire.PROTOCOL_VERSION], "trickler", b"n" * wire.NONCE_BYTES, "control"))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=False)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()
