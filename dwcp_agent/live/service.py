"""The agent's live-migration component: outgoing migrations by id, incoming ones by connection.

Everything runs on the agent's event loop; the data listener (threads) hands over connections
whose handshake asked for the `live` role: stream 0 opens an incoming migration (its control
connection), streams 1.. are data connections joining that session's byte stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from pathlib import Path
from typing import Any

from dwcp_agent.config import Config
from dwcp_agent.live.destination import IncomingLive
from dwcp_agent.live.outcome import OUTCOME_STREAM
from dwcp_agent.live.record import LiveRecord, LiveRequest
from dwcp_agent.live.source import LiveRequestError, OutgoingLive, Ownership
from dwcp_agent.live.tunnel import Tunnel
from dwcp_agent.migration.outgoing import target_allowed
from dwcp_agent.security.sealed import FrameKey
from dwcp_agent.telemetry.metrics import Metrics
from dwcp_agent.wire import PeerInfo

__all__ = ["LiveRequestError", "LiveService", "parse_live_request"]

log = logging.getLogger("dwcp_agent.live")


def parse_live_request(body: dict[str, Any], config: Config) -> LiveRequest:
    """The POST /api/v3/migrations body with kind=live; LiveRequestError(400) names a bad field."""
    vm_id, to = body.get("vm_id"), body.get("to")
    if not isinstance(vm_id, str) or not vm_id:
        raise LiveRequestError(400, "vm_id (string) is required")
    if not isinstance(to, str) or ":" not in to:
        raise LiveRequestError(400, "to (HOST:PORT of the destination agent's data port) is required")
    host, _, port = to.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LiveRequestError(400, f"to: {to!r} is not HOST:PORT")
    if not target_allowed(host, int(port), config):
        raise LiveRequestError(400, f"to: {to!r} is neither a cluster member nor in migration_targets")
    downtime = body.get("downtime_ms")
    if downtime is not None and (not isinstance(downtime, int) or downtime <= 0):
        raise LiveRequestError(400, "downtime_ms must be a positive integer")
    policy = body.get("policy")
    if policy is not None and not isinstance(policy, str):
        raise LiveRequestError(400, "policy must be a string")
    return LiveRequest(vm_id, to, str(body.get("qmp") or ""), str(body.get("dest_qmp") or ""), downtime, policy)


class LiveService:
    """Outgoing and incoming live migrations of one agent, on `loop` (the agent's, where the
    consensus service runs too); `ownership` opens each outgoing migration's ownership session."""

    def __init__(self, config: Config, metrics: Metrics, key: bytes, run_dir: Path,
                 loop: asyncio.AbstractEventLoop, ownership: Ownership | None = None,
                 mode: str = "datacenter") -> None:
        self.config = config
        self.loop = loop
        self.metrics = metrics
        self.key = key
        self.run_dir = run_dir
        self.ownership = ownership
        self.mode = mode
        self.outgoing: dict[str, OutgoingLive] = {}
        self.incoming: dict[int, IncomingLive] = {}  # by session id
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, request: LiveRequest) -> LiveRecord:
        """Set up (may raise LiveRequestError, nothing changed), then migrate in the background."""
        busy = [m for m in self.outgoing.values() if m.request.vm_id == request.vm_id and not m.record.done]
        if busy:
            raise LiveRequestError(409, f"VM {request.vm_id} is already migrating ({busy[0].record.id})")
        migration = OutgoingLive(self.config, self.metrics, self.key, request, self.ownership, self.run_dir,
                                 self.mode)
        await migration.prepare()
        self.outgoing[migration.record.id] = migration
        self._spawn(migration.run())
        return migration.record

    def list(self) -> list[LiveRecord]:
        return [m.record for m in self.outgoing.values()]

    def get(self, migration_id: str) -> LiveRecord | None:
        migration = self.outgoing.get(migration_id)
        return migration.record if migration else None

    async def cancel(self, migration_id: str, timeout: float) -> LiveRecord | None:
        migration = self.outgoing.get(migration_id)
        if migration is None:
            return None
        migration.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(migration.done.wait(), timeout)
        return migration.record

    def accept(self, conn: socket.socket, peer: PeerInfo, keys: tuple[FrameKey, FrameKey] | None = None) -> None:
        """From a data-listener thread: run an incoming live migration on the event loop (stream
        0), add a data connection (1..N, sealed with `keys` when it came over TLS) or its handover
        line (OUTCOME_STREAM; its words carry their own MAC)."""
        if peer.stream == 0:
            asyncio.run_coroutine_threadsafe(self._serve_incoming(conn, peer, keys), self.loop)
            return
        if peer.stream == OUTCOME_STREAM:
            self.loop.call_soon_threadsafe(self._attach_outcome, conn, peer)
            return
        incoming = self.incoming.get(peer.session)
        known = incoming is not None and incoming.peer_node == peer.node_id
        if incoming is None or not known or not incoming.tunnel.add_stream(conn, peer.stream, keys):
            log.warning("live data connection from %s for unknown session %x refused", peer.node_id, peer.session,
                        extra={"error_type": "unknown_session", "peer_id": peer.node_id})
            self.metrics.error("migration", "live_unknown_session")
            conn.close()

    def _attach_outcome(self, conn: socket.socket, peer: PeerInfo) -> None:
        incoming = self.incoming.get(peer.session)
        if incoming is None or incoming.peer_node != peer.node_id or not incoming.attach_outcome(conn):
            log.warning("live handover line from %s for unknown session %x refused", peer.node_id, peer.session,
                        extra={"error_type": "unknown_session", "peer_id": peer.node_id})
            self.metrics.error("migration", "live_unknown_session")
            conn.close()

    async def _serve_incoming(self, conn: socket.socket, peer: PeerInfo,
                              keys: tuple[FrameKey, FrameKey] | None) -> None:
        conn.settimeout(None)
        conn.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=conn)
        if peer.session in self.incoming:
            writer.close()
            return
        incoming = IncomingLive(self.config, self.metrics, Tunnel(reader, writer, peer.session, keys=keys),
                                peer.node_id, self.run_dir, self.key)
        self.incoming[peer.session] = incoming
        try:
            await incoming.serve()
        finally:
            del self.incoming[peer.session]

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self, timeout: float) -> None:
        """Agent shutdown: outgoing migrations roll back (the source keeps running)."""
        for migration in self.outgoing.values():
            if not migration.record.done:
                migration.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
