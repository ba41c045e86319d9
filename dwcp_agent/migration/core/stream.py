"""Sequence-addressed byte streams: the source's scheduler and the destination's assembler.

A byte stream has no length known in advance and no file to resume from (QEMU's migration
stream). The source cuts it into chunks as the bytes come; a chunk's frame carries its byte
position in `offset`. Any live stream may carry any chunk; the destination puts them back in
order in a bounded reorder buffer and acknowledges a chunk once it has written it to the output,
so the source's window (bytes read but not yet acknowledged) bounds the memory on both sides.

A stream lost with chunks in flight: they go again, lowest offset first, on the others; the
destination drops the copy it already has and acknowledges it. The end of the stream is a chunk
of length 0 flagged END whose checksum field carries the rolling digest (xxh3-64 over every
chunk's length and checksum, in order): the destination compares it before it says Finished.
Once a session is over (finished, failed, or without a stream for too long) it never resumes.
"""

from __future__ import annotations

import heapq
import struct
from collections import OrderedDict

import xxhash

from dwcp_agent.migration.core.actions import (
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
)
from dwcp_agent.migration.core.checks import Header, check_frame
from dwcp_agent.migration.core.kinds import ErrorKind

__all__ = ["FLAG_END", "RollingDigest", "StreamAssembler", "StreamSender"]

FLAG_END = 0x80  # the stream ends at this frame's offset; checksum = rolling digest
_PAIR = struct.Struct("<IQ")


class RollingDigest:
    """xxh3-64 over (length, checksum) of every chunk in stream order: both sides compute it."""

    def __init__(self) -> None:
        self._h = xxhash.xxh3_64()

    def add(self, raw_len: int, checksum: int) -> None:
        self._h.update(_PAIR.pack(raw_len, checksum))

    def value(self) -> int:
        return self._h.intdigest()


class StreamSender:
    """Source side: which chunk goes next on which stream, in flight / acknowledged, redo after a
    lost stream, the window, and when the stream is done.

    Events: `set_window`, `stream_up`, `stream_lost`, `chunk_read`, `end_of_input`, `next_frame`
    (a stream has room for one more frame), `acked`, `tick`. Actions (`take_ready`): Release,
    Finished, Fail.
    """

    def __init__(self, window_bytes: int, max_idle_ticks: int = 100, max_stall_ticks: int = 600) -> None:
        self.window_bytes = window_bytes
        self.max_idle_ticks = max_idle_ticks
        self.max_stall_ticks = max_stall_ticks
        self._stall: dict[int, int] = {}          # stream -> ticks its chunks waited for an ack
        self.next_offset = 0                      # where the next chunk read starts
        self.digest = RollingDigest()
        self.ended = False                        # end_of_input called
        self.done = False                         # Finished or Fail emitted
        self.unacked: OrderedDict[int, OutChunk] = OrderedDict()  # offset order (insertion order)
        self._queue: list[tuple[int, int, OutChunk]] = []         # heap by offset: lowest first
        self._pushes = 0
        self._streams: dict[int, int] = {}        # live stream -> next sequence number
        self._carrying: dict[int, set[int]] = {}  # live stream -> offsets in flight on it
        self._idle_ticks = 0
        self._ready: list[Action] = []
        self.requeued = 0                         # chunks sent again after their stream was lost

    # -- events -----------------------------------------------------------------------------

    def set_window(self, window_bytes: int) -> None:
        """Bytes read but not yet acknowledged (e.g. ~100 ms of the predicted bandwidth)."""
        self.window_bytes = window_bytes

    def stream_up(self, stream: int) -> None:
        if self.done:
            return
        self._streams[stream] = 0
        self._carrying[stream] = set()
        self._idle_ticks = 0

    def stream_lost(self, stream: int) -> None:
        """Every chunk the stream carried without an acknowledgement goes again, on the others."""
        self._streams.pop(stream, None)
        self._stall.pop(stream, None)
        for offset in self._carrying.pop(stream, set()):
            chunk = self.unacked.get(offset)
            if chunk is not None and chunk.stream == stream:
                chunk.stream = chunk.seq = -1
                self.requeued += 1
                self._push(chunk.offset, chunk)

    def room(self) -> int:
        """How many more bytes may be read now (0: the window is full, wait for acknowledgements)."""
        if self.done or self.ended:
            return 0
        low = next(iter(self.unacked)) if self.unacked else self.next_offset
        return max(0, self.window_bytes - (self.next_offset - low))

    def chunk_read(self, raw_len: int, checksum: int, codec: int = 0, flags: int = 0, payload_len: int = 0,
                   handle: object = None) -> OutChunk:
        """The driver read (and encoded) the next `raw_len` bytes of the input."""
        if self.ended or raw_len <= 0:
            raise ValueError("a chunk needs bytes, before the end of the input")
        chunk = OutChunk(self.next_offset, raw_len, checksum, codec, flags, payload_len, handle)
        self.next_offset += raw_len
        self.digest.add(raw_len, checksum)
        self.unacked[chunk.offset] = chunk
        self._push(chunk.offset, chunk)
        return chunk

    def end_of_input(self) -> OutChunk:
        """The input ended: queue the END chunk carrying the rolling digest."""
        chunk = OutChunk(self.next_offset, 0, self.digest.value(), 0, FLAG_END, 0)
        self.ended = True
        # The END chunk's offset equals the last data chunk's end, never a data chunk's offset
        # unless the stream is empty; key it one past so both can be in flight.
        self.unacked[-1] = chunk
        self._push(chunk.offset + 1, chunk)
        return chunk

    def next_frame(self, stream: int) -> OutChunk | None:
        """The chunk `stream` sends next (lowest offset waiting), with its sequence number; None
        when nothing waits."""
        if stream not in self._streams or self.done:
            return None
        while self._queue:
            _, _, chunk = heapq.heappop(self._queue)
            if chunk.acked or chunk.stream != -1:
                continue
            if not self._carrying[stream]:
                self._stall[stream] = 0
            chunk.stream = stream
            chunk.seq = self._streams[stream]
            self._streams[stream] += 1
            self._carrying[stream].add(self._key(chunk))
            return chunk
        return None

    def acked(self, offset: int, end: bool = False) -> None:
        """The destination wrote the chunk at `offset`. It writes in order, so every chunk below
        is written too: an acknowledgement lost with its connection is covered by any later one.
        Acknowledgements may come on any stream."""
        while self.unacked:
            key, chunk = next(iter(self.unacked.items()))
            if key == -1 and not end:
                break  # the END is acknowledged only by its own acknowledgement
            if key != -1 and key > offset:
                break
            del self.unacked[key]
            chunk.acked = True
            if chunk.stream in self._carrying:
                self._carrying[chunk.stream].discard(key)
                self._stall[chunk.stream] = 0
            self._ready.append(Release(chunk))
            if key == -1:  # the destination wrote everything and verified the digest
                self.done = True
                self._queue.clear()
                self._ready.append(Finished(chunk.offset, chunk.checksum))
                return

    def tick(self) -> None:
        """Abstract time. A session left without any stream for `max_idle_ticks` fails for good;
        a stream whose chunks wait `max_stall_ticks` for an acknowledgement is closed (a hung
        connection): they go again on the others."""
        if self.done:
            return
        self._idle_ticks = 0 if self._streams else self._idle_ticks + 1
        if self._idle_ticks > self.max_idle_ticks:
            self.fail(ErrorKind.STREAMS, f"no data stream for {self.max_idle_ticks} ticks")
            return
        for stream, carrying in list(self._carrying.items()):
            self._stall[stream] = self._stall.get(stream, 0) + 1 if carrying else 0
            if self._stall[stream] > self.max_stall_ticks:
                self.stream_lost(stream)
                self._ready.append(CloseStream(stream, ErrorKind.STREAMS,
                                               f"no acknowledgement for {self.max_stall_ticks} ticks"))

    def fail(self, kind: str, reason: str) -> None:
        if self.done:
            return
        self.done = True
        self._ready.append(Fail(kind, reason))
        for chunk in self.unacked.values():
            self._ready.append(Release(chunk))
        self.unacked.clear()
        self._queue.clear()

    def take_ready(self) -> list[Action]:
        ready, self._ready = self._ready, []
        return ready

    # -- queries ----------------------------------------------------------------------------

    @property
    def streams(self) -> list[int]:
        return list(self._streams)

    def in_flight(self, stream: int) -> int:
        """Chunks sent on `stream` and not yet acknowledged."""
        return len(self._carrying.get(stream, ()))

    def _push(self, order: int, chunk: OutChunk) -> None:
        self._pushes += 1
        heapq.heappush(self._queue, (order, self._pushes, chunk))

    @staticmethod
    def _key(chunk: OutChunk) -> int:
        return -1 if chunk.flags & FLAG_END else chunk.offset


class StreamAssembler:
    """Destination side: checks every frame, reorders verified chunks, says what to write next and
    what to acknowledge, and when the stream is complete and its digest verified.

    Events: `stream_up`, `stream_lost`, `check` (a header arrived; raises FrameFault), `arrived`
    (its payload decoded and matched its checksum), `written` (the driver wrote a delivered chunk),
    `tick`. Actions: Deliver, SendAck, CloseStream, Finished, Fail.
    """

    def __init__(self, session: int, version: int, reorder_bytes: int, max_chunk: int,
                 max_idle_ticks: int = 100) -> None:
        self.session = session
        self.version = version
        self.reorder_bytes = reorder_bytes
        self.max_chunk = max_chunk
        self.max_idle_ticks = max_idle_ticks
        self.watermark = 0                        # every byte below it is delivered
        self.buffered_bytes = 0
        self.digest = RollingDigest()
        self.done = False
        self.failed = False
        self.end: InChunk | None = None
        self._buffer: dict[int, InChunk] = {}     # offset -> verified chunk waiting for its turn
        self._expected: dict[int, int] = {}       # live stream -> next sequence number
        self._idle_ticks = 0
        self._ready: list[Action] = []

    def stream_up(self, stream: int) -> None:
        if not self.failed:  # after Finished too: the source may resend the END whose ack it lost
            self._expected[stream] = 0
            self._idle_ticks = 0

    def stream_lost(self, stream: int) -> None:
        self._expected.pop(stream, None)

    def check(self, stream: int, h: Header) -> None:
        """Every header check, before the payload is read."""
        if stream not in self._expected:
            raise FrameFault(f"stream {stream} is not open", ErrorKind.BAD_HEADER)
        check_frame(h, self.session, stream, self.version, self._expected[stream])
        if h.flags & FLAG_END:
            if h.raw_len or h.encoded_len or h.flags != FLAG_END:
                raise FrameFault("END frame carries data", ErrorKind.BAD_LENGTH)
            if h.offset < self.watermark or (self.end is not None and self.end.offset != h.offset):
                raise FrameFault(f"END at {h.offset} contradicts the stream", ErrorKind.BAD_OFFSET)
        elif h.raw_len == 0 or h.raw_len > self.max_chunk:
            raise FrameFault(f"chunk of {h.raw_len} bytes (limit {self.max_chunk})", ErrorKind.BAD_LENGTH)
        elif self.end is not None and h.offset + h.raw_len > self.end.offset:
            raise FrameFault(f"chunk at {h.offset} lies past the END", ErrorKind.BAD_OFFSET)
        elif h.offset + h.raw_len > self.watermark + self.reorder_bytes:
            raise FrameFault(f"chunk at {h.offset} is beyond the reorder window (delivered up to "
                             f"{self.watermark}, window {self.reorder_bytes})", ErrorKind.REORDER_OVERFLOW)
        self._expected[stream] += 1

    def is_duplicate(self, h: Header) -> bool:
        """Already delivered or already waiting: the driver need not decode its payload."""
        return (h.offset < self.watermark and not h.flags & FLAG_END) or (
            h.offset in self._buffer and not h.flags & FLAG_END)

    def arrived(self, stream: int, h: Header, handle: object = None) -> None:
        """A checked frame whose payload matched its checksum (or a duplicate, handle unused)."""
        if self.failed:
            return
        end = bool(h.flags & FLAG_END)
        if end and self.done:
            self._ready.append(SendAck(stream, h.sequence, h.offset, True))  # finished: its ack was lost
            return
        if not end and h.offset < self.watermark:
            self._ready.append(SendAck(stream, h.sequence, h.offset))  # written long ago: its ack was lost
            return
        if not end and h.offset in self._buffer:
            held = self._buffer[h.offset]
            if held.raw_len != h.raw_len or held.checksum != h.checksum:
                self._fault(stream, f"two different chunks at offset {h.offset}", ErrorKind.BAD_OFFSET)
                return
            held.stream, held.seq = stream, h.sequence  # acknowledge on the stream that is alive
            return
        chunk = InChunk(h.offset, h.raw_len, h.checksum, stream, h.sequence, handle, end)
        if end:
            if self.end is not None:
                self.end.stream, self.end.seq = stream, h.sequence
            else:
                self.end = chunk
        else:
            self._buffer[h.offset] = chunk
            self.buffered_bytes += h.raw_len
        self._deliver()

    def written(self, chunk: InChunk) -> None:
        """The driver wrote a delivered chunk to the output: acknowledge it."""
        if self.failed:
            return
        stream = chunk.stream if chunk.stream in self._expected else next(iter(self._expected), -1)
        if stream >= 0:
            self._ready.append(SendAck(stream, chunk.seq, chunk.offset, chunk.end))

    def tick(self) -> None:
        if self.done:
            return
        self._idle_ticks = 0 if self._expected else self._idle_ticks + 1
        if self._idle_ticks > self.max_idle_ticks:
            self.fail(ErrorKind.STREAMS, f"no data stream for {self.max_idle_ticks} ticks; the stream "
                      "cannot resume")

    def fail(self, kind: str, reason: str) -> None:
        if not self.done:
            self.done = self.failed = True
            self._buffer.clear()
            self.buffered_bytes = 0
            self._ready.append(Fail(kind, reason))

    def take_ready(self) -> list[Action]:
        ready, self._ready = self._ready, []
        return ready

    @property
    def streams(self) -> list[int]:
        return list(self._expected)

    def _fault(self, stream: int, reason: str, kind: str) -> None:
        self._expected.pop(stream, None)
        self._ready.append(CloseStream(stream, kind, reason))

    def _deliver(self) -> None:
        while (chunk := self._buffer.pop(self.watermark, None)) is not None:
            self.buffered_bytes -= chunk.raw_len
            self.watermark += chunk.raw_len
            self.digest.add(chunk.raw_len, chunk.checksum)
            self._ready.append(Deliver(chunk))
        end = self.end
        if end is not None and end.offset == self.watermark and not self.done:
            if self._buffer:
                self.fail(ErrorKind.BAD_OFFSET, f"{len(self._buffer)} chunks lie outside the stream")
            elif end.checksum != self.digest.value():
                self.fail(ErrorKind.DIGEST_MISMATCH, "rolling digest of the delivered stream differs from "
                          "the source's")
            else:
                self.done = True
                self._ready.append(Deliver(end))
                self._ready.append(Finished(self.watermark, end.checksum))
