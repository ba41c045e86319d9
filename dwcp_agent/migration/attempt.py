"""One connected try of a migration: encoder workers, data streams, ACKs, control watcher.

Threads, not coroutines: reading (preadv), encoding (codecs release the GIL) and sending
(sendmsg) are blocking calls that run in parallel. Encoder workers read a chunk into a pooled
buffer, encode it and queue it; each stream thread takes the next queued chunk, so faster streams
carry more. A chunk stays owned by its stream until the receiver ACKs it; if the stream dies its
unacknowledged chunks are encoded again and go back to the queue.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dwcp_agent import wire
from dwcp_agent.amst.channel import DataChannel, TcpChannel
from dwcp_agent.hde.baseline import HaveList, header_pages
from dwcp_agent.hde.chunk import EncodedChunk, checksum
from dwcp_agent.hde.codecs import CodecError
from dwcp_agent.hde.layout import FLAG_HOLE
from dwcp_agent.migration.digest import chunk_length
from dwcp_agent.migration.extents import ChunkRun
from dwcp_agent.migration.journal import unpack_have
from dwcp_agent.migration.model import FATAL_ERRORS, POLL_S, MigrationError

if TYPE_CHECKING:
    from dwcp_agent.migration.sender import SendSession

log = logging.getLogger("dwcp_agent.migration")


# One hole frame covers at most this many bytes (its length field is 32 bits).
HOLE_FRAME_BYTES = 1 << 30


@dataclass
class Item:
    index: int
    buffer: bytearray | None  # None for a hole run: nothing was read
    encoded: EncodedChunk

    @property
    def hole(self) -> bool:
        return self.buffer is None


def jobs(runs: list[ChunkRun], chunk_size: int) -> Iterator[int | ChunkRun]:
    """Data chunk indexes to read, and hole runs (each fitting one hole frame) to announce."""
    per_frame = max(1, HOLE_FRAME_BYTES // chunk_size)
    for run in runs:
        if run.data:
            yield from range(run.start, run.start + run.count)
            continue
        for first in range(run.start, run.start + run.count, per_frame):
            yield ChunkRun(first, min(per_frame, run.start + run.count - first), False)


class Attempt:
    """One connected try: control connection, stream threads, encoder workers."""

    def __init__(self, session: SendSession, control: socket.socket, ready: wire.Ready,
                 version: int, runs: list[ChunkRun] | None = None) -> None:
        self.s = session
        self.control = control
        self.session_id = ready.session
        self.version = version
        self.have = unpack_have(ready.have)
        # Encoded chunks for the stream threads; None is the wake-up that the attempt is over.
        self.queue: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self.redo: collections.deque[Item] = collections.deque()  # orphaned by a broken stream
        self.free: queue.SimpleQueue[bytearray] = session.buffers
        self.cond = threading.Condition()
        self.outstanding = 0
        self._jobs = jobs(runs if runs is not None else [ChunkRun(0, session.chunks, True)], session.chunk_size)
        self._pending: int | ChunkRun | None = next(self._jobs, None)  # lookahead: None = all handed out
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
        if session.chunks == 0:
            self.done.set()

    # -- outcome ----------------------------------------------------------------------------

    def abort(self, error: MigrationError) -> None:
        with self.cond:
            if self.error is None:
                self.error = error
            self.cond.notify_all()
        self.done.set()
        self.queue.put(None)
        self.committed_event.set()

    def _finished(self) -> bool:
        return self._pending is None and self.outstanding == 0

    # -- encoder workers --------------------------------------------------------------------

    def _next_job(self) -> Item | int | ChunkRun | None:
        """An orphaned chunk to encode again, else the next chunk index or hole run; None when done."""
        with self.cond:
            while not self.done.is_set():
                if self.redo:
                    return self.redo.popleft()
                if self._pending is not None:
                    job = self._pending
                    self._pending = next(self._jobs, None)
                    self.outstanding += 1
                    return job
                self.cond.wait(POLL_S)
            return None

    def worker(self) -> None:
        s = self.s
        try:
            while (job := self._next_job()) is not None:
                if isinstance(job, ChunkRun):
                    self.queue.put(self._hole_item(job))
                    continue
                if isinstance(job, Item):
                    if job.buffer is None:  # a hole run: nothing to encode again
                        self.queue.put(job)
                        continue
                    # Never resend a stored payload: it may be a delta against a page the receiver
                    # has since overwritten. Encoding again follows the encoder's current view.
                    view = memoryview(job.buffer)[: job.encoded.raw_len]
                    with s.metrics.operation("hde"):
                        job.encoded = s.encode(view, job.index)
                    self.queue.put(job)
                    continue
                index = job
                buf = self._get_buffer()
                if buf is None:
                    self._settle(None)
                    return
                length = chunk_length(index, s.size, s.chunk_size)
                view = memoryview(buf)[:length]
                if os.preadv(s.fd, [view], index * s.chunk_size) != length:
                    raise MigrationError(f"source {s.request.source} changed size during migration", "source")
                known = self.have.get(index)
                if known is not None and known == checksum(view):
                    s.checksums[index] = known
                    s.progress.add("skipped_bytes", length)
                    self.free.put(buf)
                    self._settle(None)
                    continue
                with s.metrics.operation("hde"):
                    encoded = s.encode(view, index)
                s.checksums[index] = encoded.checksum
                self.queue.put(Item(index, buf, encoded))
        except MigrationError as exc:
            self.abort(exc)
        except OSError as exc:
            self.abort(MigrationError(f"cannot read source {s.request.source}: {exc.strerror}", "source"))

    def _hole_item(self, run: ChunkRun) -> Item:
        """A hole frame: no read, no hash, no payload (its chunks' checksums are set by the plan)."""
        s = self.s
        offset = run.start * s.chunk_size
        length = min(s.size, (run.start + run.count) * s.chunk_size) - offset
        return Item(run.start, None, EncodedChunk(0, FLAG_HOLE, (), length, 0))

    def _get_buffer(self) -> bytearray | None:
        while not self.done.is_set():
            try:
                return self.free.get(timeout=POLL_S)
            except queue.Empty:
                continue
        return None

    def _settle(self, item: Item | None) -> None:
        """A chunk is no longer outstanding (acked, skipped, or abandoned)."""
        if item is not None and item.buffer is not None:
            self.free.put(item.buffer)
        with self.cond:
            self.outstanding -= 1
            if self._finished():
                self.done.set()
                self.queue.put(None)
                self.cond.notify_all()

    # -- streams ----------------------------------------------------------------------------

    def stream(self, stream_id: int) -> None:
        s = self.s
        failures = 0
        with self.cond:
            self.running.add(stream_id)
        while not self.done.is_set() and stream_id < self.target_streams:
            try:
                channel = s.open_channel(self.session_id, stream_id)
            except MigrationError as exc:
                failures += 1
                if exc.error_type in FATAL_ERRORS:
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
        with self.cond:
            self.running.discard(stream_id)
            self.live_streams -= 1
            if self.live_streams == 0 and not self.done.is_set():
                self.error = self.error or MigrationError("every data stream failed", "streams", retryable=True)
                self.done.set()
            self.cond.notify_all()

    def _run_stream(self, channel: DataChannel, stream_id: int) -> bool:
        """Send until done; False when the stream broke (its unacked chunks are requeued)."""
        s = self.s
        inflight: collections.deque[tuple[int, Item]] = collections.deque()
        lock = threading.Lock()
        broken = threading.Event()
        acker = threading.Thread(target=self._read_acks, args=(channel, inflight, lock, broken),
                                 name=f"acks-{stream_id}", daemon=True)
        acker.start()
        if s.link is not None and isinstance(channel, TcpChannel):
            s.link.configure(channel.sock)
            self.socks[stream_id] = channel.sock
        s.progress.add("streams", 1)
        s.metrics.active_streams.inc()
        s.metrics.amst_active_streams.inc()
        sent_counter = s.metrics.bytes_transferred.labels("sent", s.request.mode, channel.transport)
        seq = 0
        try:
            while not self.done.is_set() and not broken.is_set() and stream_id < self.target_streams:
                try:
                    item = self.queue.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                if item is None:  # done: pass the wake-up on to the next stream thread
                    self.queue.put(None)
                    continue
                enc = item.encoded
                header = wire.pack_header(wire.FrameType.DATA, enc.flags, enc.codec, self.session_id, stream_id,
                                          seq, item.index * s.chunk_size, enc.raw_len, enc.payload_len,
                                          enc.checksum, self.version)
                with lock:
                    inflight.append((seq, item))
                try:
                    channel.send_frame(header, *enc.segments)  # its time is the link's, not an operation's
                except OSError:
                    broken.set()
                    break
                seq += 1
                wire_len = wire.HEADER_SIZE + enc.payload_len
                s.progress.add("wire_bytes", wire_len)
                sent_counter.inc(wire_len)
            # Retired by the tuner: let the chunks on the wire be acked instead of resending them.
            while inflight and stream_id >= self.target_streams and not broken.is_set() and not self.done.is_set():
                time.sleep(POLL_S)
        finally:
            self.socks.pop(stream_id, None)
            channel.abort()
            acker.join()
            channel.close()
            s.progress.add("streams", -1)
            s.metrics.active_streams.dec()
            s.metrics.amst_active_streams.dec()
            with lock:
                orphans = [item for _, item in inflight]
                inflight.clear()
            with self.cond:
                self.redo.extend(orphans)
                self.cond.notify_all()
        return not broken.is_set() or self.done.is_set()

    def _read_acks(self, channel: DataChannel, inflight: collections.deque[tuple[int, Item]],
                   lock: threading.Lock, broken: threading.Event) -> None:
        header_buf = bytearray(wire.HEADER_SIZE)
        s = self.s
        try:
            while True:
                h = channel.recv_ack(header_buf)
                if h.type != wire.FrameType.ACK:
                    raise wire.FrameError(f"unexpected frame type {h.type} from receiver", "unexpected_frame")
                acked: list[Item] = []
                with lock:
                    while inflight and inflight[0][0] <= h.sequence:
                        acked.append(inflight.popleft()[1])
                for item in acked:
                    if not item.hole:  # holes are never referenced: the index does not track them
                        s.encoder.acked(item.index * s.chunk_size, item.encoded.raw_len, item.encoded.checksum)
                    s.progress.add("acked_bytes", item.encoded.raw_len)
                    self._settle(item)
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
            with self.cond:
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
            fatal = exc.error_type in FATAL_ERRORS or exc.error_type == "digest_mismatch"
            self.abort(MigrationError(f"destination: {exc}", exc.error_type, retryable=not fatal))
        except OSError as exc:
            self.abort(MigrationError(f"control connection lost: {exc}", "disconnected", retryable=True))
