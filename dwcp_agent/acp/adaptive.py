"""A replica of the registry that runs Raft or PBFT and switches between them by committed command.

`Replica` is pure like the engines it wraps: ticks, envelopes and commands in; a `ReplicaReady`
(what to persist, what to send, which commands were applied with which result) out. The caller
must persist `persist` before sending `messages` or answering anyone from `applied`/`reads`.

Switching: a `SwitchProtocol` command is ordered by the running protocol like any other. The
replica that applies it stops the old engine at that point, ignores everything the old engine
ordered after it, and starts the new engine (epoch + 1) from the registry image taken right
there. Every replica switches at the same position of the same sequence, so nothing committed is
lost and nothing is applied twice; commands that were in flight are retried by their clients and
deduplicated by their (client, seq) session. A replica that missed the switch sees traffic of a
newer epoch and fetches that epoch's starting image (trusting it once f+1 replicas agree on it).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from dataclasses import dataclass, field

import msgspec

from dwcp_agent.acp.auth import KeyConflict, KeyRing
from dwcp_agent.acp.byzantine import ByzantineDetector, Detection
from dwcp_agent.acp.messages import (
    ENTRY_CONF,
    ENTRY_NORMAL,
    ConfChange,
    Envelope,
    EpochFetch,
    EpochState,
    PbftWire,
    Proposal,
    RaftMsg,
    Reply,
    Request,
    Snapshot,
)
from dwcp_agent.acp.pbft.certs import client_node
from dwcp_agent.acp.pbft.pbft import Pbft, PbftOptions
from dwcp_agent.acp.raft.raft import NotLeader, ProposalDropped, Raft, RaftOptions, Role, decode_conf
from dwcp_agent.acp.registry import (
    AddMember,
    Command,
    Member,
    Registry,
    RegistryState,
    Reinstate,
    RemoveMember,
    Result,
    decode_command,
    encode_command,
)
from dwcp_agent.acp.storage import EpochStart, PbftCheckpoint, PersistOps, Recovered

__all__ = ["Replica", "ReplicaOptions", "ReplicaReady", "bootstrap"]

_RESULT_ENC = msgspec.msgpack.Encoder(order="sorted")
_RESULT_DEC = msgspec.msgpack.Decoder(Result)
_MAX_VOTES = 8192


@dataclass
class ReplicaOptions:
    """Engine options and how often Raft compacts its log into a snapshot."""

    raft: RaftOptions = field(default_factory=RaftOptions)
    pbft: PbftOptions = field(default_factory=PbftOptions)
    snapshot_every: int = 1000
    detector_threshold: float = 100.0


@dataclass
class ReplicaReady:
    """One batch for the caller: persist, then send, then answer.

    `applied` holds (position, command, result): position is the registry's count of applied
    commands, the same on every replica for the same command. `confirmed` holds (client, seq,
    result) a local client may be answered with: under Raft what this replica applied, under PBFT
    a result f+1 replicas reported alike (so at least one honest replica vouches for it).
    """

    persist: PersistOps
    messages: list[Envelope]
    applied: list[tuple[int, Command, Result]]
    reads: list[int]
    detections: list[Detection]
    leader: str
    leader_changed: bool
    view_changes: int
    switched: tuple[str, str] | None
    addrs: dict[str, str]
    confirmed: list[tuple[str, int, Result]] = field(default_factory=list)


def bootstrap(protocol: str, members: dict[str, str]) -> EpochStart:
    """Epoch 0 of a new cluster: every member computes the same image from the same member list."""
    state = RegistryState(members={i: Member(i, a) for i, a in members.items()}, protocol=protocol)
    return EpochStart(0, protocol, dict(members), Registry(state).snapshot())


class Replica:
    """Registry + the engine of the current epoch + the Byzantine detector."""

    def __init__(self, node_id: str, recovered: Recovered, *, keys: KeyRing, rng: random.Random,
                 options: ReplicaOptions | None = None, incarnation: int = 0) -> None:
        self.id = node_id
        self.keys = keys
        self.rng = rng
        self.opts = options or ReplicaOptions()
        self.incarnation = incarnation
        self.detector = ByzantineDetector(node_id, threshold=self.opts.detector_threshold)
        self._pending_ops = PersistOps()
        self._epoch_states: dict[int, dict[str, EpochState]] = {}
        self._fetched: dict[int, int] = {}
        self._reads: list[tuple[int, int]] = []
        self._ready_reads: list[int] = []
        self._applied: list[tuple[int, Command, Result]] = []
        self._confirmed: list[tuple[str, int, Result]] = []
        self._votes: dict[tuple[str, int], dict[str, bytes]] = {}
        self._answered: dict[tuple[str, int], bytes] = {}
        self._out: list[Envelope] = []
        self._leader = ""
        self._view_changes = 0
        self._switched: tuple[str, str] | None = None
        self._addrs: dict[str, str] = {}
        self._ticks = 0
        self._load(recovered)

    # ------------------------------------------------------------ epochs
    def _load(self, rec: Recovered) -> None:
        start = rec.epoch
        self.epoch, self.protocol = start.epoch, start.protocol
        self.start = start
        self.raft: Raft | None = None
        self.pbft: Pbft | None = None
        if start.protocol == "raft":
            base = Snapshot(0, 0, sorted(start.members), start.image)
            snap = rec.snapshot if rec.snapshot is not None and rec.snapshot.index > 0 else base
            self.registry = Registry.restore(snap.data)
            self.raft = Raft(self.id, sorted(start.members), rng=self.rng, options=self.opts.raft,
                             hard_state=rec.hard_state, snapshot=snap, entries=rec.entries)
            self._since_snapshot = 0
        else:
            ck = rec.checkpoint
            seq, image, proof, view = (ck.seq, ck.image, ck.proof, ck.view) if ck else (0, start.image, [], 0)
            self.registry = Registry.restore(image)
            self.pbft = Pbft(self.id, sorted(start.members), keys=self.keys, detector=self.detector,
                             options=self.opts.pbft, view=max(view, rec.view), stable=(seq, image),
                             stable_proof=proof, prepared=rec.prepared, incarnation=self.incarnation,
                             spoke=rec.spoke)
            self._pbft_low = seq
            self._pbft_view = view
        self._view_changes = 0
        for member in self.registry.state.members.values():
            self._pin(member.node_id, member.public_key)
        self._apply_quarantine_state()

    def _pin(self, node_id: str, public_key: bytes) -> None:
        """Pin a member's signing key from the registry or a membership change; a pinned key never
        changes (a conflicting one is ignored: the first, admin-committed key stays)."""
        if public_key and node_id != self.id:
            with contextlib.suppress(KeyConflict, ValueError):
                self.keys.add_peer(node_id, public_key)

    def _apply_quarantine_state(self) -> None:
        for peer in self.registry.state.reinstated:
            self.detector.reinstate(peer)

    def _begin_epoch(self, start: EpochStart) -> None:
        old = self.protocol
        self._pending_ops.epoch_start = start
        self._load(Recovered(start))
        self._switched = (old, start.protocol)
        self._reads.clear()

    def members(self) -> dict[str, str]:
        """Member id -> ACP address, as the registry knows them."""
        return {m.node_id: m.addr for m in self.registry.state.members.values()}

    def is_member(self, node_id: str) -> bool:
        """Only current members (of the registry, of this epoch, or appended to the Raft
        configuration) may speak; anything from another name is dropped unread."""
        if node_id in self.registry.state.members or node_id in self.start.members:
            return True
        return self.raft is not None and (node_id in self.raft.voters or node_id in self.raft.learners)

    def _promote_caught_up_learners(self) -> None:
        """Leader: a learner that holds every committed entry becomes a voter (one change at a time)."""
        raft = self.raft
        if raft is None or raft.role is not Role.LEADER:
            return
        for node_id in sorted(raft.learners):
            member = self.registry.state.members.get(node_id)
            if member is not None and raft.caught_up(node_id):
                with contextlib.suppress(NotLeader, ProposalDropped):
                    cc = ConfChange("add", node_id, member.addr, member.public_key)
                    raft.propose(msgspec.msgpack.encode(cc), ENTRY_CONF)
                return

    # ------------------------------------------------------------ input
    def tick(self) -> None:
        """Advance abstract time by one tick."""
        self._ticks += 1
        if self.raft is not None:
            self.raft.tick()
            self.detector.tick()
            self._promote_caught_up_learners()
        elif self.pbft is not None:
            self.pbft.tick()

    def receive(self, env: Envelope) -> None:
        """One envelope from the authenticated link peer `env.frm`."""
        if self.detector.is_quarantined(env.frm) or env.to != self.id or not self.is_member(env.frm):
            return
        body = env.body
        if isinstance(body, EpochFetch):
            if body.epoch == self.epoch:
                self._send(env.frm, EpochState(self.epoch, self.protocol, self.start.image))
            return
        if isinstance(body, EpochState):
            self._on_epoch_state(env.frm, body)
            return
        if isinstance(body, Proposal):
            if env.epoch == self.epoch and self.raft is not None and self.raft.role is Role.LEADER:
                with contextlib.suppress(NotLeader, ProposalDropped):
                    self.raft.propose(body.data, body.kind)
            return
        if env.epoch > self.epoch:
            last = self._fetched.get(env.epoch, -100)
            if self._ticks - last >= 5:
                self._fetched[env.epoch] = self._ticks
                self._send(env.frm, EpochFetch(env.epoch))
            return
        if env.epoch < self.epoch:
            if env.epoch == self.epoch - 1:
                self._send(env.frm, EpochState(self.epoch, self.protocol, self.start.image))
            return
        if isinstance(body, RaftMsg) and self.raft is not None:
            if body.frm != env.frm or body.to != self.id:
                self.detector.report(env.frm, "malformed", "raft message names another sender")
                return
            self.raft.step(body)
        elif isinstance(body, PbftWire) and self.pbft is not None:
            self.pbft.receive(env.frm, body)

    def _on_epoch_state(self, frm: str, m: EpochState) -> None:
        member = self.registry.state.members.get(frm)
        if m.epoch <= self.epoch or not (frm in self.start.members or (member is not None and member.voter)):
            return  # only voters of this epoch vote on the next one's starting image
        votes = self._epoch_states.setdefault(m.epoch, {})
        votes[frm] = m
        digest = hashlib.sha256(m.data).digest()
        agree = sum(1 for v in votes.values() if hashlib.sha256(v.data).digest() == digest)
        need = (len(self.start.members) - 1) // 3 + 1 if self.protocol == "pbft" else 1
        if agree < need:
            return
        try:
            state = msgspec.msgpack.decode(m.data, type=RegistryState)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.detector.report(frm, "malformed", "epoch state")
            return
        members = {i: mb.addr for i, mb in state.members.items() if mb.voter}
        self._epoch_states = {e: v for e, v in self._epoch_states.items() if e > m.epoch}
        self._begin_epoch(EpochStart(m.epoch, m.protocol, members, m.data))

    def submit(self, cmd: Command, forward: bool = False) -> None:
        """Order a client command. Raft: raises NotLeader off the leader, unless `forward` is set and
        a leader is known (the command then travels to it). PBFT: any replica."""
        data = encode_command(cmd)
        if self.raft is not None:
            if forward and self.raft.role is not Role.LEADER and self.raft.lead:
                self._send(self.raft.lead, Proposal(data))
                return
            self.raft.propose(data, ENTRY_NORMAL)
        elif self.pbft is not None:
            self.pbft.submit(Request(cmd.client, cmd.seq, data))

    def change_membership(self, cc: ConfChange) -> None:
        """Single-server membership change (Raft only; PBFT membership is fixed per epoch)."""
        if self.raft is None:
            raise ValueError("membership changes need Raft; switch protocol first")
        data = msgspec.msgpack.encode(cc)
        if self.raft.role is not Role.LEADER and self.raft.lead:
            self._send(self.raft.lead, Proposal(data, ENTRY_CONF))
        else:
            self.raft.propose(data, ENTRY_CONF)
        if cc.op in ("add", "learner"):
            self._addrs[cc.node_id] = cc.addr
            self._pin(cc.node_id, cc.public_key)

    def read_index(self, ctx: int) -> bool:
        """Start a linearizable read (Raft ReadIndex). False under PBFT: order a read command instead."""
        if self.raft is None:
            return False
        self.raft.read_index(ctx)
        return True

    # ------------------------------------------------------------ output
    def _send(self, to: str, body: RaftMsg | PbftWire | EpochFetch | EpochState | Proposal) -> None:
        self._out.append(Envelope(self.epoch, self.id, to, body))

    def _apply(self, cmd: Command) -> bool:
        """Apply one command; True when it switched the epoch (the rest of the batch is void)."""
        result = self.registry.apply(cmd)
        self._applied.append((self.registry.state.applied, cmd, result))
        if isinstance(cmd.op, Reinstate) and result.ok:
            self.detector.reinstate(cmd.op.peer)
        if self.registry.state.epoch != self.epoch:
            st = self.registry.state
            members = {i: m.addr for i, m in st.members.items() if m.voter}
            self._begin_epoch(EpochStart(st.epoch, st.protocol, members, self.registry.snapshot()))
            return True
        return False

    def _ready_raft(self, raft: Raft) -> None:
        rd = raft.ready()
        ops = self._pending_ops
        ops.hard_state = rd.hard_state
        ops.entries = rd.entries
        if rd.snapshot is not None:
            ops.snapshot, ops.snapshot_replaces_log = rd.snapshot, True
            self.registry = Registry.restore(rd.snapshot.data)
        for entry in rd.entries:
            if entry.kind == ENTRY_CONF:
                cc = decode_conf(entry.data)
                if cc.op in ("add", "learner"):
                    self._addrs[cc.node_id] = cc.addr
                    self._pin(cc.node_id, cc.public_key)
        self._out.extend(Envelope(self.epoch, self.id, m.to, m) for m in rd.messages)
        if rd.leader != self._leader:
            self._leader = rd.leader
        switched = False
        for entry in rd.committed:
            if entry.kind == ENTRY_NORMAL:
                try:
                    cmd = decode_command(entry.data)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                switched = self._apply(cmd)
                self._confirmed.append((cmd.client, cmd.seq, self._applied[-1][2]))
            elif entry.kind == ENTRY_CONF:
                cc = decode_conf(entry.data)
                op = (AddMember(cc.node_id, cc.addr, cc.public_key, voter=cc.op == "add")
                      if cc.op in ("add", "learner") else RemoveMember(cc.node_id))
                switched = self._apply(Command("", 0, op))
            if switched:
                return
            self._since_snapshot += 1
        raft.advance(rd)
        self._reads.extend(rd.read_states)
        if rd.role is not Role.LEADER and not rd.leader:
            self._reads = [r for r in self._reads if r[1] <= raft.log.applied]
        ready = [ctx for ctx, index in self._reads if index <= raft.log.applied]
        self._reads = [(c, i) for c, i in self._reads if i > raft.log.applied]
        self._ready_reads.extend(ready)
        if self._since_snapshot >= self.opts.snapshot_every:
            self._since_snapshot = 0
            snap = raft.compact(raft.log.applied, self.registry.snapshot())
            if ops.snapshot is None:
                ops.snapshot, ops.snapshot_replaces_log = snap, False

    def _ready_pbft(self, pbft: Pbft) -> None:
        rd = pbft.ready()
        self._out.extend(Envelope(self.epoch, self.id, to, wire) for to, wire in rd.messages)
        if rd.restore is not None:
            self.registry = Registry.restore(rd.restore[1])
        self._leader = rd.primary
        interval = pbft.opts.checkpoint_interval
        for sender, reply in pbft.replies:
            for client, ts, encoded in reply.results:
                if client_node(client) == self.id:
                    self._vote(client, ts, sender, encoded)
        pbft.replies = []
        for seq, batch in rd.committed:
            replies: dict[str, list[tuple[str, int, bytes]]] = {}
            for req in batch:
                try:
                    cmd = decode_command(req.op)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                if cmd.client != req.client or cmd.seq != req.ts:
                    continue
                switched = self._apply(cmd)
                result = self._applied[-1][2]
                if result.error == "duplicate":
                    # A late retry of a request its client already acknowledged: the answer that
                    # counted was the first one, and this one must not be mistaken for a lie.
                    if switched:
                        return
                    continue
                encoded = _RESULT_ENC.encode(result)
                node = client_node(cmd.client)
                if node == self.id:
                    self._vote(cmd.client, cmd.seq, self.id, encoded)
                elif node in pbft.qs.replicas:
                    replies.setdefault(node, []).append((cmd.client, cmd.seq, encoded))
                if switched:
                    return
            for node, results in replies.items():
                pbft.send_reply(node, Reply(seq, results, self.id))
            if seq % interval == 0:
                pbft.record_checkpoint(seq, self.registry.snapshot())
        ops = self._pending_ops
        ops.prepared, pbft.new_prepared = pbft.new_prepared, []
        if pbft.view != self._pbft_view:
            ops.view = self._pbft_view = pbft.view
        if pbft.spoke_dirty:
            ops.spoke, pbft.spoke_dirty = pbft.spoke, False
        if pbft.low != self._pbft_low and pbft.last_exec >= pbft.low:
            self._pbft_low = pbft.low
            ops.checkpoint = PbftCheckpoint(pbft.low, pbft.stable_data, pbft.stable_proof, pbft.view)

    def _vote(self, client: str, seq: int, replica: str, encoded: bytes) -> None:
        """One replica's result for a local client's request; f+1 alike confirm it. A replica whose
        result differs from a confirmed one lied (or is corrupt): that is reported."""
        key = (client, seq)
        agreed = self._answered.get(key)
        if agreed is not None:
            if encoded != agreed:
                self.detector.report(replica, "wrong_result", f"{client} seq {seq}")
            return
        votes = self._votes.setdefault(key, {})
        votes[replica] = encoded
        same = [r for r, e in votes.items() if e == encoded]
        # The broken variant the simulation must catch (unsafe_quorum) also trusts a single reply.
        if self.pbft is None or len(same) < (1 if self.pbft.qs.unsafe_quorum else self.pbft.qs.f + 1):
            if len(self._votes) > _MAX_VOTES:  # votes for requests that never complete: drop the oldest
                del self._votes[next(iter(self._votes))]
            return
        try:
            result = _RESULT_DEC.decode(encoded)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        del self._votes[key]
        self._answered[key] = encoded
        if len(self._answered) > _MAX_VOTES:
            del self._answered[next(iter(self._answered))]
        self._confirmed.append((client, seq, result))
        for other, enc in votes.items():
            if enc != encoded:
                self.detector.report(other, "wrong_result", f"{client} seq {seq}")

    def has_ready(self) -> bool:
        """True when `ready()` would carry work."""
        if (self._out or self._applied or self._confirmed or self._ready_reads or self.detector.events
                or not self._pending_ops.empty()):
            return True
        if self.raft is not None:
            return self.raft.has_ready()
        return self.pbft is not None and (self.pbft.has_ready() or bool(self.pbft.new_prepared)
                                          or self.pbft.view != self._pbft_view or self.pbft.spoke_dirty)

    def ready(self) -> ReplicaReady:
        """Run the engine's Ready through the registry; see the module docstring for the contract."""
        prev_leader = self._leader
        if self.raft is not None:
            self._ready_raft(self.raft)
        elif self.pbft is not None:
            self._ready_pbft(self.pbft)
        view_changes = 0
        if self.pbft is not None:
            view_changes = max(0, self.pbft.view_changes - self._view_changes)
            self._view_changes = self.pbft.view_changes
        rd = ReplicaReady(
            persist=self._pending_ops, messages=self._out, applied=self._applied, reads=self._ready_reads,
            detections=self.detector.drain(), leader=self._leader,
            leader_changed=self._leader != prev_leader and self.raft is not None and self._leader != "",
            view_changes=view_changes, switched=self._switched, addrs=self._addrs, confirmed=self._confirmed,
        )
        self._pending_ops, self._out, self._applied, self._ready_reads = PersistOps(), [], [], []
        self._confirmed = []
        self._switched, self._addrs = None, {}
        return rd

    def status(self) -> dict[str, object]:
        """Protocol, epoch and the engine's own summary."""
        engine = self.raft.status() if self.raft else self.pbft.status() if self.pbft else {}
        return {"protocol": self.protocol, "epoch": self.epoch, "leader": self._leader,
                "members": self.members(), **engine}
