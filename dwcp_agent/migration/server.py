"""The data listener: authenticates every connection, then hands it to a receive session.

Connections are served by a bounded pool of worker threads: the data path is blocking socket
I/O, which releases the GIL, so streams of one migration proceed in parallel without an event
loop in the way. Admission, TLS and the handshake deadline are security/{preauth,channels}.py.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace

from dwcp_agent import wire
from dwcp_agent.amst import tcp
from dwcp_agent.amst.channel import TcpChannel
from dwcp_agent.amst.select import Transports, TransportUnavailable
from dwcp_agent.config import Config
from dwcp_agent.migration.buffers import BufferPool
from dwcp_agent.migration.receiver import ReceiveError, ReceiveSession, open_session
from dwcp_agent.migration.safe_files import sweep_abandoned
from dwcp_agent.pba.active import ProbeError, serve_probe
from dwcp_agent.security import channels as channel_security
from dwcp_agent.security.preauth import ConnectionLimiter, DeadlineReaper, RateLimitedLog, truncate
from dwcp_agent.security.sealed import FrameKey, seal_stream
from dwcp_agent.telemetry import tracing
from dwcp_agent.telemetry.metrics import Metrics

log = logging.getLogger("dwcp_agent.amst")
# The listener is gone (closed under us): accepting again cannot succeed.
_LISTENER_GONE = (errno.EBADF, errno.EINVAL, errno.ENOTSOCK)

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
        # (plain socket, peer, sealing keys when the connection came over TLS)
        self.live_handler: Callable[[socket.socket, wire.PeerInfo, tuple[FrameKey, FrameKey] | None],
                                    None] | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.limiter = ConnectionLimiter(config.max_connections, config.max_connections_per_source)
        self._workers = ThreadPoolExecutor(max_workers=config.max_connections, thread_name_prefix="data-conn")
        self._deadlines = DeadlineReaper()
        self.refusals = RateLimitedLog(log)
        self._sock = tcp.listen(config.listen_host, config.data_port, config.socket_buffer_bytes)
        self.port: int = self._sock.getsockname()[1]
        try:
            self.channels = channel_security.for_config(config)
        except BaseException:
            self._sock.close()
            self._deadlines.stop()
            raise
        self._thread = threading.Thread(target=self._accept_loop, name="data-accept", daemon=True)
        self._sweep()

    def _sweep(self) -> None:
        """Remove partial images and journals abandoned longer than partial_ttl_s."""
        for path in sweep_abandoned(self.config.allowed_dest_dirs, self.config.partial_ttl_s):
            log.info("removed abandoned %s (older than partial_ttl_s)", path)

    def start(self) -> None:
        self._thread.start()

    @property
    def accepting(self) -> bool:
        """The accept loop runs (health and the watchdog fail when it has stopped)."""
        return self._thread.is_alive() and not self._stopping.is_set()

    def health(self) -> dict[str, object]:
        return {"accepting": self.accepting, "connections": self.limiter.open, **self.channels.health()}

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, addr = self._sock.accept()
            except OSError as exc:
                if self._stopping.is_set():
                    return
                if exc.errno in _LISTENER_GONE:
                    self.metrics.error("amst", "accept")
                    log.error("data port listener failed, no longer accepting: %s", exc,
                              extra={"error_type": "accept"})
                    return
                self.refusals.warning("data port accept failed: %s", exc, extra={"error_type": "accept"})
                time.sleep(0.05)  # EMFILE and friends: do not spin, keep serving
                continue
            try:
                self._admit(conn, addr)
            except Exception as exc:  # the loop outlives any one connection's failure
                self.metrics.error("amst", "accept")
                self.refusals.warning("data port could not serve a connection: %s", exc, extra={"error_type": "accept"})
                with contextlib.suppress(OSError):
                    conn.close()

    def _admit(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        refused = self.limiter.acquire(addr[0])
        if refused:
            self.metrics.error("amst", refused)
            self.refusals.warning("refused connection from %s: %s", addr[0], refused, extra={"error_type": refused})
            conn.close()
            return
        try:
            self._workers.submit(self._serve_admitted, conn, addr)
        except BaseException:
            self.limiter.release(addr[0])
            raise

    def _serve_admitted(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        try:
            self._serve(conn, addr)
        except Exception as exc:  # a bug in one connection must not leak its slot or kill the worker
            self.metrics.error("amst", "internal")
            log.exception("data connection from %s failed: %s", addr[0], exc)
            with contextlib.suppress(OSError):
                conn.close()
        finally:
            self.limiter.release(addr[0])

    def _serve(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        conn.settimeout(HANDSHAKE_TIMEOUT_S)
        with contextlib.suppress(OSError):
            tcp.tune_socket(conn, receive_buffer=self.config.socket_buffer_bytes)
        # One deadline for TLS, the DWCP handshake and the first control message together.
        token = self._deadlines.watch(conn, HANDSHAKE_TIMEOUT_S)
        try:
            conn = self.channels.wrap_server(conn)
            peer = wire.server_handshake(conn, self.key, self.config.node_id,
                                         capabilities=self.transports.capabilities(),
                                         expect_peer=channel_security.peer_identity(conn))
        except (wire.WireError, OSError) as exc:
            self._deadlines.done(token)
            error_type = exc.error_type if isinstance(exc, wire.WireError) else (
                "tls" if isinstance(exc, channel_security.ssl.SSLError) else "disconnected")
            self.metrics.error("amst", error_type)
            self.refusals.warning("refused connection from %s: %s", addr[0], truncate(exc, 300),
                             extra={"error_type": error_type})
            conn.close()
            return
        if peer.role != "control":
            self._deadlines.done(token)
        if peer.role == "live":
            if self.live_handler is None:
                conn.close()
                return
            keys: tuple[FrameKey, FrameKey] | None = None
            if isinstance(conn, channel_security.ssl.SSLSocket):
                # Control and guest memory: sealed frames, as the image path's TcpChannel (security/sealed.py).
                try:
                    conn, send_key, recv_key = seal_stream(conn)
                except (wire.WireError, OSError) as exc:
                    self.metrics.error("amst", exc.error_type if isinstance(exc, wire.WireError) else "disconnected")
                    self.refusals.warning("live connection from %s: no stream keys: %s", addr[0], truncate(exc, 300))
                    conn.close()
                    return
                keys = (send_key, recv_key)
            self.live_handler(conn, peer, keys)
        elif peer.role == "control":
            self._serve_control(conn, peer, token)
        else:
            self._serve_data(conn, peer)

    def _serve_control(self, conn: socket.socket, peer: wire.PeerInfo, deadline: int) -> None:
        try:
            first = wire.recv_message(conn, (wire.Start, wire.ActiveProbe))
            self._deadlines.done(deadline)
            if isinstance(first, wire.ActiveProbe):  # the source measures the path first (PBA)
                serve_probe(conn)
                first = wire.recv_message(conn, wire.Start)
            start: wire.Start = first
        except ProbeError as exc:
            self.metrics.error("pba", "probe")
            log.warning("active probe from %s failed: %s", truncate(peer.node_id), exc, extra={"error_type": "probe"})
            conn.close()
            return
        except (wire.WireError, OSError) as exc:
            self._deadlines.done(deadline)
            self.metrics.error("amst", getattr(exc, "error_type", "disconnected"))
            conn.close()
            return
        self._sweep()
        try:
            session = open_session(start, self.config.allowed_dest_dirs, self.metrics, self.pool,
                                   index_budget_bytes=self.config.index_budget_bytes)
        except ReceiveError as exc:
            self.metrics.error("migration", exc.error_type)
            self.refusals.warning("refused migration %s from %s: %s", truncate(start.migration_id),
                                  truncate(peer.node_id), exc, extra={
                                      "migration_id": truncate(start.migration_id), "migration_status": "refused",
                                      "error_type": exc.error_type})
            with contextlib.suppress(OSError):
                wire.send_message(conn, wire.Refuse(str(exc), exc.error_type))
            conn.close()
            return
        with self._lock:
            self.sessions[session.session_id] = session
        span = tracing.get_tracer().start_span("receive", context=tracing.extract_context(peer.trace),
                                              kind=otel_trace.SpanKind.SERVER, attributes={
            "dwcp.migration_id": start.migration_id, "dwcp.vm_id": start.vm_id, "dwcp.source": truncate(peer.node_id),
            "dwcp.resumed_chunks": len(session.journal.have)})
        token = otel_context.attach(otel_trace.set_span_in_context(span))
        log.info("receiving migration", extra={
            "migration_id": start.migration_id, "migration_status": "receiving", "peer_id": truncate(peer.node_id),
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
        # A TCP stream may now be on a new socket object (sealed streams, security/sealed.py).
        (source.sock if isinstance(source, TcpChannel) else conn).settimeout(None)
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
        self._deadlines.stop()
        self._workers.shutdown(wait=False)
        if self._own_transports:
            self.transports.close()
