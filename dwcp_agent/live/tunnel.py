"""One end of the tunnel that carries a QEMU migration stream between two agents.

Two kinds of authenticated connections (handshake role `live`, same session id): stream 0 is the
control connection (frames.py: CONTROL messages only); streams 1..N carry QEMU's byte stream
through the migration core's stream object (migration/bytestream.py). On the source, QEMU's
outgoing stream is cut into chunks, each HDE-encoded with the codec the CodecSelector picks for
the measured link, striped over the data connections and put back in order at the destination,
which writes it into its QEMU; QEMU's return path goes back over the reverse channel. A data
connection that breaks only costs its unacknowledged chunks, sent again on the others.

Memory in flight is bounded by the source's window: about 100 ms of the predicted bandwidth
(`bound_to_bandwidth`), never more than WINDOW_CEILING (the destination's reorder buffer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading

import msgspec

from dwcp_agent.hde.chunk import ChunkEncoder
from dwcp_agent.hde.selector import CodecSelector
from dwcp_agent.live import messages
from dwcp_agent.live.frames import FrameKind, TunnelError, read_frame, write_frame
from dwcp_agent.migration.bytestream import (
    ByteStreamDestination,
    ByteStreamError,
    ByteStreamSource,
    StreamConfig,
    window_for,
)
from dwcp_agent.security.sealed import FrameKey

__all__ = ["DATA_STREAMS", "Tunnel", "TunnelError", "new_session"]

log = logging.getLogger("dwcp_agent.live")
CHUNK_BYTES = 256 * 1024
WINDOW_CEILING = 32 * 1024 * 1024
IN_FLIGHT_S = 0.1
DATA_STREAMS = 4
CLOSE_LINGER_S = 2.0
# Both ends build the same config: the destination's reorder buffer holds the source's largest window.
STREAM_CONFIG = StreamConfig(chunk_size=CHUNK_BYTES, window_bytes=WINDOW_CEILING, reverse_chunk=64 * 1024,
                             max_idle_ticks=100)


def new_session() -> int:
    """A session id for one live migration (names its data connections at the destination)."""
    return int.from_bytes(os.urandom(4), "little") | 1


class Tunnel:
    """The agent's side of one live migration: its control connection and, once QEMU's socket is
    attached, the byte stream over the data connections."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: int,
                 selector: CodecSelector | None = None, keys: tuple[FrameKey, FrameKey] | None = None) -> None:
        self.reader = reader
        # sealed control frames (security/sealed.py) when the connection came over TLS
        self.send_key: FrameKey | None = keys[0] if keys is not None else None
        self.recv_key: FrameKey | None = keys[1] if keys is not None else None
        self.writer = writer
        self.session = session
        self.selector = selector
        self.control: asyncio.Queue[messages.Message | TunnelError] = asyncio.Queue()
        self.stream: ByteStreamSource | ByteStreamDestination | None = None
        self._qemu: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._return_read = 0
        self.closed = False

    # -- counters --------------------------------------------------------------------------------

    @property
    def raw_bytes_out(self) -> int:
        return self.stream.raw_bytes if isinstance(self.stream, ByteStreamSource) else 0

    @property
    def wire_bytes_out(self) -> int:
        return self.stream.wire_bytes if isinstance(self.stream, ByteStreamSource) else 0

    @property
    def return_bytes(self) -> int:
        """QEMU's return path: bytes written into the source QEMU (source) or read from the
        destination QEMU (destination)."""
        if isinstance(self.stream, ByteStreamSource):
            return self.stream.reverse_written
        return self._return_read

    @property
    def resent_chunks(self) -> int:
        return self.stream.sender.requeued if isinstance(self.stream, ByteStreamSource) else 0

    @property
    def ratio(self) -> float:
        return self.raw_bytes_out / self.wire_bytes_out if self.wire_bytes_out else 1.0

    def data_sockets(self) -> list[tuple[int, socket.socket]]:
        """The live data connections (stream id, socket), for TCP_INFO sampling."""
        if self.stream is None:
            return []
        with self.stream.cond:
            return [(stream, conn.sock) for stream, conn in self.stream.conns.items()]

    def bound_to_bandwidth(self, bytes_per_s: float) -> None:
        if isinstance(self.stream, ByteStreamSource):
            self.stream.set_window(window_for(bytes_per_s, IN_FLIGHT_S, CHUNK_BYTES, WINDOW_CEILING))

    # -- control ---------------------------------------------------------------------------------

    async def send(self, message: messages.Message) -> None:
        write_frame(self.writer, FrameKind.CONTROL, messages.encode(message), key=self.send_key)
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise TunnelError(f"tunnel connection lost: {exc}") from exc

    async def recv_control(self, timeout: float) -> messages.Message:
        try:
            item = await asyncio.wait_for(self.control.get(), timeout)
        except TimeoutError as exc:
            raise TunnelError(f"peer agent sent nothing for {timeout:.0f} s") from exc
        if isinstance(item, TunnelError):
            raise item
        return item

    def start_reader(self) -> None:
        """Start dispatching incoming control frames (before any control exchange)."""
        self._tasks.append(asyncio.create_task(self._read_loop()))

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await read_frame(self.reader, self.recv_key)
                if frame.kind is not FrameKind.CONTROL:
                    raise TunnelError(f"unexpected {frame.kind.name} frame on the control connection")
                try:
                    self.control.put_nowait(messages.decode(frame.payload))
                except msgspec.DecodeError as exc:
                    raise TunnelError(f"malformed control message: {exc}") from exc
        except TunnelError as exc:
            self.control.put_nowait(exc)

    # -- the byte stream -------------------------------------------------------------------------

    def check(self) -> None:
        """Raise TunnelError once the byte stream failed (no data connection left, bad digest...)."""
        if self.stream is not None and self.stream.error is not None:
            raise TunnelError(f"byte stream failed: {self.stream.error}")

    def attach_source(self, qemu: socket.socket,
                      data_conns: list[tuple[socket.socket, tuple[FrameKey, FrameKey] | None]]) -> None:
        """QEMU's outgoing socket: its bytes go out over `data_conns` (socket, sealing keys or None),
        the return path comes in."""
        qemu.setblocking(True)
        self._qemu = qemu
        encoder = ChunkEncoder(selector=self.selector or CodecSelector(), dedupe=False)
        source = ByteStreamSource(self.session, STREAM_CONFIG, reverse_output=qemu.fileno(), encoder=encoder)
        self.stream = source
        source.set_window(window_for(0.0, IN_FLIGHT_S, CHUNK_BYTES, WINDOW_CEILING))  # until a prediction
        for stream, (sock, keys) in enumerate(data_conns, start=1):
            source.add_stream(sock, stream, keys)
        self._spawn(self._feed, "live-feed")

    def attach_destination(self, qemu: socket.socket) -> None:
        """The destination QEMU's incoming socket: the stream goes into it, its return path back."""
        qemu.setblocking(True)
        self._qemu = qemu
        self.stream = ByteStreamDestination(self.session, qemu.fileno(), STREAM_CONFIG)
        self._spawn(self._pump_return, "live-return")
        self._spawn(self._end_of_stream, "live-eos")

    def add_stream(self, sock: socket.socket, stream: int,
                   keys: tuple[FrameKey, FrameKey] | None = None) -> bool:
        """A data connection of this session arrived (destination; listener thread)."""
        if self.stream is None or self.closed or stream < 1:
            return False
        self.stream.add_stream(sock, stream, keys)
        return True

    def kill_stream(self) -> tuple[int, int]:
        """Break the data connection with the most chunks in flight (fault injection)."""
        if self.stream is None:
            return -1, 0
        return self.stream.kill_stream()

    def _spawn(self, target: object, name: str) -> None:
        thread = threading.Thread(target=target, name=f"{name}-{self.session:x}", daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _feed(self) -> None:
        assert isinstance(self.stream, ByteStreamSource) and self._qemu is not None
        with contextlib.suppress(OSError, ByteStreamError):
            self.stream.feed_from(self._qemu.fileno())

    def _pump_return(self) -> None:
        assert isinstance(self.stream, ByteStreamDestination) and self._qemu is not None
        with contextlib.suppress(OSError, ByteStreamError):
            while data := self._qemu.recv(STREAM_CONFIG.reverse_chunk):
                self._return_read += len(data)
                self.stream.send_reverse(data)
        with contextlib.suppress(ByteStreamError):
            self.stream.close_reverse()

    def _end_of_stream(self) -> None:
        """The whole stream was written into QEMU: tell it no more bytes come."""
        assert self.stream is not None and self._qemu is not None
        with contextlib.suppress(TimeoutError, ByteStreamError):
            while not self.closed:
                with contextlib.suppress(TimeoutError):
                    self.stream.wait(0.2)
                    with contextlib.suppress(OSError):
                        self._qemu.shutdown(socket.SHUT_WR)
                    return

    async def close(self) -> None:
        self.closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
        if self._qemu is not None:
            with contextlib.suppress(OSError):
                self._qemu.shutdown(socket.SHUT_RDWR)
        stream = self.stream
        threads = list(self._threads)

        def stop() -> None:
            if stream is not None:
                stream.close(linger_s=CLOSE_LINGER_S)
            for thread in threads:
                thread.join(timeout=CLOSE_LINGER_S)

        await asyncio.get_running_loop().run_in_executor(None, stop)
        if self._qemu is not None:
            self._qemu.close()
