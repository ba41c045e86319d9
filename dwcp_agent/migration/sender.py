"""Source side of a migration: connections, encoder, buffers, and retries across attempts.

Each attempt (migration/attempt.py) runs the streams; if it breaks, the next one asks the
destination what it already holds (the journal) and sends only the rest. The source file is
opened read-only: nothing here can modify it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dwcp_agent import wire
from dwcp_agent.amst import tcp
from dwcp_agent.amst.channel import DataChannel, TcpChannel
from dwcp_agent.amst.rdma import RdmaError
from dwcp_agent.amst.select import Transports, TransportUnavailable
from dwcp_agent.config import Config
from dwcp_agent.hde.chunk import ChunkEncoder, EncodedChunk, make_encoder
from dwcp_agent.hde.codecs import CodecId, codec_by_name
from dwcp_agent.migration.attempt import Attempt
from dwcp_agent.migration.buffers import BufferPool, FreeBuffers
from dwcp_agent.migration.digest import chunk_count, hole_checksums, object_digest
from dwcp_agent.migration.extents import ChunkRun, chunk_runs, data_ranges, holes_moved
from dwcp_agent.migration.model import (
    POLL_S,
    Interrupted,
    MigrationError,
    MigrationRequest,
    Progress,
    SendResult,
)
from dwcp_agent.migration.remote_errors import describe_handshake_failure, handshake_error_type
from dwcp_agent.migration.safe_files import UnsafePath, open_source
from dwcp_agent.pba.active import ProbeError, run_probe
from dwcp_agent.pba.link import LinkController
from dwcp_agent.security import channels as channel_security
from dwcp_agent.telemetry import tracing
from dwcp_agent.telemetry.metrics import Metrics

log = logging.getLogger("dwcp_agent.migration")


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
        self._current: Attempt | None = None
        self.metrics = metrics
        self.key = key
        self.request = request
        self.cancel = threading.Event()
        self.abort_destination = False
        self.probed = False
        self.peer_node = ""  # the destination agent's node id, learnt in the handshake
        self.trace = trace or {}
        self.progress = progress or Progress()
        self.chunk_size = config.chunk_size
        self.streams = config.stream_count or 4
        # v3: PBA always measures the path (probe, prediction, mode). With stream_count 0 the tuner
        # also sets streams and chunk size; a fixed stream_count keeps its count and chunk_size.
        self.link = LinkController(config, metrics) if request.protocol == "v3" else None
        if self.link is not None:
            self.streams = self.link.plan.streams
            if config.stream_count == 0:
                self.chunk_size = self.link.plan.chunk_size
            if self.link.forced_mode and self.link.mode is not None:
                request.mode = self.link.mode
        self.workers = config.encode_threads or (os.cpu_count() or 1)
        # v1 is the static profile rollouts compare against: one codec, no cross-chunk state.
        self.cross_chunk = request.protocol == "v3"
        if self.cross_chunk:
            # The codec choice follows the measured path (PBA prediction and tuner capacity).
            link_source = self._path_bandwidth if self.link is not None and link is None else link
            self.encoder = make_encoder(config, metrics, link=link_source, threads=self.workers)
        else:
            codec = "lz4" if config.compression_algo == "auto" else config.compression_algo
            self.encoder = ChunkEncoder(codec_by_name(codec, config.zstd_level), metrics, dedupe=False)
        # Chunks go as read (zero pages aside): each stream thread reads and encodes its own (attempt.py).
        self.direct = not self.cross_chunk and self.encoder.codec is not None and self.encoder.codec.id is CodecId.NONE
        # Opened once (O_NOFOLLOW) and read only through this descriptor (migration/safe_files.py).
        if request.image is None:
            try:
                request.image = open_source(request.source, [Path(request.source).parent.resolve()])
            except UnsafePath as exc:
                raise MigrationError(str(exc), "source") from exc
        self.fd = request.image.fd
        self.size = request.image.size
        self.chunks = chunk_count(self.size, self.chunk_size)
        self.checksums = np.zeros(self.chunks, dtype=np.uint64)
        self.progress.total_bytes = self.size
        self.holes: list[ChunkRun] = []  # hole runs announced by the current attempt
        self.pool = pool or BufferPool()
        self._lent: list[bytearray] = []  # taken when sending starts, returned when the migration ends
        self.buffers = FreeBuffers()  # last in, first out: the buffers in use stay in cache

    def _lend_buffers(self) -> None:
        """Chunk buffers, once the destination has accepted: a migration that never gets that far
        (unreachable, refused) holds no memory."""
        if self._lent:
            return
        slots = max(2 * self.streams + self.workers, self.config.max_inflight_bytes // self.chunk_size)
        self._lent = self.pool.take(self.chunk_size, min(slots, max(self.chunks, 1)))
        for buf in self._lent:
            self.buffers.put(buf)

    def plan(self) -> list[ChunkRun]:
        """This attempt's walk of the source: data runs to read, hole runs to announce."""
        runs = chunk_runs(self.fd, self.size, self.chunk_size)
        self.holes = [r for r in runs if not r.data]
        for run in self.holes:
            hole_checksums(self.checksums, run.start, run.count, self.size, self.chunk_size)
        return runs

    def _probe(self, control: socket.socket) -> None:
        """One short active probe (RTT pings and a bounded burst) before the first Start, so the
        tuner starts from the measured bandwidth-delay product instead of its defaults."""
        assert self.link is not None
        self.probed = True  # once per migration, even if it fails
        try:
            wire.send_message(control, wire.ActiveProbe())
            result = run_probe(control)
        except (ProbeError, OSError) as exc:
            control.close()
            raise MigrationError(f"active probe failed: {exc}", "probe") from exc
        plan = self.link.start(result.rtt_min_s, result.bandwidth_bps)
        self.streams = plan.streams
        if self.link.mode is not None and not self.link.forced_mode:
            self.request.mode = self.link.mode
            self.request.mode_measured = True
        log.info("probe: rtt %.2f ms, %.0f Mbit/s -> %d streams, mode %s", result.rtt_min_s * 1e3,
                 result.bandwidth_bps * 8e-6, plan.streams, self.request.mode,
                 extra={"migration_id": self.request.migration_id, "component": "pba", "mode": self.request.mode})

    def _path_bandwidth(self) -> float | None:
        """Bytes/s the codec selector plans for (LinkController.path_bandwidth; None before a probe)."""
        assert self.link is not None
        return self.link.path_bandwidth()

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
            try:
                return TcpChannel(sock)  # a TLS stream exchanges its frame keys here
            except (wire.WireError, OSError) as exc:
                sock.close()
                raise MigrationError(f"data stream {stream} key exchange failed: {exc}", "disconnected") from exc
        try:
            return self.transports.source_channel(sock, peer.capabilities, self.chunk_size, self._rdma_failed)
        except TransportUnavailable as exc:
            raise MigrationError(str(exc), exc.error_type) from exc
        except RdmaError as exc:
            sock.close()
            self._rdma_failed(exc)
            raise MigrationError(f"RDMA setup of stream {stream} failed: {exc}", "rdma") from exc
        except (wire.WireError, OSError) as exc:
            sock.close()
            raise MigrationError(f"RDMA setup of stream {stream} failed: {exc}", "disconnected") from exc

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
                                         + (" over TCP" if self.rdma_disabled else ""), "rdma"))

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
            raise MigrationError(str(exc), "connect") from exc
        except ValueError as exc:
            raise MigrationError(str(exc), "config") from exc
        try:
            sock = channel_security.for_config(c).wrap_client(sock)
        except (channel_security.PeerIdentityError, ssl.SSLCertVerificationError) as exc:
            sock.close()
            raise MigrationError(f"{self.request.host}:{self.request.port}: TLS peer refused: {exc}", "tls") from exc
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError) as exc:  # closed mid-handshake (a restart): retry
            sock.close()
            raise MigrationError(f"TLS handshake with {self.request.host}:{self.request.port} was cut: {exc.reason}",
                                 "disconnected") from exc
        except ssl.SSLError as exc:  # the reason only: never the remote's bytes
            sock.close()
            raise MigrationError(f"{self.request.host}:{self.request.port} is not a DWCP agent "
                                 f"(TLS handshake failed: {exc.reason or exc.library or 'protocol error'})",
                                 "tls") from exc
        except OSError as exc:
            sock.close()
            raise MigrationError(f"TLS handshake with {self.request.host}:{self.request.port} failed: {exc}",
                                 "disconnected") from exc
        try:
            peer = wire.client_handshake(sock, self.key, c.node_id, role, session, stream, self.trace,
                                         capabilities=capabilities,
                                         expect_peer=channel_security.peer_identity(sock))
        except wire.WireError as exc:
            sock.close()
            # The peer is not authenticated yet: say what failed, never repeat what it sent.
            error_type = handshake_error_type(exc)
            raise MigrationError(f"{self.request.host}:{self.request.port}: {describe_handshake_failure(exc)}",
                                 error_type) from exc
        except OSError as exc:
            sock.close()
            raise MigrationError(f"handshake with {self.request.host}:{self.request.port} failed: {exc}",
                                 "disconnected") from exc
        if peer.node_id == c.node_id:  # a connection reflected back to this agent's own port
            sock.close()
            raise MigrationError(f"{self.request.host}:{self.request.port} is this agent itself "
                                 f"({c.node_id!r}): refusing to migrate to ourselves", "identity")
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
                    self.progress.retries.append(f"attempt {self.progress.attempts}: {exc} [{exc.error_type}]")
                    log.warning("attempt %d failed (%s); resuming", self.progress.attempts, exc, extra={
                        "migration_id": self.request.migration_id, "migration_status": "retrying"})
                    self._sleep(min(0.2 * 2 ** failures, 5.0))
        finally:
            if self.request.image is not None:
                self.request.image.close()
            self.pool.give(self._lent)
            self._lent = []

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
        if self.link is not None and not self.probed:
            self._probe(control)
        runs = self.plan()
        ranges = data_ranges(runs, self.size, self.chunk_size)
        try:
            wire.send_message(control, wire.Start(r.migration_id, r.vm_id, r.dest_path, self.size,
                                                  self.chunk_size, self.streams, r.protocol,
                                                  sum(n for _, n in ranges), ranges))
            ready = wire.recv_message(control, wire.Ready)
        except wire.WireError as exc:
            control.close()
            raise MigrationError(f"destination refused: {exc}", exc.error_type) from exc
        except OSError as exc:
            control.close()
            raise MigrationError(f"control connection failed: {exc}", "disconnected") from exc
        self._lend_buffers()
        attempt = Attempt(self, control, ready, wire.PROTOCOL_VERSION, runs)
        self._current = attempt
        self.progress.acked_bytes = 0
        self.progress.skipped_bytes = 0
        control.settimeout(None)
        threads = [threading.Thread(target=attempt.watch_control, name="control", daemon=True)]
        threads += [threading.Thread(target=attempt.worker, name=f"encode-{i}", daemon=True)
                    for i in range(0 if self.direct else self.workers)]
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
                self._check_holes()
                self.progress.end_transfer()
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
            raise MigrationError(f"control connection failed: {exc}", "disconnected") from exc
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

    def _check_holes(self) -> None:
        """Holes announced must still be holes: a source written meanwhile is re-sent by the next
        attempt (which walks the file again), never committed with zeros where data now is."""
        moved = holes_moved(self.fd, self.size, self.chunk_size, self.holes)
        if moved:
            self.metrics.error("migration", "source_changed")
            raise MigrationError(f"{sum(r.count for r in moved)} chunks announced as holes gained data during "
                                 "the migration; re-sending them", "source_changed")

    def _reclaim(self, attempt: Attempt) -> None:
        """Return buffers still held by queued chunks so the next attempt has its full pool."""
        for buf in attempt.reclaim():
            self.buffers.put(buf)
