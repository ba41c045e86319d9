"""The data listener: authenticates every connection, then hands it to a receive session.

Connections are served on threads: the data path is blocking socket I/O, which releases the
GIL, so streams of one migration proceed in parallel without an event loop in the way.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace

from dwcp_agent import wire
from dwcp_agent.amst import tcp
from dwcp_agent.amst.select import Transports, TransportUnavailable
from dwcp_agent.config import Config
from dwcp_agent.migration.buffers import BufferPool
from dwcp_agent.migration.receiver import ReceiveError, ReceiveSession, open_session
from dwcp_agent.migration.safe_files import sweep_abandoned
from dwcp_agent.pba.active import ProbeError, serve_probe
from dwcp_agent.telemetry import tracing
from dwcp_agent.telemetry.metrics import Metrics

log = logging.getLogger("dwcp_agent.amst")

HANDSHAKE_TIMEOUT_S = 10.0


class DataServer:
    """Accepts DWCP connections on the data port and runs incoming migrations."""

    def __init__(self, config: Config, metrics: Metrics, key: bytes,
                 transports: Transports | None = None, pool: BufferPool | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.key = key
        # TCP or RDMA per stream (amst/select.py): the handshake advertises what this host can do.
        self._own_transports = transports is None
        self.transports = transports or Transports(config, metrics)
        self.pool = pool or BufferPool()
        self.sessions: dict[int, ReceiveSession] = {}
        # Connections that asked for the "live" role go to the live-migration service.
        self.live_handler: Callable[[socket.socket, wire.PeerInfo], None] | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._sock = tcp.listen(config.listen_host, config.data_port, config.socket_buffer_bytes)
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="data-accept", daemon=True)
        self._sweep()

    def _sweep(self) -> None:
        """Remove partial images and journals abandoned longer than partial_ttl_s."""
        for path in sweep_abandoned(self.config.allowed_dest_dirs, self.config.partial_ttl_s):
            log.info("removed abandoned %s (older than partial_ttl_s)", path)

    def start(self) -> None:
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, addr = self._sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            threading.Thread(target=self._serve, args=(conn, addr), name=f"conn-{addr[1]}", daemon=True).start()

    def _serve(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        conn.settimeout(HANDSHAKE_TIMEOUT_S)
        with contextlib.suppress(OSError):
            tcp.tune_socket(conn, receive_buffer=self.config.socket_buffer_bytes)
        try:
            peer = wire.server_handshake(conn, self.key, self.config.node_id,
                                         capabilities=self.transports.capabilities())
        except (wire.WireError, OSError) as exc:
            error_type = exc.error_type if isinstance(exc, wire.WireError) else "disconnected"
            self.metrics.error("amst", error_type)
            log.warning("refused connection from %s: %s", addr[0], exc, extra={"error_type": error_type})
            conn.close()
            return
        if peer.role == "live":
            if self.live_handler is None:
                conn.close()
                return
            self.live_handler(conn, peer)
        elif peer.role == "control":
            self._serve_control(conn, peer)
        else:
            self._serve_data(conn, peer)

    def _serve_control(self, conn: socket.socket, peer: wire.PeerInfo) -> None:
        try:
            first = wire.recv_message(conn, (wire.Start, wire.ActiveProbe))
            if isinstance(first, wire.ActiveProbe):  # the source measures the path first (PBA)
                serve_probe(conn)
                first = wire.recv_message(conn, wire.Start)
            start: wire.Start = first
        except ProbeError as exc:
            self.metrics.error("pba", "probe")
            log.warning("active probe from %s failed: %s", peer.node_id, exc, extra={"error_type": "probe"})
            conn.close()
            return
        except (wire.WireError, OSError) as exc:
            self.metrics.error("amst", getattr(exc, "error_type", "disconnected"))
            conn.close()
            return
        self._sweep()
        try:
            session = open_session(start, self.config.allowed_dest_dirs, self.metrics, self.pool,
                                   index_budget_bytes=self.config.index_budget_bytes)
        except ReceiveError as exc:
            self.metrics.error("migration", exc.error_type)
            log.warning("refused migration %s from %s: %s", start.migration_id, peer.node_id, exc, extra={
                "migration_id": start.migration_id, "migration_status": "refused", "error_type": exc.error_type})
            with contextlib.suppress(OSError):
                wire.send_message(conn, wire.Refuse(str(exc), exc.error_type))
            conn.close()
            return
        with self._lock:
            self.sessions[session.session_id] = session
        span = tracing.get_tracer().start_span("receive", context=tracing.extract_context(peer.trace),
                                              kind=otel_trace.SpanKind.SERVER, attributes={
            "dwcp.migration_id": start.migration_id, "dwcp.vm_id": start.vm_id, "dwcp.source": peer.node_id,
            "dwcp.resumed_chunks": len(session.journal.have)})
        token = otel_context.attach(otel_trace.set_span_in_context(span))
        log.info("receiving migration", extra={
            "migration_id": start.migration_id, "migration_status": "receiving", "peer_id": peer.node_id,
            "size": start.size, "resumed_chunks": len(session.journal.have)})
        try:
            wire.send_message(conn, session.ready())
            session.run_control(conn)
        except OSError:
            session.close()
        finally:
            with self._lock:
                self.sessions.pop(session.session_id, None)
            conn.close()
            otel_context.detach(token)
            span.end()

    def _serve_data(self, conn: socket.socket, peer: wire.PeerInfo) -> None:
        with self._lock:
            session = self.sessions.get(peer.session)
        if session is None:
            self.metrics.error("amst", "unknown_session")
            conn.close()
            return
        try:
            source = self.transports.destination_source(conn, peer.capabilities, session.start.chunk_size)
        except (TransportUnavailable, wire.WireError, OSError) as exc:
            self.metrics.error("amst", "rdma_setup")
            log.warning("stream %d: RDMA setup failed: %s", peer.stream, exc,
                        extra={"migration_id": session.start.migration_id, "error_type": "rdma_setup"})
            conn.close()
            return
        conn.settimeout(None)
        session.run_stream(source, peer.stream, peer.version)

    def stop(self, timeout: float) -> None:
        """Stop accepting; every session makes its journal durable and lets go of its files."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:
            sessions = list(self.sessions.values())
        for session in sessions:
            session.close(timeout)
        if self._own_transports:
            self.transports.close()
