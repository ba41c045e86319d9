"""Source side of a migration: read, encode and stripe chunks over N streams until all are acked.

Threads, not coroutines: reading (preadv), encoding (codecs release the GIL) and sending
(sendmsg) are blocking calls that run in parallel. Encoder workers read a chunk into a pooled
buffer, encode it and queue it; each stream thread takes the next queued chunk, so faster streams
carry more. A chunk stays owned by its stream until the receiver ACKs it; if the stream dies its
unacknowledged chunks go back to the queue. If the whole session breaks, a new attempt asks the
destination what it already holds (the journal) and sends only the rest.
The source file is opened read-only: nothing here can modify it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dwcp_agent import wire
from dwcp_agent.amst import tcp
from dwcp_agent.amst.channel import DataChannel, TcpChannel
from dwcp_agent.amst.rdma import RdmaError
from dwcp_agent.amst.select import Transports, TransportUnavailable
from dwcp_agent.config import Config
from dwcp_agent.hde.baseline import HaveList
from dwcp_agent.hde.chunk import ChunkEncoder, EncodedChunk, checksum, make_encoder
from dwcp_agent.hde.codecs import CodecError, codec_by_name
from dwcp_agent.migration.buffers import BufferPool
from dwcp_agent.migration.digest import chunk_count, chunk_length, object_digest
from dwcp_agent.migration.journal import unpack_have
from dwcp_agent.pba.link import LinkController
from dwcp_agent.telemetry import tracing
from dwcp_agent.telemetry.metrics import Metrics

log = logging.getLogger("dwcp_agent.migration")

# Refusals that another attempt cannot fix.
FATAL_ERRORS = frozenset({"version", "auth", "forbidden", "bad_request", "unwritable", "no_space", "busy",
                          "rdma_unavailable",
                          "io", "malformed"})
POLL_S = 0.1


class MigrationError(Exception):
    """A migration could not complete; the source is untouched and the destination path too."""

    def __init__(self, message: str, error_type: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.retryable = retryable


class Interrupted(MigrationError):
    """Stopped on purpose (cancel or agent shutdown)."""


@dataclass
class MigrationRequest:
    """What to move, where to, and under which protocol profile."""

    migration_id: str
    vm_id: str
    source: Path
    host: str
    port: int
    dest_path: str
    protocol: str = "v3"
    mode: str = "datacenter"
    mode_measured: bool = False  # True once PBA named the mode from measurements


@dataclass
class Progress:
    """Counters the agent and the CLI read while a migration runs (written by its threads)."""

    total_bytes: int = 0
    acked_bytes: int = 0
    skipped_bytes: int = 0
    wire_bytes: int = 0
    attempts: int = 0
    streams: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, amount: int) -> None:
        """Thread-safe increment (several stream threads update the same counters)."""
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)

    @property
    def done_bytes(self) -> int:
        return self.acked_bytes + self.skipped_bytes


@dataclass(frozen=True)
class SendResult:
    digest: bytes
    logical_bytes: int
    wire_bytes: int
    skipped_bytes: int
    attempts: int


@dataclass
class _Item:
    index: int
    buffer: bytearray
    encoded: EncodedChunk


class _Attempt:
    """One connected try: control connection, stream threads, encoder workers."""

    def __init__(self, session: SendSession, control: socket.socket, ready: wire.Ready,
                 version: int) -> None:
        self.s = session
        self.control = control
        self.session_id = ready.session
        self.version = version
        self.have = unpack_have(ready.have)
        # Encoded chunks for the stream threads; None is the wake-up that the attempt is over.
        self.queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self.redo: collections.deque[_Item] = collections.deque()  # orphaned by a broken stream
        self.free: queue.SimpleQueue[bytearray] = session.buffers
        self.cond = threading.Condition()
        self.outstanding = 0
        self.next_index = 0
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
        if ready.baseline_have and session.cross_chunk:
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
        return self.next_index >= self.s.chunks and self.outstanding == 0

    # -- encoder workers --------------------------------------------------------------------

    def _next_job(self) -> _Item | int | None:
        """An orphaned chunk to encode again, else the next new chunk index; None when done."""
        with self.cond:
            while not self.done.is_set():
                if self.redo:
                    return self.redo.popleft()
                if self.next_index < self.s.chunks:
                    index = self.next_index
                    self.next_index += 1
                    self.outstanding += 1
                    return index
                self.cond.wait(POLL_S)
            return None

    def worker(self) -> None:
        s = self.s
        try:
            while (job := self._next_job()) is not None:
                if isinstance(job, _Item):
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
                self.queue.put(_Item(index, buf, encoded))
        except MigrationError as exc:
            self.abort(exc)
        except OSError as exc:
            self.abort(MigrationError(f"cannot read source {s.request.source}: {exc.strerror}", "source"))

    def _get_buffer(self) -> bytearray | None:
        while not self.done.is_set():
            try:
                return self.free.get(timeout=POLL_S)
            except queue.Empty:
                continue
        return None

    def _settle(self, item: _Item | None) -> None:
        """A chunk is no longer outstanding (acked, skipped, or abandoned)."""
        if item is not None:
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
        inflight: collections.deque[tuple[int, _Item]] = collections.deque()
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
                                          seq, item.index * s.chunk_size, enc.raw_len, len(enc.payload),
                                          enc.checksum, self.version)
                payload = enc.payload if enc.payload else b""
                with lock:
                    inflight.append((seq, item))
                try:
                    channel.send_frame(header, payload)  # its time is the link's, not an operation's
                except OSError:
                    broken.set()
                    break
                seq += 1
                wire_len = wire.HEADER_SIZE + len(payload)
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

    def _read_acks(self, channel: DataChannel, inflight: collections.deque[tuple[int, _Item]],
                   lock: threading.Lock, broken: threading.Event) -> None:
        header_buf = bytearray(wire.HEADER_SIZE)
        s = self.s
        try:
            while True:
                h = channel.recv_ack(header_buf)
                if h.type != wire.FrameType.ACK:
                    raise wire.FrameError(f"unexpected frame type {h.type} from receiver", "unexpected_frame")
                acked: list[_Item] = []
                with lock:
                    while inflight and inflight[0][0] <= h.sequence:
                        acked.append(inflight.popleft()[1])
                for item in acked:
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


class SendSession:
    """Runs one migration from the source side, with resume across attempts."""

    def __init__(self, config: Config, metrics: Metrics, key: bytes, request: MigrationRequest,
                 trace: dict[str, str] | None = None, progress: Progress | None = None,
                 link: Callable[[], float | None] | float | None = None, pool: BufferPool | None = None,
                 transports: Transports | None = None) -> None:
        self.config = config
        # Which transport carries the data streams (amst/select.py); tests inject a verbs provider here.
        self.transports = transports or Transports(config, metrics)
        self.rdma_disabled = ""  # why RDMA is off for the rest of this migration ('' = not off)
        self._current: _Attempt | None = None
        self.metrics = metrics
        self.key = key
        self.request = request
        self.cancel = threading.Event()
        self.abort_destination = False
        self.peer_node = ""  # the destination agent's node id, learnt in the handshake
        self.trace = trace or {}
        self.progress = progress or Progress()
        self.chunk_size = config.chunk_size
        self.streams = config.stream_count or 4
        # stream_count 0 (v3): PBA measures the path and the tuner sets streams and chunk size.
        self.link = LinkController(config, metrics) if config.stream_count == 0 and request.protocol == "v3" else None
        if self.link is not None:
            self.streams = self.link.plan.streams
            self.chunk_size = self.link.plan.chunk_size
        self.workers = config.encode_threads or (os.cpu_count() or 1)
        # v1 is the static profile rollouts compare against: one codec, no cross-chunk state.
        self.cross_chunk = request.protocol == "v3"
        if self.cross_chunk:
            # The codec choice follows PBA's predicted bandwidth when the link is being measured.
            link_source = self._predicted_bandwidth if self.link is not None and link is None else link
            self.encoder = make_encoder(config, metrics, link=link_source, threads=self.workers)
        else:
            codec = "lz4" if config.compression_algo == "auto" else config.compression_algo
            self.encoder = ChunkEncoder(codec_by_name(codec, config.zstd_level), metrics)
        try:
            self.fd = os.open(request.source, os.O_RDONLY)
        except OSError as exc:
            raise MigrationError(f"cannot open source {request.source}: {exc.strerror}", "source") from exc
        self.size = os.fstat(self.fd).st_size
        self.chunks = chunk_count(self.size, self.chunk_size)
        self.checksums = np.zeros(self.chunks, dtype=np.uint64)
        self.progress.total_bytes = self.size
        slots = max(2 * self.streams + self.workers, config.max_inflight_bytes // self.chunk_size)
        self.pool = pool or BufferPool()
        self._lent = self.pool.take(self.chunk_size, min(slots, max(self.chunks, 1)))
        self.buffers: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for buf in self._lent:
            self.buffers.put(buf)

    def _predicted_bandwidth(self) -> float | None:
        """Bytes/s PBA expects on the next interval (None until it has measured something)."""
        assert self.link is not None
        prediction = self.link.predictor.predict()
        return prediction.value if prediction is not None else None

    def encode(self, view: memoryview, index: int) -> EncodedChunk:
        """Encode one chunk; v3 passes its offset so baseline, dedupe and delta apply."""
        return self.encoder.encode(view, index * self.chunk_size if self.cross_chunk else None)

    def stop(self, abort_destination: bool) -> None:
        """Stop the migration. Cancelling discards the destination's partial image; a shutdown
        (abort_destination=False) leaves it and its journal for a later resume."""
        self.abort_destination = abort_destination
        self.cancel.set()

    def open_channel(self, session: int, stream: int) -> DataChannel:
        """One authenticated data stream of this migration: RDMA when both sides offered it."""
        offer = self._rdma_offer()
        sock, peer = self._connect("data", session, stream, offer)
        if not offer:
            return TcpChannel(sock)
        try:
            return self.transports.source_channel(sock, peer.capabilities, self.chunk_size, self._rdma_failed)
        except TransportUnavailable as exc:
            raise MigrationError(str(exc), exc.error_type) from exc
        except RdmaError as exc:
            sock.close()
            self._rdma_failed(exc)
            raise MigrationError(f"RDMA setup of stream {stream} failed: {exc}", "rdma", retryable=True) from exc
        except (wire.WireError, OSError) as exc:
            sock.close()
            raise MigrationError(f"RDMA setup of stream {stream} failed: {exc}", "disconnected",
                                 retryable=True) from exc

    def _rdma_offer(self) -> tuple[str, ...]:
        return () if self.rdma_disabled else self.transports.capabilities()

    def _rdma_failed(self, error: RdmaError) -> None:
        """An RDMA stream broke (QP error, completion error, credit violation): end this attempt.
        The next attempt resumes from the destination's journal, over TCP unless rdma_only."""
        if self.config.transport_mode != "rdma_only":
            self.rdma_disabled = str(error)
        attempt = self._current
        if attempt is not None:
            attempt.abort(MigrationError(f"RDMA failed ({error}); resuming from the destination journal"
                                         + (" over TCP" if self.rdma_disabled else ""), "rdma", retryable=True))

    def open_connection(self, role: str, session: int = 0, stream: int = 0) -> socket.socket:
        """Connect and authenticate one connection; failures become MigrationErrors."""
        return self._connect(role, session, stream)[0]

    def _connect(self, role: str, session: int = 0, stream: int = 0,
                 capabilities: tuple[str, ...] = ()) -> tuple[socket.socket, wire.PeerInfo]:
        c = self.config
        try:
            sock = tcp.connect(self.request.host, self.request.port, c.connect_timeout_s, c.socket_buffer_bytes,
                               c.tcp_congestion, c.pacing_rate_bytes)
        except (ConnectionError, OSError) as exc:
            raise MigrationError(str(exc), "connect", retryable=True) from exc
        except ValueError as exc:
            raise MigrationError(str(exc), "config") from exc
        try:
            peer = wire.client_handshake(sock, self.key, c.node_id, role, session, stream, self.trace,
                                         capabilities=capabilities)
        except wire.WireError as exc:
            sock.close()
            raise MigrationError(f"{self.request.host}:{self.request.port}: {exc}", exc.error_type,
                                 retryable=exc.error_type not in FATAL_ERRORS) from exc
        except OSError as exc:
            sock.close()
            raise MigrationError(f"handshake with {self.request.host}:{self.request.port} failed: {exc}",
                                 "disconnected", retryable=True) from exc
        sock.settimeout(c.io_timeout_s)
        self.peer_node = peer.node_id
        return sock, peer

    def run(self) -> SendResult:
        """Migrate, retrying broken attempts; raises MigrationError (or Interrupted)."""
        try:
            failures = 0
            while True:
                self._check_cancel()
                self.progress.attempts += 1
                try:
                    return self._attempt()
                except MigrationError as exc:
                    if not exc.retryable or self.cancel.is_set():
                        raise
                    failures += 1
                    if failures > self.config.retry_limit:
                        raise MigrationError(f"gave up after {failures} attempts: {exc}", exc.error_type) from exc
                    self.metrics.error("migration", "retry")
                    log.warning("attempt %d failed (%s); resuming", self.progress.attempts, exc, extra={
                        "migration_id": self.request.migration_id, "migration_status": "retrying"})
                    self._sleep(min(0.2 * 2 ** failures, 5.0))
        finally:
            os.close(self.fd)
            self.pool.give(self._lent)

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Interrupted("migration was stopped", "cancelled")

    def _sleep(self, seconds: float) -> None:
        if self.cancel.wait(seconds):
            self._check_cancel()

    def _attempt(self) -> SendResult:
        with tracing.get_tracer().start_as_current_span("attempt", attributes={
                "dwcp.attempt": self.progress.attempts, "dwcp.streams": self.streams}):
            return self._run_attempt()

    def _run_attempt(self) -> SendResult:
        r = self.request
        try:
            self.transports.require()
        except TransportUnavailable as exc:
            raise MigrationError(str(exc), exc.error_type) from exc
        control, peer = self._connect("control", capabilities=self._rdma_offer())
        try:
            chosen = self.transports.for_peer(peer.capabilities, peer.node_id) if self._rdma_offer() else None
        except TransportUnavailable as exc:
            control.close()
            raise MigrationError(str(exc), exc.error_type) from exc
        log.info("data streams over %s (%s)", chosen.transport if chosen else "tcp",
                 chosen.reason if chosen else f"RDMA off for this migration: "
                 f"{self.rdma_disabled or self.transports.selection.reason}",
                 extra={"migration_id": r.migration_id, "component": "amst"})
        try:
            wire.send_message(control, wire.Start(r.migration_id, r.vm_id, r.dest_path, self.size,
                                                  self.chunk_size, self.streams, r.protocol))
            ready = wire.recv_message(control, wire.Ready)
        except wire.WireError as exc:
            control.close()
            raise MigrationError(f"destination refused: {exc}", exc.error_type,
                                 retryable=exc.error_type not in FATAL_ERRORS) from exc
        except OSError as exc:
            control.close()
            raise MigrationError(f"control connection failed: {exc}", "disconnected", retryable=True) from exc
        attempt = _Attempt(self, control, ready, wire.PROTOCOL_VERSION)
        self._current = attempt
        self.progress.acked_bytes = 0
        self.progress.skipped_bytes = 0
        control.settimeout(None)
        threads = [threading.Thread(target=attempt.watch_control, name="control", daemon=True)]
        threads += [threading.Thread(target=attempt.worker, name=f"encode-{i}", daemon=True)
                    for i in range(self.workers)]
        attempt.live_streams = self.streams
        threads += [threading.Thread(target=attempt.stream, args=(i,), name=f"stream-{i}", daemon=True)
                    for i in range(self.streams)]
        if self.link is not None:
            threads.append(threading.Thread(target=attempt.tune, name="tune", daemon=True))
        for t in threads:
            t.start()
        try:
            while not attempt.done.wait(POLL_S):
                if self.cancel.is_set():
                    attempt.abort(Interrupted("migration was stopped", "cancelled"))
            if attempt.error is None:
                digest = object_digest(self.checksums)
                with tracing.get_tracer().start_as_current_span("commit"):
                    wire.send_message(control, wire.Commit(digest))
                    while not attempt.committed_event.wait(POLL_S):
                        if self.cancel.is_set():
                            attempt.abort(Interrupted("migration was stopped", "cancelled"))
                if attempt.committed is not None:
                    if attempt.committed.digest != digest:
                        raise MigrationError("destination reports a different digest", "digest_mismatch")
                    return SendResult(digest, self.size, self.progress.wire_bytes, self.progress.skipped_bytes,
                                      self.progress.attempts)
            assert attempt.error is not None
            raise attempt.error
        except OSError as exc:
            raise MigrationError(f"control connection failed: {exc}", "disconnected", retryable=True) from exc
        finally:
            self._current = None
            attempt.abort(attempt.error or Interrupted("attempt finished", "done"))
            if self.cancel.is_set() and self.abort_destination:
                with contextlib.suppress(OSError):
                    wire.send_message(control, wire.Abort("cancelled by operator"))
            with contextlib.suppress(OSError):
                control.shutdown(socket.SHUT_RDWR)
            control.close()
            for t in threads + attempt.extra_threads:
                t.join(timeout=self.config.io_timeout_s)
            self._reclaim(attempt)

    def _reclaim(self, attempt: _Attempt) -> None:
        """Return buffers still held by queued chunks so the next attempt has its full pool."""
        while True:
            try:
                item = attempt.queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.buffers.put(item.buffer)
        while attempt.redo:
            self.buffers.put(attempt.redo.popleft().buffer)

