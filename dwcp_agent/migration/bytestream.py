"""Ordered byte streams over several data connections: the threaded driver of core/stream.py.

The live-migration path tunnels QEMU's migration stream through this: on the source,
`ByteStreamSource.feed_from(fd)` reads QEMU's output; on the destination, the bytes come out in
order on `output` (an fd); QEMU's return path goes back with `ByteStreamDestination.send_reverse`
and comes out of `ByteStreamSource.recv_reverse` (or `reverse_output`). Connections are added at
any time (`add_stream`) and may die at any time: their unacknowledged chunks go again on the
others. Memory in flight is bounded by `window_bytes` (see `window_for`: ~100 ms of predicted
bandwidth) on both sides. The protocol decisions are the core's; this module moves bytes,
buffers and timers. docs/migration-core.md describes the API and the frames.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from dwcp_agent import wire
from dwcp_agent.hde.chunk import ChunkDecoder, ChunkEncoder, checksum
from dwcp_agent.hde.codecs import CodecError, CodecId, codec_by_name
from dwcp_agent.migration.core import (
    Action,
    CloseStream,
    Deliver,
    Fail,
    Finished,
    FrameFault,
    InChunk,
    OutChunk,
    Release,
    SendAck,
    StreamAssembler,
    StreamSender,
    max_encoded_len,
)
from dwcp_agent.migration.core.stream import FLAG_END
from dwcp_agent.security.sealed import TAG_BYTES, FrameKey
from dwcp_agent.telemetry.metrics import Metrics

__all__ = ["ByteStreamDestination", "ByteStreamError", "ByteStreamSource", "StreamConfig", "window_for"]

MIN_WINDOW = 4 << 20
log = logging.getLogger("dwcp_agent.migration")


class ByteStreamError(Exception):
    """The byte stream ended without completing; `error_type` is an ErrorKind value."""

    def __init__(self, message: str, error_type: str) -> None:
        super().__init__(message)
        self.error_type = error_type


@dataclass(frozen=True)
class StreamConfig:
    """Both ends must agree on `chunk_size` (the destination's bound) and `window_bytes` (its
    reorder buffer: the source's window must not exceed it)."""

    chunk_size: int = 1 << 20
    window_bytes: int = 64 << 20
    codec: str = "none"          # HDE per chunk: zero and duplicate pages, then this codec
    zstd_level: int = 1
    dedupe: bool = False         # in-chunk duplicate pages (costs a hash per page)
    tick_s: float = 0.1
    max_idle_ticks: int = 100    # a session with no connection for this long fails for good
    reverse_chunk: int = 64 << 10


def window_for(bandwidth_bps: float, seconds: float = 0.1, chunk_size: int = 1 << 20,
               ceiling: int = 256 << 20) -> int:
    """Window holding `seconds` of the predicted bandwidth (bytes/s), within [4 MiB + 2 chunks, ceiling]."""
    return int(min(ceiling, max(MIN_WINDOW + 2 * chunk_size, bandwidth_bps * seconds)))


class _Conn:
    """One data connection: a reader thread and a writer thread, both ending when it breaks.

    With keys (security/sealed.py: a TLS connection switched by seal_stream) every frame goes
    sealed exactly as amst/channel.py TcpChannel does: header sealed alone, a non-empty payload
    sealed with the plain header as associated data. The writer thread alone uses `send_key` and
    the reader thread alone `recv_key`, so the counter nonces follow the byte order on the wire.
    """

    def __init__(self, stream: int, sock: socket.socket,
                 keys: tuple[FrameKey, FrameKey] | None = None) -> None:
        self.stream = stream
        self.sock = sock
        self.send_key: FrameKey | None = keys[0] if keys is not None else None
        self.recv_key: FrameKey | None = keys[1] if keys is not None else None
        self.acks: collections.deque[SendAck] = collections.deque()
        self.broken = False
        self.threads: list[threading.Thread] = []
        self._header = b""               # the last header read (associated data of its payload)
        self._sealed_out = bytearray(0)  # ciphertext staging of the writer thread
        self._sealed_in = bytearray(0)   # ciphertext staging of the reader thread

    @staticmethod
    def _staging(buf: bytearray, n: int) -> bytearray:
        return buf if len(buf) >= n else bytearray(n)

    def _seal(self, header: bytes, plain: bytes | memoryview, out: bytearray | memoryview) -> None:
        assert self.send_key is not None
        self.send_key.seal_into(header, plain, out)

    def send_headers(self, headers: list[bytes]) -> None:
        """Frames without payload (ACKs), in one write."""
        if self.send_key is None:
            self.sock.sendall(b"".join(headers))
            return
        sealed = bytearray(len(headers) * (wire.HEADER_SIZE + TAG_BYTES))
        view = memoryview(sealed)
        for i, header in enumerate(headers):
            at = i * (wire.HEADER_SIZE + TAG_BYTES)
            self._seal(b"", header, view[at:at + wire.HEADER_SIZE + TAG_BYTES])
        self.sock.sendall(sealed)

    def send_frame(self, header: bytes, segments: tuple[bytes | memoryview, ...]) -> None:
        parts = [memoryview(s) for s in segments if len(s)]
        if self.send_key is not None:  # header and payload each sealed: nothing but sizes in clear
            sealed_header = bytearray(len(header) + TAG_BYTES)
            self._seal(b"", header, sealed_header)
            if parts:
                plain = parts[0] if len(parts) == 1 else memoryview(b"".join(parts))
                self._sealed_out = self._staging(self._sealed_out, len(plain) + TAG_BYTES)
                sealed = memoryview(self._sealed_out)[:len(plain) + TAG_BYTES]
                self._seal(header, plain, sealed)
                parts = [sealed]
            header = bytes(sealed_header)
        views = [memoryview(header), *parts]
        while views:  # sendmsg may stop anywhere; resume mid-buffer
            sent = self.sock.sendmsg(views[:512])
            while sent and views:
                if sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0

    def recv_header(self, header_buf: bytearray) -> wire.FrameHeader:
        if self.recv_key is None:
            return wire.recv_header(self.sock, header_buf)
        sealed = bytearray(wire.HEADER_SIZE + TAG_BYTES)
        wire.recv_exact_into(self.sock, memoryview(sealed))
        self.recv_key.open_into(b"", memoryview(sealed), header_buf)
        self._header = bytes(header_buf)
        return wire.unpack_header(header_buf)

    def recv_payload(self, out: memoryview) -> None:
        """Fill `out` with the payload of the last header (checked and decrypted when sealed)."""
        if self.recv_key is None or not len(out):  # an empty payload is not sealed (send_frame)
            wire.recv_exact_into(self.sock, out)
            return
        self._sealed_in = self._staging(self._sealed_in, len(out) + TAG_BYTES)
        sealed = memoryview(self._sealed_in)[:len(out) + TAG_BYTES]
        wire.recv_exact_into(self.sock, sealed)
        self.recv_key.open_into(self._header, sealed, out)

    def shutdown(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class _Endpoint:
    """What both ends share: connections, the lock around the cores, acks, ticks, the outcome."""

    def __init__(self, session: int, config: StreamConfig, version: int,
                 sender: StreamSender, assembler: StreamAssembler, metrics: Metrics | None) -> None:
        self.session = session
        self.metrics = metrics
        self.frame_faults: collections.Counter[str] = collections.Counter()
        self.config = config
        self.version = version
        self.sender = sender          # what this end sends (forward data on the source)
        self.assembler = assembler    # what this end receives
        self.cond = threading.Condition()
        self.conns: dict[int, _Conn] = {}
        self.closed = False
        self.result: Finished | None = None
        self.error: ByteStreamError | None = None
        self.done = threading.Event()
        self.in_result: Finished | None = None
        self.in_error: ByteStreamError | None = None
        self.in_done = threading.Event()
        self._ticker = threading.Thread(target=self._tick_loop, name=f"bs-tick-{session:x}", daemon=True)
        self._ticker.start()

    # -- connections --------------------------------------------------------------------------

    def add_stream(self, sock: socket.socket, stream: int,
                   keys: tuple[FrameKey, FrameKey] | None = None) -> None:
        """Carry frames on an authenticated connection from now on (blocking mode is set here);
        `keys` (send, receive) from security.sealed.seal_stream seal every frame."""
        sock.settimeout(None)
        conn = _Conn(stream, sock, keys)
        with self.cond:
            if self.closed or stream in self.conns or self.error is not None:
                sock.close()
                return
            self.conns[stream] = conn
            self.sender.stream_up(stream)
            self.assembler.stream_up(stream)
        conn.threads = [threading.Thread(target=self._read_loop, args=(conn,), name=f"bs-rx-{stream}", daemon=True),
                        threading.Thread(target=self._write_loop, args=(conn,), name=f"bs-tx-{stream}",
                                         daemon=True)]
        for t in conn.threads:
            t.start()

    @property
    def streams(self) -> list[int]:
        with self.cond:
            return list(self.conns)

    def kill_stream(self, stream: int | None = None) -> tuple[int, int]:
        """Break one connection (as a network fault would; by default the one with the most chunks
        in flight): its unacknowledged chunks go again on the others at once. Returns (stream id,
        chunks requeued); (-1, 0) when there is no connection."""
        with self.cond:
            if stream is None:
                stream = max(self.conns, key=self.sender.in_flight, default=-1)
            conn = self.conns.get(stream)
            if conn is None:
                return -1, 0
            before = self.sender.requeued
            self._forget(conn)
            requeued = self.sender.requeued - before
        conn.shutdown()
        return stream, requeued

    def _forget(self, conn: _Conn) -> None:
        if self.conns.get(conn.stream) is conn:
            del self.conns[conn.stream]
            self.sender.stream_lost(conn.stream)
            self.assembler.stream_lost(conn.stream)
            self._pump()

    def _lost(self, conn: _Conn) -> None:
        with self.cond:
            self._forget(conn)
            self.cond.notify_all()
        conn.shutdown()

    # -- the write side of a connection ---------------------------------------------------------

    def _write_loop(self, conn: _Conn) -> None:
        try:
            while True:
                with self.cond:
                    while True:
                        if conn.broken or self.closed:
                            return
                        if conn.acks:
                            acks = list(conn.acks)
                            conn.acks.clear()
                            chunk = None
                            break
                        acks = []
                        chunk = self.sender.next_frame(conn.stream)
                        if chunk is not None:
                            break
                        self.cond.wait()
                if acks:
                    conn.send_headers([
                        wire.pack_header(wire.FrameType.ACK, FLAG_END if a.end else 0, 0, self.session, conn.stream,
                                         a.seq, a.offset, 0, 0, 0, self.version) for a in acks])
                if chunk is not None:
                    self._send_chunk(conn, chunk)
        except OSError:
            pass
        finally:
            self._lost(conn)

    def _send_chunk(self, conn: _Conn, chunk: OutChunk) -> None:
        segments = self._segments(chunk)
        header = wire.pack_header(wire.FrameType.DATA, chunk.flags, chunk.codec, self.session, conn.stream,
                                  chunk.seq, chunk.offset, chunk.raw_len, chunk.payload_len, chunk.checksum,
                                  self.version)
        conn.send_frame(header, segments)

    def _segments(self, chunk: OutChunk) -> tuple[bytes | memoryview, ...]:
        """The payload parts of a chunk this end sends (each end keeps them its own way)."""
        return ()

    # -- the read side of a connection ----------------------------------------------------------

    def _read_loop(self, conn: _Conn) -> None:
        header_buf = bytearray(wire.HEADER_SIZE)
        scratch = bytearray(max_encoded_len(max(self.config.chunk_size, self.config.reverse_chunk)))
        try:
            while not conn.broken:
                h = conn.recv_header(header_buf)
                if h.type == wire.FrameType.ACK:
                    with self.cond:
                        self.sender.acked(h.offset, end=bool(h.flags & FLAG_END))
                        self._pump()
                    continue
                with self.cond:
                    self.assembler.check(conn.stream, h)
                    duplicate = self.assembler.is_duplicate(h)
                if duplicate or h.flags & FLAG_END:
                    conn.recv_payload(memoryview(scratch)[: h.encoded_len])
                    handle: object = None
                else:
                    handle = self._receive_payload(conn, h, scratch)
                with self.cond:
                    self.assembler.arrived(conn.stream, h, handle)
                    self._pump()
        except FrameFault as exc:
            self._frame_fault(conn, str(exc), exc.kind)
        except wire.WireError as exc:
            if not conn.broken and not isinstance(exc, wire.PeerClosed):
                self._frame_fault(conn, str(exc), exc.error_type)
        except CodecError as exc:
            self._frame_fault(conn, f"chunk does not decode: {exc}", "decode")
        except OSError:
            pass
        finally:
            self._lost(conn)

    def _frame_fault(self, conn: _Conn, reason: str, kind: str) -> None:
        """A bad frame closes its connection only: counted (metric label = kind) and logged."""
        with self.cond:
            self.frame_faults[kind] += 1
        if self.metrics is not None:
            self.metrics.error("amst", kind)
        log.warning("byte stream %x, connection %d: %s", self.session, conn.stream, reason,
                    extra={"error_type": kind, "component": "amst"})

    def _receive_payload(self, conn: _Conn, h: wire.FrameHeader, scratch: bytearray) -> object:
        """Read, decode and verify one payload; returns the bytes to deliver."""
        if h.codec == CodecId.NONE and h.flags == 0:
            if h.encoded_len != h.raw_len:
                raise wire.FrameError("uncompressed chunk length mismatch", "bad_length")
            out = bytearray(h.raw_len)
            conn.recv_payload(memoryview(out))
        else:
            body = memoryview(scratch)[: h.encoded_len]
            conn.recv_payload(body)
            out = bytearray(h.raw_len)
            ChunkDecoder().decode(h.codec, h.flags, body, h.raw_len, memoryview(out))
        if checksum(memoryview(out)) != h.checksum:
            raise wire.FrameError(f"chunk at {h.offset} checksum mismatch", "checksum")
        return out

    # -- actions --------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Carry out what the cores decided (called with the lock held)."""
        for action in self.sender.take_ready():
            self._act(action, sending=True)
        for action in self.assembler.take_ready():
            self._act(action, sending=False)
        self.cond.notify_all()

    def _act(self, action: Action, sending: bool) -> None:
        if isinstance(action, SendAck):
            conn = self.conns.get(action.stream)
            if conn is not None:
                conn.acks.append(action)
        elif isinstance(action, Release):
            self._release(action.chunk)
        elif isinstance(action, Deliver):
            self._deliver(action.chunk)
        elif isinstance(action, CloseStream):
            conn = self.conns.get(action.stream)
            if conn is not None:
                conn.shutdown()
        elif isinstance(action, Finished | Fail):
            self._outcome(action, sending)

    def _release(self, chunk: OutChunk) -> None:
        return None

    def _deliver(self, chunk: InChunk) -> None:
        return None

    def _outcome(self, action: Finished | Fail, sending: bool) -> None:
        """The end of one direction: the main one (source -> destination) or the reverse one."""
        main = sending == isinstance(self, ByteStreamSource)
        if not main:
            if isinstance(action, Fail):
                self.in_error = ByteStreamError(action.reason, action.kind)
            else:
                self.in_result = action
            self.in_done.set()
        elif isinstance(action, Fail):  # the session is over: the reverse direction ends with it
            self.error = self.error or ByteStreamError(action.reason, action.kind)
            self.done.set()
            (self.assembler if sending else self.sender).fail(action.kind, action.reason)
        elif sending:
            self.result = action
            self.done.set()
        # The destination's main Finished counts once the writer has written the END (see _OrderedWriter).

    def wait(self, timeout: float | None = None) -> Finished:
        """Until the main direction completed: every byte written at the destination, in order,
        with the digest verified (or it failed: ByteStreamError)."""
        if not self.done.wait(timeout):
            raise TimeoutError("byte stream still running")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def _tick_loop(self) -> None:
        while True:
            with self.cond:
                if self.closed:
                    return
                self.sender.tick()
                self.assembler.tick()
                self._pump()
                self.cond.wait(self.config.tick_s)

    def close(self, linger_s: float = 5.0) -> None:
        """Stop: waits up to `linger_s` for the peer to close first (so the last acknowledgements
        reach it), then breaks every connection and joins the threads."""
        with self.cond:
            self.cond.wait_for(self._quiet, timeout=linger_s)
            self.closed = True
            conns = list(self.conns.values())
            self.cond.notify_all()
        for conn in conns:
            conn.shutdown()
        for conn in conns:
            for t in conn.threads:
                t.join(timeout=linger_s)
            conn.sock.close()
        self._ticker.join(timeout=linger_s)

    def _quiet(self) -> bool:
        """Nothing left to say to the peer."""
        return not self.conns


class ByteStreamSource(_Endpoint):
    """Source end: reads the input, cuts it into chunks, sends them; receives the reverse channel.

    `reverse_output`, if given, is an fd the reverse bytes are written to in order; otherwise read
    them with `recv_reverse`.
    """

    def __init__(self, session: int, config: StreamConfig | None = None, version: int = wire.PROTOCOL_VERSION,
                 reverse_output: int | None = None, metrics: Metrics | None = None,
                 encoder: ChunkEncoder | None = None) -> None:
        config = config or StreamConfig()
        if config.window_bytes < config.chunk_size:
            raise ValueError(f"window of {config.window_bytes} bytes cannot hold one chunk of {config.chunk_size}")
        # `encoder` (e.g. one whose CodecSelector follows the measured link) overrides config.codec.
        self.encoder = encoder or ChunkEncoder(codec_by_name(config.codec, config.zstd_level), dedupe=config.dedupe)
        self.raw_bytes = 0   # bytes read from the input
        self.wire_bytes = 0  # their encoded size (first sending; resends not counted)
        self.reverse_output = reverse_output
        self.reverse: collections.deque[bytes | bytearray] = collections.deque()
        self.reverse_bytes = 0
        self.reverse_written = 0  # reverse bytes written to reverse_output
        self._reverse_writer = _OrderedWriter(reverse_output, self) if reverse_output is not None else None
        slots = config.window_bytes // config.chunk_size + 2
        self._free: list[bytearray] = [bytearray(config.chunk_size) for _ in range(slots)]
        super().__init__(session, config, version, StreamSender(config.window_bytes, config.max_idle_ticks),
                         StreamAssembler(session, version, _reverse_window(config) + config.reverse_chunk,
                                         config.reverse_chunk, config.max_idle_ticks), metrics)
        if self._reverse_writer is not None:
            self._reverse_writer.start()

    # -- input ------------------------------------------------------------------------------------

    def set_window(self, window_bytes: int) -> None:
        """Bytes in flight from now on (window_for(predicted bandwidth)); at most the start value,
        since the destination's reorder buffer and this end's buffers were sized for it."""
        with self.cond:
            self.sender.set_window(max(self.config.chunk_size, min(window_bytes, self.config.window_bytes)))
            self.cond.notify_all()

    def feed_from(self, fd: int) -> int:
        """Read `fd` to its end, sending every byte; then mark the end of the stream. Returns the
        byte count. Blocks while the window is full."""
        total = 0
        while True:
            buf = self._take_buffer()
            if buf is None:
                break
            n = _fill(fd, memoryview(buf))
            if n == 0:
                with self.cond:
                    self._free.append(buf)
                break
            self._send(buf, n)
            total += n
        self.close_input()
        return total

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send bytes given by the caller (copied into pooled chunk buffers)."""
        view = memoryview(data).cast("B")
        while len(view):
            buf = self._take_buffer()
            if buf is None:
                raise self.error or ByteStreamError("the stream is closed", "stream_ended")
            n = min(len(view), len(buf))
            buf[:n] = view[:n]
            self._send(buf, n)
            view = view[n:]

    def close_input(self) -> None:
        """No more bytes: the END frame (with the rolling digest) goes out."""
        with self.cond:
            if not self.sender.ended and not self.sender.done:
                self.sender.end_of_input()
            self._pump()

    def _take_buffer(self) -> bytearray | None:
        with self.cond:
            need = min(self.config.chunk_size, self.sender.window_bytes)
            self.cond.wait_for(lambda: self.sender.done or self.closed or (
                self._free and self.sender.room() >= need))
            if self.sender.done or self.closed:
                return None
            return self._free.pop()

    def _send(self, buf: bytearray, n: int) -> None:
        encoded = self.encoder.encode(memoryview(buf)[:n])
        with self.cond:
            self.raw_bytes += n
            self.wire_bytes += encoded.payload_len
            self.sender.chunk_read(n, encoded.checksum, encoded.codec, encoded.flags, encoded.payload_len,
                                   (buf, encoded.segments))
            self.cond.notify_all()

    def _segments(self, chunk: OutChunk) -> tuple[bytes | memoryview, ...]:
        if chunk.handle is None:
            return ()
        return chunk.handle[1]  # type: ignore[index]

    def _release(self, chunk: OutChunk) -> None:
        if chunk.handle is not None:
            self._free.append(chunk.handle[0])  # type: ignore[index]
            chunk.handle = None

    # -- reverse channel --------------------------------------------------------------------------

    def _deliver(self, chunk: InChunk) -> None:
        if chunk.end:
            self.assembler.written(chunk)
            return
        if self._reverse_writer is not None:
            self._reverse_writer.put(chunk)
            return
        assert isinstance(chunk.handle, bytearray)
        self.reverse.append(chunk.handle)
        self.reverse_bytes += chunk.raw_len
        self.assembler.written(chunk)

    def recv_reverse(self, timeout: float | None = None) -> bytes:
        """The next reverse-channel bytes in order; b"" once the destination closed the channel
        (or the session is over). Raises TimeoutError when nothing came within `timeout`."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.reverse or self.in_done.is_set() or self.done.is_set(),
                                      timeout):
                raise TimeoutError("no reverse-channel bytes")
            if not self.reverse:
                return b""
            data = self.reverse.popleft()
            self.reverse_bytes -= len(data)
            return bytes(data)

    def _quiet(self) -> bool:
        return not self.conns or self.done.is_set()


class ByteStreamDestination(_Endpoint):
    """Destination end: checks, reorders and writes the bytes to `output` in order; sends the
    reverse channel."""

    def __init__(self, session: int, output: int | Callable[[memoryview], None],
                 config: StreamConfig | None = None, version: int = wire.PROTOCOL_VERSION,
                 metrics: Metrics | None = None) -> None:
        config = config or StreamConfig()
        self.written_bytes = 0
        self._writer = _OrderedWriter(output, self)
        super().__init__(session, config, version,
                         StreamSender(_reverse_window(config), config.max_idle_ticks),
                         StreamAssembler(session, version, config.window_bytes + config.chunk_size,
                                         config.chunk_size, config.max_idle_ticks), metrics)
        self._writer.start()

    def send_reverse(self, data: bytes | bytearray | memoryview) -> None:
        """Send bytes back to the source (QEMU's return path), in order; blocks while its window is full."""
        view = memoryview(data).cast("B")
        while len(view):
            with self.cond:
                self.cond.wait_for(lambda: self.sender.done or self.closed or self.sender.room() > 0)
                if self.sender.done or self.closed:
                    raise self.in_error or ByteStreamError("the reverse channel is closed", "stream_ended")
                n = min(len(view), self.config.reverse_chunk, self.sender.room())
                piece = bytes(view[:n])
                self.sender.chunk_read(n, checksum(piece), 0, 0, n, piece)
                self.cond.notify_all()
            view = view[n:]

    def close_reverse(self) -> None:
        with self.cond:
            if not self.sender.ended and not self.sender.done:
                self.sender.end_of_input()
            self._pump()

    def _segments(self, chunk: OutChunk) -> tuple[bytes | memoryview, ...]:
        return (chunk.handle,) if isinstance(chunk.handle, bytes) else ()

    def _deliver(self, chunk: InChunk) -> None:
        self._writer.put(chunk)


def _reverse_window(config: StreamConfig) -> int:
    return max(config.reverse_chunk * 16, MIN_WINDOW)


class _OrderedWriter:
    """Writes delivered chunks to the output on its own thread, in order, then tells the core."""

    def __init__(self, output: int | Callable[[memoryview], None], end: _Endpoint) -> None:
        self.output = output
        self.end = end
        self.queue: collections.deque[InChunk] = collections.deque()
        self._busy = False
        self._thread = threading.Thread(target=self._loop, name="bs-output", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, chunk: InChunk) -> None:
        """Called with the endpoint's lock held."""
        self.queue.append(chunk)

    def idle(self) -> bool:
        return not self.queue and not self._busy

    def _loop(self) -> None:
        end = self.end
        while True:
            with end.cond:
                end.cond.wait_for(lambda: self.queue or end.closed)
                if not self.queue:
                    return
                chunk = self.queue.popleft()
                self._busy = True
            try:
                if not chunk.end:
                    assert isinstance(chunk.handle, bytearray)
                    self._write(memoryview(chunk.handle))
            except OSError as exc:
                with end.cond:
                    self._busy = False
                    end.assembler.fail("io", f"cannot write the output: {exc.strerror}")
                    end._pump()
                return
            with end.cond:
                self._busy = False
                chunk.handle = None
                if isinstance(end, ByteStreamDestination):
                    end.written_bytes += chunk.raw_len
                elif isinstance(end, ByteStreamSource):
                    end.reverse_written += chunk.raw_len
                end.assembler.written(chunk)
                if chunk.end and isinstance(end, ByteStreamDestination) and not end.done.is_set():
                    end.result = Finished(chunk.offset, chunk.checksum)
                    end.done.set()
                end._pump()

    def _write(self, data: memoryview) -> None:
        if callable(self.output):
            self.output(data)
            return
        while len(data):
            data = data[os.write(self.output, data):]


def _fill(fd: int, view: memoryview) -> int:
    """Read into `view` until it is full, the input ends, or no more bytes are ready right now
    (a short chunk goes out at once: the live-migration stream is latency-sensitive at its end)."""
    got = os.readv(fd, [view])
    while got and got < len(view):
        ready, _, _ = select.select([fd], [], [], 0)
        if not ready:
            break
        n = os.readv(fd, [view[got:]])
        if n == 0:
            break
        got += n
    return got
