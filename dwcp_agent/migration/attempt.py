"""One connected try of a migration: encoder workers, data streams, ACKs, control watcher.

The protocol decisions (which chunk next, on which stream; what is acknowledged; what goes again
after a lost stream; when to commit) are the pure `core.ImageSender`'s. This module is its
threaded driver: encoder workers read and encode chunks into pooled buffers, each stream thread
sends the frames the core assigns to it (faster streams carry more), an ACK reader per stream
feeds acknowledgements back. Threads, not coroutines: preadv, the codecs and sendmsg release the
GIL, so they run in parallel.

Direct mode (`AttemptSession.direct`: v1 with codec none, where a chunk goes as it was read, its
zero pages aside) has no encoder workers: the stream thread that will send a chunk reads and
encodes it itself, as the C file copy does. No other thread is woken per chunk, and the bytes are
still in that core's cache when they are sealed. The core still hands out every chunk.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Sequence
from typing import Protocol, cast

import numpy as np

from dwcp_agent import wire
from dwcp_agent.amst.channel import DataChannel, TcpChannel
from dwcp_agent.config import Config
from dwcp_agent.hde.baseline import HaveList, header_pages
from dwcp_agent.hde.chunk import ChunkEncoder, EncodedChunk, checksum
from dwcp_agent.hde.codecs import CodecError
from dwcp_agent.hde.layout import FLAG_HOLE
from dwcp_agent.migration.buffers import FreeBuffers
from dwcp_agent.migration.core import Action, CloseStream, Commit, ImageSender, OutChunk, Reencode, Release
from dwcp_agent.migration.core.image import HoleRun, Run
from dwcp_agent.migration.digest import chunk_length
from dwcp_agent.migration.journal import unpack_have
from dwcp_agent.migration.model import POLL_S, MigrationError, MigrationRequest, Progress
from dwcp_agent.pba.link import LinkController
from dwcp_agent.telemetry.metrics import Metrics

log = logging.getLogger("dwcp_agent.migration")


Held = tuple[bytearray, EncodedChunk]  # a chunk's pooled buffer (raw bytes), its encoding (segments alias it)
Frame = tuple[OutChunk, Held | None]    # a frame to send and its payload's buffers (None: a hole)


def _held(chunk: OutChunk) -> Held:
    """A queued chunk's buffer and encoding."""
    return cast(Held, chunk.handle)


class _StreamBuffer:
    """Direct mode: the chunk buffer a stream thread reads into, kept from one chunk to the next
    so that each read lands in memory this core has just used."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf: bytearray | None = None


class AttemptSession(Protocol):
    """What an attempt uses of its migration (sender.SendSession, which creates attempts)."""

    config: Config
    metrics: Metrics
    request: MigrationRequest
    progress: Progress
    encoder: ChunkEncoder
    link: LinkController | None
    buffers: FreeBuffers
    checksums: np.ndarray
    fd: int
    size: int
    chunks: int
    chunk_size: int
    streams: int
    cross_chunk: bool
    direct: bool

    def encode(self, view: memoryview, index: int) -> EncodedChunk: ...

    def open_channel(self, session: int, stream: int) -> DataChannel: ...


class Attempt:
    """One connected try: control connection, stream threads, encoder workers."""

    def __init__(self, session: AttemptSession, control: socket.socket, ready: wire.Ready,
                 version: int, runs: Sequence[Run] | None = None) -> None:
        self.s = session
        self.control = control
        self.session_id = ready.session
        self.version = version
        self.direct = session.direct  # stream threads read and encode their chunks (module docstring)
        # Direct mode: chunks read and not yet acknowledged (buffers bound the workers' instead).
        self.window = max(2 * session.streams, session.config.max_inflight_bytes // session.chunk_size)
        self.have = unpack_have(ready.have)
        # `runs`: the source's data/hole plan (SEEK_DATA walk); holes go as FLAG_HOLE frames.
        self.core = ImageSender(session.size, session.chunk_size, self.have, session.checksums, runs=runs)
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)   # encoder workers wait here
        self.ready_to_send = threading.Condition(self.lock)  # stream threads wait here
        self.redo: collections.deque[OutChunk] = collections.deque()  # to encode again (lost stream)
        self.free: FreeBuffers = session.buffers
        self.live_streams = 0
        # Online stream tuning (PBA): ids below target_streams run; the tuner moves the target.
        self.target_streams = session.streams
        self.running: set[int] = set()
        self.socks: dict[int, socket.socket] = {}
        self.extra_threads: list[threading.Thread] = []
        self.error: MigrationError | None = None
        self.done = threading.Event()
        self.committed: wire.Committed | None = None
        self.committed_event = threading.Event()
        session.encoder.forget_peer_acks()
        for index, known in self.have.items():
            if index < session.chunks:
                session.encoder.acked(index * session.chunk_size,
                                      chunk_length(index, session.size, session.chunk_size), known)
        if ready.baseline_have and session.cross_chunk \
                and header_pages(ready.baseline_have) > session.encoder.baseline_max_pages:
            log.warning("baseline of %d pages is over index_budget_bytes; sending without it",
                        header_pages(ready.baseline_have), extra={"migration_id": session.request.migration_id})
        elif ready.baseline_have and session.cross_chunk:
            try:
                baseline = HaveList.from_bytes(ready.baseline_have, max_pages=session.size // 4096 + 1)
            except CodecError as exc:
                raise MigrationError(f"destination sent a malformed have-list: {exc}", "malformed") from exc
            session.encoder.set_peer_have_list(baseline)
        self._apply(self.core.take_ready())  # an empty image commits at once

    # -- the core's actions -----------------------------------------------------------------

    def _step(self, event: object, *args: object) -> None:
        """Feed one event to the core under the lock, then carry out its actions outside it."""
        with self.lock:
            getattr(self.core, str(event))(*args)
            actions = self.core.take_ready()
        self._apply(actions)

    def _apply(self, actions: list[Action]) -> None:
        s = self.s
        for action in actions:
            if isinstance(action, Release):
                chunk = action.chunk
                if chunk.acked:
                    s.progress.add("acked_bytes", chunk.raw_len)
                    # Holes are never referenced (the index does not track them); v1 keeps no index.
                    if s.cross_chunk and not chunk.flags & FLAG_HOLE:
                        s.encoder.acked(chunk.offset, chunk.raw_len, chunk.checksum)
                if chunk.handle is not None:
                    self.free.put(_held(chunk)[0])
                    chunk.handle = None
            elif isinstance(action, Reencode):
                with self.lock:  # direct mode: a stream thread reads it again (its buffer went on)
                    self.redo.append(action.chunk)
                    (self.ready_to_send if self.direct else self.work).notify()
            elif isinstance(action, Commit):
                s.progress.end_transfer()  # every chunk is acknowledged: before the streams wind down
                self._finish()
            elif isinstance(action, CloseStream):
                log.warning("stream %d: %s", action.stream, action.reason,
                            extra={"migration_id": s.request.migration_id, "error_type": action.kind})

    def _finish(self) -> None:
        self.done.set()
        with self.lock:
            self.work.notify_all()
            self.ready_to_send.notify_all()

    # -- outcome ----------------------------------------------------------------------------

    def abort(self, error: MigrationError) -> None:
        with self.lock:
            if self.error is None:
                self.error = error
        self._finish()
        self.committed_event.set()

    def reclaim(self) -> list[bytearray]:
        """Buffers still held by queued, in-flight or re-encode chunks (the attempt is over)."""
        with self.lock:
            self.core.fail("done", "attempt over")
            actions = self.core.take_ready()
            chunks = list(self.redo)
            self.redo.clear()
        held = []
        for chunk in chunks + [a.chunk for a in actions if isinstance(a, Release | Reencode)]:
            if chunk.handle is not None:
                held.append(_held(chunk)[0])
                chunk.handle = None
        return held

    # -- encoder workers --------------------------------------------------------------------

    def _next_job(self) -> OutChunk | int | None:
        """A chunk to encode again, else the next new chunk index; None when done. Hole runs are
        handed to the core here: they need no read and no encoding."""
        with self.lock:
            while not self.done.is_set():
                if self.redo:
                    return self.redo.popleft()
                job = self.core.next_job()
                if isinstance(job, HoleRun):
                    self.core.hole_ready(job)
                    self.ready_to_send.notify()
                    continue
                if job is not None:
                    return job
                self.work.wait(POLL_S)
            return None

    def worker(self) -> None:
        try:
            while (job := self._next_job()) is not None:
                if isinstance(job, OutChunk):
                    raw = _held(job)[0]
                    self._queued(job.index, raw, self._encode(raw, job), job)
                    continue
                buf = self._get_buffer()
                if buf is None:
                    return
                encoded = self._load(job, buf)
                if encoded is not None:
                    self._queued(job, buf, encoded, None)
                else:
                    self.free.put(buf)
        except MigrationError as exc:
            self.abort(exc)

    def _encode(self, raw: bytearray, chunk: OutChunk) -> EncodedChunk:
        """Encode a chunk lost with its stream again. Never resend a stored payload: it may be a
        delta against a page the receiver has since overwritten; encoding again follows the
        encoder's current view."""
        with self.s.metrics.operation("hde"):
            return self.s.encode(memoryview(raw)[: chunk.raw_len], chunk.index)

    def _load(self, index: int, buf: bytearray) -> EncodedChunk | None:
        """Read chunk `index` into `buf` and encode it; None when the destination holds it already
        (the core is told; `buf` stays the caller's). Raises MigrationError."""
        s = self.s
        length = chunk_length(index, s.size, s.chunk_size)
        view = memoryview(buf)[:length]
        try:
            if os.preadv(s.fd, [view], index * s.chunk_size) != length:
                raise MigrationError(f"source {s.request.source} changed size during migration", "source")
        except OSError as exc:
            raise MigrationError(f"cannot read source {s.request.source}: {exc.strerror}", "source") from exc
        known = self.have.get(index)
        if known is not None and known == checksum(view):
            s.progress.add("skipped_bytes", length)
            self._step("chunk_skipped", index, known)
            return None
        with s.metrics.operation("hde"):
            return s.encode(view, index)

    def _queued(self, index: int, buf: bytearray, encoded: EncodedChunk, chunk: OutChunk | None) -> None:
        with self.lock:
            self.core.chunk_encoded(index, encoded.checksum, encoded.codec, encoded.flags, encoded.payload_len,
                                    (buf, encoded), chunk=chunk)
            actions = self.core.take_ready()
            self.ready_to_send.notify()
        self._apply(actions)

    def _get_buffer(self, stream_id: int = -1, broken: threading.Event | None = None) -> bytearray | None:
        """A free chunk buffer; None once the attempt is over (or, for a stream thread, once its
        stream broke or was retired: it then takes no new chunk)."""
        while not self.done.is_set() and (broken is None or self._sending(stream_id, broken)):
            try:
                return self.free.get(timeout=POLL_S)
            except queue.Empty:
                continue
        return None

    # -- streams ----------------------------------------------------------------------------

    def stream(self, stream_id: int) -> None:
        s = self.s
        failures = 0
        with self.lock:
            self.running.add(stream_id)
        while not self.done.is_set() and stream_id < self.target_streams:
            try:
                channel = s.open_channel(self.session_id, stream_id)
            except MigrationError as exc:
                failures += 1
                if not exc.retryable:
                    self.abort(exc)
                    return
                if failures > s.config.retry_limit:
                    break
                time.sleep(min(0.1 * 2 ** failures, 2.0))
                continue
            if self._run_stream(channel, stream_id):
                failures = 0
            else:
                failures += 1
                s.metrics.error("amst", "stream_lost")
                if failures > s.config.retry_limit:
                    break
        with self.lock:
            self.running.discard(stream_id)
            self.live_streams -= 1
            if self.live_streams == 0 and not self.done.is_set():
                self.error = self.error or MigrationError("every data stream failed", "streams")
                self.done.set()
            self.work.notify_all()

    def _sending(self, stream_id: int, broken: threading.Event) -> bool:
        return not self.done.is_set() and not broken.is_set() and stream_id < self.target_streams

    def _next_frame(self, stream_id: int, broken: threading.Event, own: _StreamBuffer) -> Frame | None:
        """The next frame for this stream and the buffers its payload lies in (None for a hole)."""
        if self.direct:
            return self._next_direct(stream_id, broken, own)
        with self.lock:
            while self._sending(stream_id, broken):
                chunk = self.core.next_frame(stream_id)
                if chunk is not None:
                    return chunk, cast(Held | None, chunk.handle)  # held until acknowledged
                self.ready_to_send.wait(POLL_S)
            return None

    def _next_direct(self, stream_id: int, broken: threading.Event, own: _StreamBuffer) -> Frame | None:
        """Direct mode: the core's next frame for this stream; when none is queued, a chunk lost
        with a stream or the core's next chunk, read into this thread's buffer and encoded here,
        then handed to the core like a worker's. The thread takes the frame's buffer from the
        chunk: a raw chunk lost later is read again, so the buffer is reused once sent."""
        while True:
            job: OutChunk | int | None = None
            with self.lock:
                while self._sending(stream_id, broken):
                    chunk = self.core.next_frame(stream_id)  # queued first: holes, a chunk another thread read
                    if chunk is not None:
                        return chunk, self._take(chunk)
                    if own.buf is None:
                        break  # a buffer first: a chunk handed out is never left unread
                    if self.redo:
                        job = self.redo.popleft()
                        break
                    if self.core.outstanding >= self.window:  # an acknowledgement first
                        self.ready_to_send.wait(POLL_S)
                        continue
                    taken = self.core.next_job()
                    if isinstance(taken, HoleRun):
                        self.core.hole_ready(taken)
                        continue
                    if taken is not None:
                        job = taken
                        break
                    self.ready_to_send.wait(POLL_S)
                else:
                    return None
            if job is None:
                own.buf = self._get_buffer(stream_id, broken)
                if own.buf is None:
                    return None
                continue
            buf = own.buf
            assert buf is not None  # a chunk is only taken with a buffer in hand
            index = job.index if isinstance(job, OutChunk) else job
            try:
                encoded = self._load(index, buf)
            except MigrationError as exc:
                self.abort(exc)
                return None
            if encoded is None:
                continue
            own.buf = None
            with self.lock:
                mine = self.core.chunk_encoded(index, encoded.checksum, encoded.codec, encoded.flags,
                                               encoded.payload_len, (buf, encoded),
                                               chunk=job if isinstance(job, OutChunk) else None)
                chunk = self.core.next_frame(stream_id) if self._sending(stream_id, broken) else None
                held = self._take(chunk) if chunk is not None else None
                actions = self.core.take_ready()
                if chunk is not mine:  # it waits for another stream
                    self.ready_to_send.notify()
            self._apply(actions)
            if chunk is not None:
                return chunk, held

    @staticmethod
    def _take(chunk: OutChunk) -> Held | None:
        """Direct mode, under the lock: the sending thread owns the frame's buffer from now on."""
        held, chunk.handle = cast(Held | None, chunk.handle), None
        return held

    def _run_stream(self, channel: DataChannel, stream_id: int) -> bool:
        """Send until done; False when the stream broke (its unacked chunks are encoded again)."""
        s = self.s
        broken = threading.Event()
        self._step("stream_up", stream_id)
        acker = threading.Thread(target=self._read_acks, args=(channel, stream_id, broken),
                                 name=f"acks-{stream_id}", daemon=True)
        acker.start()
        if s.link is not None and isinstance(channel, TcpChannel):
            s.link.configure(channel.sock)
            self.socks[stream_id] = channel.sock
        s.progress.add("streams", 1)
        s.metrics.active_streams.inc()
        s.metrics.amst_active_streams.inc()
        sent_counter = s.metrics.bytes_transferred.labels("sent", s.request.mode, channel.transport)
        own = _StreamBuffer()
        try:
            while (frame := self._next_frame(stream_id, broken, own)) is not None:
                chunk, held = frame
                segments = held[1].segments if held is not None else ()  # a hole: none
                header = wire.pack_header(wire.FrameType.DATA, chunk.flags, chunk.codec, self.session_id, stream_id,
                                          chunk.seq, chunk.offset, chunk.raw_len, chunk.payload_len, chunk.checksum,
                                          self.version)
                try:
                    channel.send_frame(header, *segments)  # its time is the link's, not an operation's
                except OSError:
                    broken.set()
                    break
                finally:
                    if self.direct and held is not None:  # sent (or lost: read again): reuse it
                        if own.buf is None:
                            own.buf = held[0]
                        else:
                            self.free.put(held[0])
                wire_len = wire.HEADER_SIZE + chunk.payload_len
                s.progress.add("wire_bytes", wire_len)
                sent_counter.inc(wire_len)
            # Retired by the tuner: let the chunks on the wire be acked instead of resending them.
            while (stream_id >= self.target_streams and not broken.is_set() and not self.done.is_set()
                   and self.core.in_flight(stream_id)):
                time.sleep(POLL_S)
        finally:
            if own.buf is not None:
                self.free.put(own.buf)
            self.socks.pop(stream_id, None)
            channel.abort()
            acker.join()
            channel.close()
            s.progress.add("streams", -1)
            s.metrics.active_streams.dec()
            s.metrics.amst_active_streams.dec()
            self._step("stream_lost", stream_id)
        return not broken.is_set() or self.done.is_set()

    def _read_acks(self, channel: DataChannel, stream_id: int, broken: threading.Event) -> None:
        header_buf = bytearray(wire.HEADER_SIZE)
        try:
            while True:
                h = channel.recv_ack(header_buf)
                if h.type != wire.FrameType.ACK:
                    raise wire.FrameError(f"unexpected frame type {h.type} from receiver", "unexpected_frame")
                with self.lock:
                    self.core.acked(stream_id, h.sequence)
                    actions = self.core.take_ready()
                    if self.direct:  # the window moved: a stream thread may read its next chunk
                        self.ready_to_send.notify()
                self._apply(actions)
                if any(isinstance(a, CloseStream) for a in actions):
                    raise wire.FrameError("acknowledgement of a frame never sent", "sequence")
        except (wire.WireError, OSError):
            if not self.done.is_set():
                broken.set()

    def tune(self) -> None:
        """PBA tick: measure the live streams, then open or retire streams as the tuner plans."""
        link = self.s.link
        assert link is not None
        while not self.done.wait(link.interval_s):
            plan = link.tick(list(self.socks.items()), time.monotonic())
            if link.mode is not None and not link.forced_mode:
                self.s.request.mode = link.mode  # metric label of this migration's bytes and outcome
                self.s.request.mode_measured = True
            with self.lock:
                if plan.streams != self.target_streams:
                    log.info("streams %d -> %d: %s", self.target_streams, plan.streams, plan.reason,
                             extra={"migration_id": self.s.request.migration_id, "component": "amst"})
                self.target_streams = plan.streams
                new = [i for i in range(plan.streams) if i not in self.running]
                self.running.update(new)
                self.live_streams += len(new)
            for i in new:
                t = threading.Thread(target=self.stream, args=(i,), name=f"stream-{i}", daemon=True)
                self.extra_threads.append(t)
                t.start()

    # -- control ----------------------------------------------------------------------------

    def watch_control(self) -> None:
        """The only reader of the control connection after Ready: Committed or a failure."""
        try:
            msg = wire.recv_message(self.control, wire.Committed)
            self.committed = msg
            self.committed_event.set()
        except wire.WireError as exc:
            self.abort(MigrationError(f"destination: {exc}", exc.error_type))
        except OSError as exc:
            self.abort(MigrationError(f"control connection lost: {exc}", "disconnected"))
