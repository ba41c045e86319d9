"""One end of the tunnel that carries a QEMU migration stream between two agents.

The source end reads QEMU's outgoing stream from a unix socket, cuts it into chunks, encodes
each with the HDE codec chosen for the link, and sends them as DATA frames; what arrives as
RETURN frames (QEMU's return path) is written back into QEMU's socket. The destination end is
the mirror image. Control messages share the connection; `recv_control()` hands them out.

Memory in flight is bounded: a chunk is read from QEMU only after the previous one left the
write buffer (`drain`), and the write buffer's high-water mark is about 100 ms of the predicted
bandwidth, so QEMU's own bandwidth and downtime estimates see the end-to-end rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import msgspec

from dwcp_agent.amst.tcp import NOTSENT_LOWAT_BYTES, TCP_NOTSENT_LOWAT
from dwcp_agent.hde.codecs import CodecError, codec_by_id
from dwcp_agent.hde.selector import CodecSelector
from dwcp_agent.live import messages
from dwcp_agent.live.frames import FrameKind, TunnelError, read_frame, write_frame

__all__ = ["Tunnel", "TunnelError"]

log = logging.getLogger("dwcp_agent.live")
CHUNK_BYTES = 256 * 1024
IN_FLIGHT_S = 0.1
MIN_BUFFER = 256 * 1024
# The kernel's socket buffers already hold a bandwidth-delay product; more in user space only
# delays the switchover (QEMU counts it as sent).
MAX_BUFFER = 1024 * 1024


class Tunnel:
    """The agent's side of one live migration's connection to its peer agent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 selector: CodecSelector | None = None) -> None:
        self.reader = reader
        self.writer = writer
        self.selector = selector
        self.control: asyncio.Queue[messages.Message | TunnelError] = asyncio.Queue()
        self.raw_bytes_out = 0
        self.wire_bytes_out = 0
        self.raw_bytes_in = 0
        self.return_bytes = 0
        self._local_writer: asyncio.StreamWriter | None = None
        self._local_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.closed = False
        self.set_in_flight(MIN_BUFFER * 4)
        sock = self.sock
        if sock is not None:  # the kernel keeps a window in flight, but little queued unsent
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOTSENT_LOWAT_BYTES)

    @property
    def sock(self) -> socket.socket | None:
        sock: socket.socket | None = self.writer.get_extra_info("socket")
        return sock

    @property
    def ratio(self) -> float:
        return self.raw_bytes_out / self.wire_bytes_out if self.wire_bytes_out else 1.0

    def set_in_flight(self, nbytes: int) -> None:
        """High-water mark of the write buffer (bytes queued before the socket)."""
        self.writer.transport.set_write_buffer_limits(high=min(MAX_BUFFER, max(MIN_BUFFER, nbytes)))

    def bound_to_bandwidth(self, bytes_per_s: float) -> None:
        self.set_in_flight(int(bytes_per_s * IN_FLIGHT_S))

    # -- control ---------------------------------------------------------------------------------

    async def send(self, message: messages.Message) -> None:
        write_frame(self.writer, FrameKind.CONTROL, messages.encode(message))
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

    # -- the byte streams ------------------------------------------------------------------------

    def start_reader(self) -> None:
        """Start dispatching incoming frames (before any control exchange)."""
        self._tasks.append(asyncio.create_task(self._read_loop()))

    def attach(self, local_reader: asyncio.StreamReader, local_writer: asyncio.StreamWriter,
               outgoing: FrameKind) -> None:
        """Connect QEMU's socket: its bytes go out as `outgoing`, the peer's come into it."""
        self._local_writer = local_writer
        self._local_ready.set()
        self._tasks.append(asyncio.create_task(self._pump_out(local_reader, outgoing)))

    async def _pump_out(self, local: asyncio.StreamReader, kind: FrameKind) -> None:
        end = FrameKind.DATA_END if kind is FrameKind.DATA else FrameKind.RETURN_END
        try:
            while True:
                chunk = await local.read(CHUNK_BYTES)
                if not chunk:
                    break
                if kind is FrameKind.DATA and self.selector is not None:
                    codec = self.selector.choose(memoryview(chunk)).codec
                    payload = codec.compress(chunk) if codec.id else chunk
                    if len(payload) >= len(chunk):
                        codec, payload = codec_by_id(0), chunk
                    write_frame(self.writer, kind, payload, int(codec.id), len(chunk))
                    self.wire_bytes_out += len(payload)
                else:
                    write_frame(self.writer, kind, chunk)
                    self.wire_bytes_out += len(chunk)
                self.raw_bytes_out += len(chunk)
                await self.writer.drain()
            write_frame(self.writer, end)
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            self.control.put_nowait(TunnelError(f"tunnel connection lost: {exc}"))

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await read_frame(self.reader)
                if frame.kind is FrameKind.CONTROL:
                    try:
                        self.control.put_nowait(messages.decode(frame.payload))
                    except msgspec.DecodeError as exc:
                        raise TunnelError(f"malformed control message: {exc}") from exc
                    continue
                await self._local_ready.wait()
                local = self._local_writer
                assert local is not None
                if frame.kind in (FrameKind.DATA_END, FrameKind.RETURN_END):
                    with contextlib.suppress(OSError, RuntimeError):
                        local.write_eof()
                    continue
                data = frame.payload
                if frame.kind is FrameKind.DATA and frame.codec:
                    try:
                        data = codec_by_id(frame.codec).decompress(frame.payload, frame.raw_len)
                    except (CodecError, ValueError) as exc:
                        raise TunnelError(f"undecodable chunk: {exc}") from exc
                if frame.kind is FrameKind.DATA:
                    self.raw_bytes_in += len(data)
                else:
                    self.return_bytes += len(data)
                local.write(data)
                # QEMU may have closed its end (finished or failed): query-migrate says which.
                with contextlib.suppress(ConnectionError, OSError):
                    await local.drain()
        except TunnelError as exc:
            self.control.put_nowait(exc)

    async def close(self) -> None:
        self.closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for writer in (self.writer, self._local_writer):
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
