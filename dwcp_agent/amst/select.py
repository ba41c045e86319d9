"""Transport selection: TCP or RDMA for this agent, for each peer and each stream, and why.

`TRANSPORT_MODE=auto` uses RDMA when this host has a device with an active port and enough
locked memory for the buffer pool, and the peer says the same in the handshake ("rdma" in its
capabilities); anything missing means TCP, with the reason in the log and in /health. `tcp`
never touches RDMA. `rdma_only` turns every missing piece into `TransportUnavailable`, whose
message names it.

`Transports` is also the injection point for the verbs provider: the agent uses pyverbs, the
tests pass the in-process software provider to both the source and the destination.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from dwcp_agent import wire
from dwcp_agent.amst.channel import DataChannel, FrameSource, TcpChannel
from dwcp_agent.amst.rdma import RdmaDeclined, RdmaError, accept_destination, connect_source, slot_size_for
from dwcp_agent.amst.verbs import PortInfo, VerbsContext, VerbsError, VerbsProvider, memlock_error
from dwcp_agent.config import Config
from dwcp_agent.hde.layout import max_encoded_len
from dwcp_agent.telemetry.metrics import Metrics

__all__ = ["CAPABILITY", "Selection", "TransportUnavailable", "Transports", "pool_bytes"]

log = logging.getLogger("dwcp_agent.amst")

CAPABILITY = "rdma"
TRANSPORTS = ("rdma", "tcp")
DEFAULT_STREAMS = 4


class TransportUnavailable(Exception):
    """transport_mode=rdma_only, and RDMA cannot be used; the message says what is missing."""

    error_type = "rdma_unavailable"


@dataclass(frozen=True)
class Selection:
    """The transport chosen and the reason (for RDMA: the port; for TCP: what is missing)."""

    transport: str
    reason: str
    port: PortInfo | None = None

    def as_health(self) -> dict[str, str]:
        return {"transport": self.transport, "rdma": self.reason}


def max_frame(chunk_size: int) -> int:
    """Largest DATA frame of a chunk: the header plus the encoded-size bound the receiver enforces."""
    return wire.HEADER_SIZE + max_encoded_len(chunk_size)


def pool_bytes(config: Config, chunk_size: int | None = None) -> int:
    """Locked memory for one outgoing and one incoming migration at the configured stream count."""
    slot = slot_size_for(max_frame(chunk_size or config.chunk_size))
    return 2 * (config.stream_count or DEFAULT_STREAMS) * config.rdma_slots * slot


def default_provider(config: Config) -> VerbsProvider:
    from dwcp_agent.amst.pyverbs_adapter import PyverbsProvider

    return PyverbsProvider(config.rdma_device, config.rdma_gid_index, config.rdma_hop_limit)


def select_local(config: Config, provider: VerbsProvider) -> Selection:
    """What this host can do, before any peer is involved."""
    if config.transport_mode == "tcp":
        return Selection("tcp", "transport_mode=tcp")
    ports, problem = provider.discover()
    if problem:
        return Selection("tcp", problem)
    port = next(p for p in ports if p.active)
    needed = pool_bytes(config)
    available = provider.memlock_available()
    if available is not None and needed > available:
        return Selection("tcp", str(memlock_error(needed, available)))
    return Selection("rdma", f"using {port.describe()}", port)


class Transports:
    """This agent's transports: the local selection, the opened device, channel construction."""

    def __init__(self, config: Config, metrics: Metrics, provider: VerbsProvider | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.mode = config.transport_mode
        self.provider = provider
        if self.mode != "tcp" and self.provider is None:
            self.provider = default_provider(config)
        self.selection = (select_local(config, self.provider) if self.provider is not None
                          else Selection("tcp", "transport_mode=tcp"))
        self._ctx: VerbsContext | None = None
        self._lock = threading.Lock()

    # -- selection --------------------------------------------------------------------------

    @property
    def rdma(self) -> bool:
        return self.selection.transport == "rdma"

    def require(self) -> None:
        """rdma_only: fail now (agent start, migration start) with what is missing."""
        if self.mode == "rdma_only" and not self.rdma:
            raise TransportUnavailable(f"transport_mode=rdma_only but this host cannot use RDMA: "
                                       f"{self.selection.reason}")

    def capabilities(self) -> tuple[str, ...]:
        """What the handshake advertises."""
        return (CAPABILITY,) if self.rdma else ()

    def for_peer(self, peer_capabilities: tuple[str, ...], peer: str) -> Selection:
        """The transport for a migration to/from `peer`, from both sides' capabilities."""
        self.require()
        if not self.rdma:
            return self.selection
        if CAPABILITY not in peer_capabilities:
            chosen = Selection("tcp", f"peer {peer} does not offer RDMA (see its /health/amst for why)")
            if self.mode == "rdma_only":
                raise TransportUnavailable(f"transport_mode=rdma_only but {chosen.reason}")
            return chosen
        return self.selection

    def publish(self) -> None:
        """dwcp_v3_transport_info and the log line saying which transport and why."""
        for name in TRANSPORTS:
            self.metrics.transport_info.labels(name).set(1 if name == self.selection.transport else 0)
        log.info("transport: %s (%s)", self.selection.transport, self.selection.reason,
                 extra={"component": "amst", "transport_mode": self.mode})

    # -- channels ---------------------------------------------------------------------------

    def context(self) -> VerbsContext:
        """The opened device, shared by all RDMA streams of this agent."""
        with self._lock:
            if self._ctx is None:
                assert self.provider is not None and self.selection.port is not None
                self._ctx = self.provider.open(self.selection.port)
            return self._ctx

    def source_channel(self, sock: socket.socket, peer_capabilities: tuple[str, ...], chunk_size: int,
                       on_failure: Callable[[RdmaError], None] | None = None) -> DataChannel:
        """Source: the data connection `sock` (handshake done, "rdma" offered) as an RDMA or TCP channel."""
        if CAPABILITY not in peer_capabilities:
            return TcpChannel(sock)
        try:
            ctx = self.context()
        except VerbsError as exc:
            with contextlib.suppress(OSError):
                wire.send_message(sock, wire.RdmaDecline(f"source: {exc}"))
            return self._declined(sock, f"this host: {exc}")
        try:
            return connect_source(ctx, sock, max_frame(chunk_size), self.config.rdma_slots, self.metrics,
                                  self.config.io_timeout_s, on_failure)
        except RdmaDeclined as exc:
            return self._declined(sock, str(exc))

    def destination_source(self, sock: socket.socket, peer_capabilities: tuple[str, ...],
                           chunk_size: int) -> FrameSource:
        """Destination: the accepted data connection as an RDMA or TCP frame source."""
        if CAPABILITY not in peer_capabilities or not self.rdma:
            return TcpChannel(sock)
        try:
            ctx = self.context()
        except VerbsError as exc:
            wire.recv_message(sock, (wire.RdmaConnect, wire.RdmaDecline))
            wire.send_message(sock, wire.RdmaDecline(f"destination: {exc}"))
            return self._declined(sock, f"this host: {exc}")
        try:
            return accept_destination(ctx, sock, max_frame(chunk_size), self.config.rdma_slots, self.metrics)
        except RdmaDeclined as exc:
            return self._declined(sock, str(exc))

    def _declined(self, sock: socket.socket, reason: str) -> TcpChannel:
        self.metrics.rdma_errors.labels("declined").inc()
        if self.mode == "rdma_only":
            sock.close()
            raise TransportUnavailable(f"transport_mode=rdma_only but RDMA was declined: {reason}")
        log.warning("RDMA declined, stream runs over TCP: %s", reason, extra={"component": "amst"})
        return TcpChannel(sock)

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                self._ctx.close()
                self._ctx = None
