"""ConsensusService: the agent-facing surface of ACP (lifecycle, health, registry operations).

Single-node mode (no `acp_peers`) runs a one-member Raft cluster whose WAL lives under the state
directory, so ownership and leases work out of the box. With peers, the members are listed as
`id=host:port` (this node included, or not yet: a node missing from the list starts as a joiner
and waits for `cluster join` on a member). The protocol comes from `acp_protocol`, or from the
network mode when it is `auto` (datacenter -> Raft, internet -> PBFT); later switches are
committed commands (`switch_protocol`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from pathlib import Path
from typing import Any

from dwcp_agent.acp.adaptive import Replica, ReplicaOptions, bootstrap
from dwcp_agent.acp.auth import KeyRing, load_or_create_key, parse_peer_keys
from dwcp_agent.acp.messages import ConfChange, Envelope
from dwcp_agent.acp.pbft.byzantine_faults import FaultyReplica, from_environment
from dwcp_agent.acp.pbft.pbft import PbftOptions
from dwcp_agent.acp.raft.raft import RaftOptions
from dwcp_agent.acp.registry import (
    AcquireLease,
    ClaimVm,
    Lease,
    ReadOwner,
    Reinstate,
    ReleaseLease,
    Result,
    RolloutSetting,
    SetRollout,
    SwitchProtocol,
    TransferOwnership,
)
from dwcp_agent.acp.runtime.node import ConsensusNode, ConsensusTimeout
from dwcp_agent.acp.runtime.transport import Transport
from dwcp_agent.acp.runtime.wal import FileWAL
from dwcp_agent.acp.storage import PersistOps
from dwcp_agent.config import Config, ConfigError
from dwcp_agent.security import channels as channel_security
from dwcp_agent.telemetry.metrics import Metrics

__all__ = ["ConsensusError", "ConsensusService", "ConsensusTimeout", "Lease", "RolloutSetting", "parse_peers"]

log = logging.getLogger("dwcp_agent.acp")


class ConsensusError(RuntimeError):
    """The registry refused a command (stale fencing token, lease held, not the owner...)."""

    def __init__(self, result: Result) -> None:
        super().__init__(result.error)
        self.result = result


def parse_peers(peers: list[str]) -> dict[str, str]:
    """['a=10.0.0.1:9877', ...] -> {'a': '10.0.0.1:9877'}."""
    out: dict[str, str] = {}
    for item in peers:
        node, sep, addr = item.partition("=")
        if not sep or not node or ":" not in addr:
            raise ValueError(f"acp_peers entry {item!r} is not id=host:port")
        out[node.strip()] = addr.strip()
    return out


def choose_protocol(config: Config) -> str:
    """acp_protocol, or by network mode when it is auto."""
    if config.acp_protocol != "auto":
        return config.acp_protocol
    return "pbft" if config.network_mode == "internet" else "raft"


class ConsensusService:
    """One per agent; see the module docstring."""

    def __init__(self, config: Config, metrics: Metrics, state_dir: Path, *, tick_s: float = 0.05,
                 fsync: bool = True) -> None:
        self.config = config
        self.metrics = metrics
        self.state_dir = Path(state_dir)
        self.tick_s = tick_s
        self.fsync = fsync
        self.node_id = config.node_id
        peers = parse_peers(config.acp_peers)
        self.single = not peers
        self.addr = f"{'127.0.0.1' if config.listen_host in ('0.0.0.0', '') else config.listen_host}:{config.acp_port}"
        self.members0 = peers or {self.node_id: self.addr}
        self.node: ConsensusNode | None = None
        self.transport: Transport | None = None
        self.wal: FileWAL | None = None
        self.faulty: FaultyReplica | None = None
        self.started_at = 0.0
        self._last_refusal_log = 0.0

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Recover from the WAL (or bootstrap), listen on the ACP port, start ticking."""
        acp_dir = self.state_dir / "acp"
        self.wal = FileWAL(acp_dir / "wal", fsync=self.fsync)
        rec = self.wal.load()
        if rec is None:
            self.wal.save(PersistOps(epoch_start=bootstrap(choose_protocol(self.config), self.members0)))
            rec = self.wal.load()
        assert rec is not None
        signing = load_or_create_key(acp_dir / "node.key")
        keys = KeyRing(self.node_id, signing, cluster_secret=self.config.psk_bytes or b"single-node")
        try:
            for node, key in parse_peer_keys(self.config.acp_peer_keys).items():
                keys.add_peer(node, key)
        except ValueError as exc:
            raise ConfigError("acp_peer_keys", str(exc)) from None
        ticks_per_s = 1.0 / self.tick_s
        options = ReplicaOptions(
            raft=RaftOptions(election_ticks=max(4, int(0.5 * ticks_per_s)), heartbeat_ticks=1),
            # Two batches in flight: under load requests queue into bigger batches, and each batch
            # costs the same signatures, messages and fsyncs whatever its size.
            pbft=PbftOptions(checkpoint_interval=64, window=256, max_inflight=2,
                             request_timeout=int(2 * ticks_per_s), view_change_timeout=int(2 * ticks_per_s),
                             retransmit_ticks=max(2, int(0.5 * ticks_per_s))),
            snapshot_every=self.config.acp_snapshot_entries,
        )
        incarnation = int(time.time())
        replica = Replica(self.node_id, rec, keys=keys, rng=random.Random(), options=options,
                          incarnation=incarnation)
        self.faulty = from_environment(self.node_id, keys, sorted(replica.members()))
        if self.faulty is not None:
            log.warning("TEST HOOK: this replica is Byzantine on purpose (%s)", self.faulty.behaviour,
                        extra={"component": "acp"})
        if not self.single:
            unpinned = sorted(p for p in {**self.members0, **replica.members()}
                              if p != self.node_id and keys.pinned(p) is None)
            if unpinned:
                raise ConfigError("acp_peer_keys", f"no pinned signing key for {', '.join(unpinned)}: list every "
                                                   "member as id=<hex key> (`dwcp-agent cluster key` on that node)")
            self.transport = Transport(self.node_id, self.config.psk_bytes, keys, self._on_envelope,
                                       self._on_refused, connect_timeout=self.config.connect_timeout_s,
                                       channels=channel_security.for_config(self.config))
            host = self.config.listen_host or "0.0.0.0"
            await self.transport.start(host, self.config.acp_port)
            self.transport.set_peers({**self.members0, **replica.members()})
        self.node = ConsensusNode(replica, self.wal, self.metrics, self._send, tick_s=self.tick_s,
                                  on_addrs=self._on_addrs)
        await self.node.start()
        self.started_at = time.time()
        log.info("consensus started", extra={"component": "acp", "protocol": replica.protocol,
                                              "epoch": replica.epoch, "members": sorted(replica.members())})

    async def stop(self) -> None:
        """Stop ticking, close links and the WAL."""
        if self.node is not None:
            await self.node.stop()
        if self.transport is not None:
            await self.transport.stop()
        if self.wal is not None:
            self.wal.close()

    def _send(self, env: Envelope) -> None:
        if self.transport is None:
            return
        for out in [env] if self.faulty is None else self.faulty.out(env):
            self.transport.send(out)

    def _on_envelope(self, peer: str, env: Envelope) -> None:
        if self.node is not None:
            self.node.deliver(env)

    def _on_refused(self, addr: str, reason: str) -> None:
        """A handshake or frame refused: counted by reason, logged by source address (rate-limited).
        Never reported to the Byzantine detector: the name a peer claims before proving it is hearsay."""
        self.metrics.acp_refused.labels(reason).inc()
        now = time.monotonic()
        if now - self._last_refusal_log >= 1.0:
            self._last_refusal_log = now
            log.warning("acp connection refused: %s", reason,
                        extra={"component": "acp", "source_addr": addr[:64], "reason": reason})

    def _on_addrs(self, addrs: dict[str, str]) -> None:
        if self.transport is not None:
            self.transport.set_peers(addrs)

    def _require(self) -> ConsensusNode:
        if self.node is None:
            raise ConsensusTimeout("consensus service is not running")
        return self.node

    # ------------------------------------------------------------ health
    def health(self) -> dict[str, Any]:
        """'ok' with a leader/primary, 'degraded' without, 'down' when not running."""
        if self.node is None or not self.node.running:
            return {"status": "down", "protocol": None}
        st = self.node.replica.status()
        leader = st.get("leader") or st.get("primary") or ""
        active = st.get("active", True)
        status = "ok" if leader and active else "degraded"
        out = {"status": status, "node_id": self.node_id, "single_node": self.single, **st}
        detector = self.node.replica.detector
        out["quarantined"] = sorted(detector.quarantined)
        out["quarantine_evidence"] = {peer: {"reason": d.reason, "detail": d.detail,
                                             "evidence": [item.hex() for item in d.evidence]}
                                      for peer, d in sorted(detector.proofs.items())}
        out["suspected"] = detector.suspected()
        return out

    # ------------------------------------------------------------ registry operations
    async def _command(self, op: Any, timeout: float = 5.0) -> Result:
        with self.metrics.operation("acp"):
            result = await self._require().submit(op, timeout)
        if not result.ok:
            raise ConsensusError(result)
        return result

    async def claim(self, vm_id: str, host: str) -> str:
        """Record `host` as owner of an unowned VM (idempotent for the same host)."""
        return str((await self._command(ClaimVm(vm_id, host))).value)

    async def acquire_lease(self, vm_id: str, holder: str, ttl_s: float) -> Lease:
        """Migration lease with a fencing token; renews when `holder` already holds it."""
        value = (await self._command(AcquireLease(vm_id, holder, int(ttl_s * 1000)))).value
        return Lease(value["vm_id"], value["holder"], value["token"], value["expires_ms"])

    async def release_lease(self, vm_id: str, holder: str, fencing_token: int) -> None:
        """Give a lease back early."""
        await self._command(ReleaseLease(vm_id, holder, fencing_token))

    async def transfer_ownership(self, vm_id: str, from_host: str, to_host: str, fencing_token: int) -> str:
        """Commit the end of a migration; refused with a stale token or when from_host is not the owner."""
        return str((await self._command(TransferOwnership(vm_id, from_host, to_host, fencing_token))).value)

    async def owner(self, vm_id: str) -> str | None:
        """Linearizable read of a VM's owner."""
        node = self._require()
        with self.metrics.operation("acp"):
            if await node.read_barrier():
                return node.replica.registry.owner(vm_id)
            result = await node.submit(ReadOwner(vm_id))
        return result.value if result.value is None else str(result.value)

    async def rollout(self) -> RolloutSetting:
        """Linearizable read of the rollout settings."""
        node = self._require()
        with self.metrics.operation("acp"):
            if not await node.read_barrier():
                await node.submit(SetRollout())
        return node.replica.registry.state.rollout

    async def set_rollout(self, percentage: int | None = None, frozen: bool | None = None,
                          enable_v3: bool | None = None) -> RolloutSetting:
        """Change rollout settings (None keeps a field)."""
        value = (await self._command(SetRollout(percentage, frozen, enable_v3))).value
        setting = RolloutSetting(value["percentage"], value["frozen"], value["enable_v3"])
        self.metrics.rollout_percentage.set(setting.percentage)
        self.metrics.rollout_frozen.set(1 if setting.frozen else 0)
        return setting

    async def switch_protocol(self, target: str, forced: bool = False) -> dict[str, Any]:
        """Commit a protocol switch (refused within 5 minutes of the last unless forced)."""
        return dict((await self._command(SwitchProtocol(target, forced), timeout=10.0)).value)

    async def on_network_mode(self, mode: str) -> None:
        """Mode detector hook: datacenter -> Raft, internet -> PBFT (hybrid keeps the current one)."""
        if self.config.acp_protocol != "auto" or mode not in ("datacenter", "internet"):
            return
        target = "raft" if mode == "datacenter" else "pbft"
        node = self._require()
        if node.replica.protocol != target:
            try:
                await self.switch_protocol(target)
            except ConsensusError as exc:
                log.info("protocol switch to %s deferred: %s", target, exc, extra={"component": "acp"})

    async def reinstate(self, peer: str) -> None:
        """Operator: clear a quarantined peer on every replica."""
        await self._command(Reinstate(peer))

    async def join(self, node_id: str, addr: str, public_key: bytes, promote_timeout: float = 10.0) -> bool:
        """Add a member (Raft) with its signing key, pinned from then on. It joins as a non-voting
        learner; the leader makes it a voter once it holds every committed entry. Returns True when
        it became a voter within `promote_timeout` (a member that never catches up stays a learner
        and never counts towards a quorum)."""
        if len(public_key) != 32:
            raise ValueError("public_key must be the joining node's 32-byte Ed25519 key (64 hex digits; "
                             "`dwcp-agent cluster key` on that node)")
        node = self._require()
        await node.change_membership(ConfChange("learner", node_id, addr, public_key))
        deadline = time.monotonic() + promote_timeout
        while time.monotonic() < deadline:
            member = node.replica.registry.state.members.get(node_id)
            if member is not None and member.voter:
                return True
            await asyncio.sleep(0.1)
        return False

    async def leave(self, node_id: str) -> None:
        """Remove a member (Raft), checked against the voters and learners actually in force."""
        raft = self._require().replica.raft
        if raft is None:
            raise ValueError("membership changes need Raft; switch protocol first")
        if node_id not in raft.voters and node_id not in raft.learners:
            raise ValueError(f"{node_id!r} is neither a voter nor a learner (voters: {', '.join(sorted(raft.voters))})")
        if raft.voters == {node_id}:
            raise ValueError(f"{node_id!r} is the last voter; removing it would leave no cluster")
        await self._require().change_membership(ConfChange("remove", node_id))

    def members(self) -> dict[str, str]:
        """Member id -> ACP address (local view)."""
        return self._require().replica.members()
