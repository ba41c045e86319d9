"""The transport interface: what striping, journal, integrity and HDE see of a data stream.

A migration's data streams carry DATA frames source -> destination and ACK frames back. Whether
the bytes go over a TCP socket or RDMA writes into registered slots, the session code only calls
these methods, so TCP and RDMA are interchangeable per stream and per attempt.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from typing import Protocol

from dwcp_agent import wire
from dwcp_agent.kernels import stream as native_stream
from dwcp_agent.security.sealed import TAG_BYTES, FrameKey, seal_stream

MAX_IOV = 512  # buffers per sendmsg, well under the kernel's IOV_MAX of 1024
SEAL_STAGING_BYTES = 128 << 10  # a sealed frame goes out through this much ciphertext at a time (stays in cache)


class DataChannel(Protocol):
    """Source side of one data stream."""

    transport: str

    def send_frame(self, header: bytes, *payload: bytes | memoryview) -> None:
        """Send one frame whose payload is the concatenation of `payload` (scatter-gather: pages
        go straight from the chunk buffer); blocks while the stream has no room."""
        ...

    def recv_ack(self, header_buf: bytearray) -> wire.FrameHeader:
        """Next ACK from the destination; raises WireError/OSError when the stream breaks."""
        ...

    def abort(self) -> None:
        """Break the stream from any thread: a blocked send_frame or recv_ack returns with an error."""
        ...

    def close(self) -> None:
        """Release the stream; only once no thread is using it any more."""
        ...


class FrameSource(Protocol):
    """Destination side of one data stream."""

    transport: str

    def recv_header(self, header_buf: bytearray) -> wire.FrameHeader:
        """Next frame header (checked by wire.unpack_header)."""
        ...

    def recv_payload(self, out: memoryview) -> memoryview:
        """The payload of the frame whose header was just read, `len(out)` bytes. TCP fills `out`;
        RDMA may return a view of the slot the bytes already landed in."""
        ...

    def send_ack(self, header: bytes) -> None:
        """Acknowledge frames up to the header's sequence (RDMA also returns the slot credit)."""
        ...

    def abort(self) -> None:
        """Break the stream from any thread (a blocked receive returns with an error)."""
        ...

    def close(self) -> None:
        """Release the stream; only once no thread is using it any more."""
        ...


class TcpChannel:
    """A data stream over one TCP connection (both directions of it: frames out, acks in).

    Given a TLS socket (security/channels.py), the stream is switched to sealed frames
    (security/sealed.py) before the first frame: AES-GCM per frame, sealed and sent by the native
    kernel straight from the payload segments, received by the native loop (`frame_receiver`).
    """

    transport = "tcp"

    def __init__(self, sock: socket.socket) -> None:
        self._send_key: FrameKey | None = None
        self._recv_key: FrameKey | None = None
        if isinstance(sock, ssl.SSLSocket):
            sock, self._send_key, self._recv_key = seal_stream(sock)
        self.sock = sock
        self.encrypted = self._send_key is not None
        self._trailer = TAG_BYTES if self.encrypted else 0
        self._sealed = bytearray(0)  # ciphertext staging, grown to the largest frame
        self._header: bytes | bytearray = b""  # associated data of the payload to open next
        self._tag = bytearray(TAG_BYTES)
        self._tag_view = memoryview(self._tag)
        # ACKs are 56-byte headers (sealed: + tag), one per chunk: read them in batches.
        self._ack_size = wire.HEADER_SIZE + self._trailer
        self._ack_out = memoryview(bytearray(self._ack_size))
        self._acks = bytearray(64 * self._ack_size)
        self._ack_view = memoryview(self._acks)
        self._ack_start = self._ack_end = 0

    def _staging(self, n: int) -> memoryview:
        if len(self._sealed) < n:
            self._sealed = bytearray(n)
        return memoryview(self._sealed)[:n]

    def send_frame(self, header: bytes, *payload: bytes | memoryview) -> None:
        if self._send_key is not None:  # header and payload each sealed: nothing but sizes in clear
            timeout = self.sock.gettimeout()
            native_stream.send_sealed_frame(self.sock.fileno(), self._send_key.cipher, header, payload,
                                            self._staging(SEAL_STAGING_BYTES), -1.0 if timeout is None else timeout)
            return
        parts = [part for part in payload if len(part)]
        views = [memoryview(header)] + [memoryview(part) for part in parts]
        first = 0
        while first < len(views):  # sendmsg may stop anywhere; resume mid-buffer
            sent = self.sock.sendmsg(views[first: first + MAX_IOV])
            while sent:
                if sent >= len(views[first]):
                    sent -= len(views[first])
                    first += 1
                else:
                    views[first] = views[first][sent:]
                    sent = 0

    def recv_ack(self, header_buf: bytearray) -> wire.FrameHeader:
        size = self._ack_size
        while self._ack_end - self._ack_start < size:
            if self._ack_start:
                pending = self._ack_end - self._ack_start
                self._acks[:pending] = self._acks[self._ack_start:self._ack_end]
                self._ack_start, self._ack_end = 0, pending
            got = self.sock.recv_into(self._ack_view[self._ack_end:])
            if got == 0:
                raise wire.PeerClosed("peer closed the connection")
            self._ack_end += got
        start = self._ack_start
        self._ack_start += size
        if self._recv_key is not None:
            self._recv_key.open_into(b"", self._ack_view[start:start + size], header_buf)
        else:
            header_buf[:] = self._acks[start:start + size]
        return wire.unpack_header(header_buf)

    def recv_header(self, header_buf: bytearray) -> wire.FrameHeader:
        if self._recv_key is None:
            return wire.recv_header(self.sock, header_buf)
        sealed = self._staging(wire.HEADER_SIZE + TAG_BYTES)
        wire.recv_exact_into(self.sock, sealed)
        self._recv_key.open_into(b"", sealed, header_buf)
        self._header = header_buf  # the caller keeps it until the payload is read
        return wire.unpack_header(header_buf)

    def recv_payload(self, out: memoryview) -> memoryview:
        if self._recv_key is None or not len(out):  # an empty payload is not sealed (send_frame)
            wire.recv_exact_into(self.sock, out)
            return out
        wire.recv_exact_into(self.sock, out)  # ciphertext straight into place, then its tag
        wire.recv_exact_into(self.sock, self._tag_view)
        self._recv_key.open_in_place(self._header, out, self._tag)
        return out

    def frame_receiver(self, file_fd: int, header_buf: bytearray, payload: memoryview, session: int, stream: int,
                       version: int, size: int, chunk_size: int) -> native_stream.RawFrameReceiver | None:
        """The native receive loop on this stream (None on a socket with a timeout). It fills
        `header_buf`, which the Python path then reads payloads against; a sealed stream's keys
        and nonce counters are shared by both."""
        if self.sock.gettimeout() is not None:
            return None
        self._header = header_buf
        return native_stream.RawFrameReceiver(
            self.sock.fileno(), file_fd, header_buf, payload, session, stream, version, size, chunk_size,
            recv_key=None if self._recv_key is None else self._recv_key.cipher,
            send_key=None if self._send_key is None else self._send_key.cipher)

    def send_ack(self, header: bytes) -> None:
        if self._send_key is not None:  # sealed into one buffer kept for the stream's ACKs (one sender)
            sealed = self._ack_out[:len(header) + TAG_BYTES]
            self._send_key.seal_into(b"", header, sealed)
            self.sock.sendall(sealed)
            return
        self.sock.sendall(header)

    def abort(self) -> None:
        # shutdown, not close: closing would free the descriptor number while another thread may
        # still be inside recv on it, and a new socket could be handed that number.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.abort()
        self.sock.close()
