"""Runs a `Replica` in asyncio: the clock, the WAL, the transport and the waiting clients.

The loop is the Ready contract made concrete: every batch is persisted (fsync) before its
messages go out and before any client hears its result. Incoming frames are coalesced: a burst of
messages is stepped in one go and produces one Ready, so one fsync covers many commands (group
commit). Clients use lanes — each lane has at most one command in flight, so the PBFT timestamp
rule and the registry's sessions see strictly increasing sequence numbers — and retry the same
(client, seq) until their deadline, which the sessions turn into exactly-once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from dwcp_agent.acp.adaptive import Replica, ReplicaReady
from dwcp_agent.acp.messages import ConfChange, Envelope
from dwcp_agent.acp.raft.raft import NotLeader, ProposalDropped
from dwcp_agent.acp.registry import Command, Op, Result
from dwcp_agent.acp.storage import Storage
from dwcp_agent.telemetry.metrics import Metrics

__all__ = ["ConsensusNode", "ConsensusTimeout"]

log = logging.getLogger("dwcp_agent.acp")


class ConsensusTimeout(TimeoutError):
    """The command's outcome is unknown: it may still commit later (exactly once)."""


class _Lane:
    def __init__(self, client: str) -> None:
        self.client = client
        self.seq = 0


class ConsensusNode:
    """Owns the replica; `send` delivers envelopes (the transport, or a test harness)."""

    def __init__(self, replica: Replica, storage: Storage, metrics: Metrics,
                 send: Callable[[Envelope], None], *, tick_s: float = 0.05, lanes: int = 64,
                 on_addrs: Callable[[dict[str, str]], None] | None = None) -> None:
        self.replica = replica
        self.storage = storage
        self.metrics = metrics
        self.send = send
        self.tick_s = tick_s
        self.on_addrs = on_addrs or (lambda addrs: None)
        incarnation = f"{int(time.time() * 1000):x}{os.getpid():x}"
        self._free: asyncio.Queue[_Lane] = asyncio.Queue()
        for i in range(lanes):
            self._free.put_nowait(_Lane(f"{replica.id}/{incarnation}/{i}"))
        self._waiting: dict[tuple[str, int], asyncio.Future[Result]] = {}
        self._commands: dict[tuple[str, int], Command] = {}  # what each waiting client submitted
        self._reads: dict[int, asyncio.Future[None]] = {}
        self._read_ctx = 0
        self._scheduled = False
        self._ticker: asyncio.Task[None] | None = None
        self.leader = ""
        self.running = False
        self.failed = ""  # why consensus stopped itself (storage could not persist), else empty
        self._children: dict[tuple[int, str], Any] = {}
        self._set_protocol_gauge()

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start ticking."""
        self.running = True
        self._ticker = asyncio.get_running_loop().create_task(self._tick_loop())
        self._process()

    async def stop(self) -> None:
        """Stop ticking; waiting clients get ConsensusTimeout."""
        self.running = False
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        futures: list[asyncio.Future[Result] | asyncio.Future[None]] = [*self._waiting.values(), *self._reads.values()]
        for fut in futures:
            if not fut.done():
                fut.set_exception(ConsensusTimeout("consensus service stopped"))

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            self.replica.tick()
            self._process()

    # ------------------------------------------------------------ input
    def deliver(self, env: Envelope) -> None:
        """An envelope from the transport; processing is coalesced per loop iteration."""
        if self.failed:
            return
        self.replica.receive(env)
        self._schedule()

    def _schedule(self) -> None:
        """Process once at the next loop iteration: everything that arrives (or is submitted) in
        between is stepped together and leaves in one Ready, one fsync and one PBFT batch."""
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._process)

    def _process(self) -> None:
        self._scheduled = False
        guard = 0
        while not self.failed and self.replica.has_ready() and guard < 100:
            guard += 1
            rd = self.replica.ready()
            if not rd.persist.empty():
                try:
                    self.storage.save(rd.persist)
                except OSError as exc:
                    self._fail_stop(exc)
                    return
            if rd.addrs:
                self.on_addrs(rd.addrs)
            for env in rd.messages:
                self.send(env)
            self._publish(rd)

    def _fail_stop(self, exc: OSError) -> None:
        """The WAL could not persist a Ready (disk full, fsync failed): what it held may never be
        sent or answered, and the in-memory state is ahead of the disk, so this replica stops
        taking part until the agent restarts and recovers from what did reach the disk."""
        self.failed = f"consensus storage failed: {exc}"
        self.running = False
        self.metrics.errors.labels("acp", "storage").inc()
        log.error("%s; consensus stopped on this node (restart the agent once the disk is fixed)", self.failed,
                  extra={"component": "acp"})
        if self._ticker is not None:
            self._ticker.cancel()
        futures: list[asyncio.Future[Result] | asyncio.Future[None]] = [*self._waiting.values(), *self._reads.values()]
        for fut in futures:
            if not fut.done():
                fut.set_exception(ConsensusTimeout(self.failed))

    def _publish(self, rd: ReplicaReady) -> None:
        m = self.metrics
        if rd.leader_changed:
            m.acp_leader_changes.inc()
            log.info("raft leader is %s", rd.leader, extra={"component": "acp", "peer_id": rd.leader})
        self.leader = rd.leader
        if rd.leader_changed:
            self._resubmit_waiting()
        if rd.view_changes:
            m.acp_view_changes.inc(rd.view_changes)
            log.warning("pbft view change", extra={"component": "acp", "view": self.replica.status().get("view")})
        if rd.switched:
            self._set_protocol_gauge()
            log.warning("consensus protocol switched from %s to %s", *rd.switched,
                        extra={"component": "acp", "epoch": self.replica.epoch})
            self.on_addrs(self.replica.members())
        for det in rd.detections:
            m.acp_byzantine_detections.labels(det.reason).inc()
            log.warning("byzantine behaviour: %s", det.reason,
                        extra={"component": "acp", "byzantine_detected": True, "peer_id": det.peer,
                               "reason": det.reason, "score": round(det.score, 1),
                               "quarantined": det.quarantined, "detail": det.detail,
                               "evidence": [item.hex() for item in det.evidence]})
        if rd.applied:
            self._child(m.acp_commits, self.replica.protocol).inc(len(rd.applied))
        for client, seq, result in rd.confirmed:
            fut = self._waiting.pop((client, seq), None)
            if fut is not None and not fut.done():
                fut.set_result(result)
        for ctx in rd.reads:
            rfut = self._reads.pop(ctx, None)
            if rfut is not None and not rfut.done():
                rfut.set_result(None)

    def _resubmit_waiting(self) -> None:
        """A new leader is known: send it what our clients wait for now instead of at each one's
        next retry (up to `retry_s` later, which was most of the first write's delay after a
        leader died). Resubmitting is safe: a command is applied once per (client, seq)."""
        for cmd in list(self._commands.values()):
            with contextlib.suppress(NotLeader, ProposalDropped):
                self.replica.submit(cmd, forward=True)
        if self._commands:
            self._schedule()

    def _child(self, metric: Any, protocol: str) -> Any:
        """The metric's child for `protocol`, looked up once (labels() costs more than the update)."""
        key = (id(metric), protocol)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(protocol)
        return child

    def _set_protocol_gauge(self) -> None:
        for protocol in ("raft", "pbft"):
            self.metrics.acp_protocol.labels(protocol).set(1 if protocol == self.replica.protocol else 0)

    # ------------------------------------------------------------ clients
    async def submit(self, op: Op, timeout: float = 5.0, retry_s: float = 0.5) -> Result:
        """Order `op` and wait for its result; ConsensusTimeout when the deadline passes."""
        if self.failed:
            raise ConsensusTimeout(self.failed)
        lane = await self._free.get()
        lane.seq += 1
        cmd = Command(lane.client, lane.seq, op, int(time.time() * 1000), lane.seq - 1)
        key = (cmd.client, cmd.seq)
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        deadline = loop.time() + timeout
        protocol = self.replica.protocol
        try:
            fut: asyncio.Future[Result] = loop.create_future()
            self._waiting[key] = fut
            self._commands[key] = cmd
            while True:
                if self.failed:
                    raise ConsensusTimeout(self.failed)
                with contextlib.suppress(NotLeader, ProposalDropped):
                    self.replica.submit(cmd, forward=True)
                self._schedule()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise ConsensusTimeout(f"no result for {type(op).__name__} within {timeout}s")
                with contextlib.suppress(asyncio.TimeoutError):
                    result = await asyncio.wait_for(asyncio.shield(fut), min(retry_s, remaining))
                    self._child(self.metrics.acp_consensus_latency, protocol).observe(time.perf_counter() - start)
                    return result
        finally:
            self._waiting.pop(key, None)
            self._commands.pop(key, None)
            self._free.put_nowait(lane)

    async def read_barrier(self, timeout: float = 5.0) -> bool:
        """Wait until the local registry reflects every write committed before the call (ReadIndex).
        False when the protocol orders reads as commands instead (PBFT)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self._read_ctx += 1
            ctx = self._read_ctx
            fut: asyncio.Future[None] = loop.create_future()
            self._reads[ctx] = fut
            if not self.replica.read_index(ctx):
                self._reads.pop(ctx, None)
                return False
            self._process()
            remaining = deadline - loop.time()
            try:
                await asyncio.wait_for(fut, min(0.5, max(remaining, 0.01)))
                return True
            except TimeoutError:
                self._reads.pop(ctx, None)
                if loop.time() >= deadline:
                    raise ConsensusTimeout("no read index within the deadline") from None

    async def change_membership(self, cc: ConfChange, timeout: float = 10.0) -> None:
        """Propose a single-server change and wait until the registry lists (or drops) the member."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            member = self.replica.registry.state.members.get(cc.node_id)
            if (member is None) == (cc.op == "remove") and (cc.op != "add" or (member is not None and member.voter)):
                return
            with contextlib.suppress(NotLeader, ProposalDropped):
                self.replica.change_membership(cc)
                self._process()
            await asyncio.sleep(0.25)
        raise ConsensusTimeout(f"membership change {cc.op} {cc.node_id} did not commit")
