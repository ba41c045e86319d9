"""Raft as a pure state machine, after etcd's raft package.

Contract (the same one etcd documents):
  * the caller calls `tick()` at a fixed period, `step(msg)` for every message received,
    `propose(data)` / `read_index(ctx)` for client work;
  * it then takes `ready()` and, in this order: persists `hard_state`, `entries` and `snapshot`
    (fsync), sends `messages`, restores `snapshot` into the state machine, applies `committed`
    entries in order, answers `read_states` once the applied index reaches theirs;
  * and calls `advance(ready)`.
Nothing in here touches a socket, a clock, a file or global randomness: ticks, messages, storage
and the random source come in through parameters, so the simulation runs the production code.

Features: pre-vote, check-quorum (leaders step down without a live quorum, followers in a leader
lease ignore disruptive votes), log replication with flow control, snapshots, single-server
membership changes (a configuration takes effect when appended), ReadIndex reads.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import Enum

from dwcp_agent.acp.messages import (
    ENTRY_CONF,
    ENTRY_NOOP,
    ENTRY_NORMAL,
    ConfChange,
    Entry,
    HardState,
    RaftMsg,
    RaftType,
    Snapshot,
)
from dwcp_agent.acp.raft.log import RaftLog

__all__ = ["NotLeader", "ProposalDropped", "Raft", "RaftOptions", "RaftReady", "Role", "decode_conf"]

import msgspec

_CONF_DECODER = msgspec.msgpack.Decoder(ConfChange)


def decode_conf(data: bytes) -> ConfChange:
    """Decode the payload of an ENTRY_CONF entry."""
    return _CONF_DECODER.decode(data)


class Role(Enum):
    """Raft roles; PRE_CANDIDATE runs the pre-vote round before a real election."""

    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


class NotLeader(Exception):
    """Proposal sent to a non-leader; `leader` is the known leader id or ''."""

    def __init__(self, leader: str) -> None:
        super().__init__(f"not the leader (leader: {leader or 'unknown'})")
        self.leader = leader


class ProposalDropped(Exception):
    """The proposal cannot be accepted now (e.g. a membership change is still uncommitted)."""


@dataclass
class RaftOptions:
    """Timing in ticks and the flow-control limits; `unsafe_quorum` is a test hook only."""

    election_ticks: int = 10
    heartbeat_ticks: int = 1
    max_batch: int = 256
    max_inflight: int = 64
    pre_vote: bool = True
    check_quorum: bool = True
    unsafe_quorum: int = 0  # >0: commit and elect with this many acks (deliberately broken variant)


@dataclass
class _Progress:
    match: int = 0
    next: int = 1
    probing: bool = True
    paused: bool = False
    inflight: int = 0
    active: bool = False


@dataclass
class _PendingRead:
    seq: int
    requester: str
    ctx: int
    index: int
    acks: set[str] = field(default_factory=set)


@dataclass
class RaftReady:
    """One batch of work for the caller; see the module docstring for the order."""

    hard_state: HardState | None
    entries: list[Entry]
    snapshot: Snapshot | None
    committed: list[Entry]
    messages: list[RaftMsg]
    read_states: list[tuple[int, int]]
    leader: str
    term: int
    role: Role


class Raft:
    """One Raft peer. Construct it from what the WAL recovered (or nothing, on first start)."""

    def __init__(self, node_id: str, voters: list[str], *, rng: random.Random,
                 options: RaftOptions | None = None, hard_state: HardState | None = None,
                 snapshot: Snapshot | None = None, entries: list[Entry] | None = None) -> None:
        self.id = node_id
        self.opts = options or RaftOptions()
        self.rng = rng
        hs = hard_state or HardState()
        self.term, self.vote = hs.term, hs.vote
        self.log = RaftLog(snapshot, entries, hs.commit)
        self._base_voters = list(self.log.snap.voters) if self.log.snap.voters else list(voters)
        self._base_learners = list(self.log.snap.learners)
        self.voters: set[str] = set()
        self.learners: set[str] = set()  # replicated to, never counted: members that are catching up
        self._conf_index = 0
        self._recompute_conf()
        self.role = Role.FOLLOWER
        self.lead = ""
        self.elapsed = 0
        self.hb_elapsed = 0
        self.timeout = self._random_timeout()
        self.votes: dict[str, bool] = {}
        self.progress: dict[str, _Progress] = {}
        self.msgs: list[RaftMsg] = []
        self.read_states: list[tuple[int, int]] = []
        self._reads: list[_PendingRead] = []
        self._read_seq = 0
        self._dirty = False
        self._prev_hs = hs

    # ------------------------------------------------------------ configuration
    def _recompute_conf(self) -> None:
        voters, learners = set(self._base_voters), set(self._base_learners)
        self._conf_index = 0
        for entry in self.log.entries:
            if entry.kind == ENTRY_CONF:
                _apply_conf(voters, learners, decode_conf(entry.data))
                self._conf_index = entry.index
        self.voters, self.learners = voters, learners

    def conf_at(self, index: int) -> tuple[list[str], list[str]]:
        """Voters and learners in force at `index` (used when taking a snapshot there)."""
        voters, learners = set(self._base_voters), set(self._base_learners)
        for entry in self.log.slice(self.log.first_index(), index + 1):
            if entry.kind == ENTRY_CONF:
                _apply_conf(voters, learners, decode_conf(entry.data))
        return sorted(voters), sorted(learners)

    def voters_at(self, index: int) -> list[str]:
        """Voters in force at `index`."""
        return self.conf_at(index)[0]

    def caught_up(self, peer: str) -> bool:
        """Leader only: `peer` holds every committed entry (a learner may then be promoted)."""
        pr = self.progress.get(peer)
        return self.role is Role.LEADER and pr is not None and pr.match >= self.log.committed

    def quorum(self) -> int:
        """Acks needed to commit or win an election."""
        return self.opts.unsafe_quorum or len(self.voters) // 2 + 1

    # ------------------------------------------------------------ time
    def _random_timeout(self) -> int:
        return self.opts.election_ticks + self.rng.randrange(self.opts.election_ticks)

    def tick(self) -> None:
        """Advance abstract time by one tick."""
        self.elapsed += 1
        if self.role is Role.LEADER:
            self.hb_elapsed += 1
            if self.elapsed >= self.opts.election_ticks:
                self.elapsed = 0
                if self.opts.check_quorum and not self._quorum_active():
                    self._become_follower(self.term, "")
                    return
                for peer, pr in self.progress.items():
                    pr.active = peer == self.id
            if self.hb_elapsed >= self.opts.heartbeat_ticks:
                self.hb_elapsed = 0
                self._bcast_heartbeat()
        elif self.elapsed >= self.timeout:
            self.elapsed = 0
            if self.id in self.voters:
                self._campaign(pre=self.opts.pre_vote)

    def _quorum_active(self) -> bool:
        active = sum(1 for v in self.voters if v == self.id or (v in self.progress and self.progress[v].active))
        return active >= self.quorum()

    # ------------------------------------------------------------ role changes
    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = ""
        self.lead = ""
        self.elapsed = 0
        self.hb_elapsed = 0
        self.timeout = self._random_timeout()
        self.votes = {}
        self._reads = []

    def _become_follower(self, term: int, lead: str) -> None:
        self._reset(term)
        self.role = Role.FOLLOWER
        self.lead = lead

    def _campaign(self, pre: bool) -> None:
        if pre:
            self._reset(self.term)
            self.role = Role.PRE_CANDIDATE
            kind, term = RaftType.PREVOTE, self.term + 1
        else:
            self._reset(self.term + 1)
            self.role = Role.CANDIDATE
            self.vote = self.id
            kind, term = RaftType.VOTE, self.term
        self.votes = {self.id: True}
        if self._tally() >= self.quorum():
            self._won(pre)
            return
        for peer in sorted(self.voters - {self.id}):
            self._send(RaftMsg(kind, self.id, peer, term, index=self.log.last_index(),
                               log_term=self.log.last_term()))

    def _tally(self) -> int:
        return sum(1 for v, granted in self.votes.items() if granted and v in self.voters)

    def _won(self, pre: bool) -> None:
        if pre:
            self._campaign(pre=False)
        else:
            self._become_leader()

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role = Role.LEADER
        self.lead = self.id
        last = self.log.last_index()
        self.progress = {p: _Progress(next=last + 1) for p in self.voters | self.learners}
        self.progress.setdefault(self.id, _Progress(next=last + 1))
        self.progress[self.id].match = self.log.stable
        self.progress[self.id].active = True
        self._append([Entry(self.term, last + 1, ENTRY_NOOP)])

    # ------------------------------------------------------------ proposals and reads
    def propose(self, data: bytes, kind: int = ENTRY_NORMAL) -> int:
        """Append a client command (or ConfChange) at the leader; returns its index."""
        if self.role is not Role.LEADER:
            raise NotLeader(self.lead)
        if kind == ENTRY_CONF and self._conf_index > self.log.committed:
            raise ProposalDropped("a membership change is still in progress")
        index = self.log.last_index() + 1
        self._append([Entry(self.term, index, kind, data)])
        return index

    def _append(self, entries: list[Entry]) -> None:
        self.log.append(entries)
        if any(e.kind == ENTRY_CONF for e in entries):
            self._recompute_conf()
            self._sync_progress()
        self._dirty = True

    def _sync_progress(self) -> None:
        if self.role is not Role.LEADER:
            return
        last = self.log.last_index()
        for peer in self.voters | self.learners:
            self.progress.setdefault(peer, _Progress(next=last + 1, active=True))
        for peer in list(self.progress):
            if peer not in self.voters and peer not in self.learners and peer != self.id:
                del self.progress[peer]

    def read_index(self, ctx: int) -> None:
        """Ask for a linearizable read point; it comes back in `read_states` as (ctx, index)."""
        if self.role is Role.LEADER:
            self._handle_read(self.id, ctx)
        elif self.lead:
            self._send(RaftMsg(RaftType.READ_INDEX, self.id, self.lead, self.term, ctx=ctx))

    def _handle_read(self, requester: str, ctx: int) -> None:
        if self.log.term(self.log.committed) != self.term:
            return  # no entry committed in this term yet; the requester retries
        if self.quorum() <= 1 and self.id in self.voters:
            self._deliver_read(requester, ctx, self.log.committed)
            return
        self._read_seq += 1
        self._reads.append(_PendingRead(self._read_seq, requester, ctx, self.log.committed, {self.id}))
        self._bcast_heartbeat()

    def _deliver_read(self, requester: str, ctx: int, index: int) -> None:
        if requester == self.id:
            self.read_states.append((ctx, index))
        else:
            self._send(RaftMsg(RaftType.READ_INDEX_RESP, self.id, requester, self.term, ctx=ctx, index=index))

    # ------------------------------------------------------------ messages
    def _send(self, msg: RaftMsg) -> None:
        self.msgs.append(msg)

    def step(self, m: RaftMsg) -> None:
        """Handle one message: common term checks first, then the role's step function."""
        if m.term > self.term:
            if m.kind in (RaftType.VOTE, RaftType.PREVOTE):
                in_lease = self.opts.check_quorum and self.lead != "" and self.elapsed < self.opts.election_ticks
                if in_lease:
                    return
            if m.kind == RaftType.PREVOTE or (m.kind == RaftType.PREVOTE_RESP and not m.reject):
                pass  # pre-votes never change our term
            else:
                lead = m.frm if m.kind in (RaftType.APP, RaftType.HEARTBEAT, RaftType.SNAP) else ""
                self._become_follower(m.term, lead)
        elif m.term < self.term:
            if m.kind in (RaftType.APP, RaftType.HEARTBEAT):
                self._send(RaftMsg(RaftType.APP_RESP, self.id, m.frm, self.term))
            elif m.kind == RaftType.PREVOTE:
                self._send(RaftMsg(RaftType.PREVOTE_RESP, self.id, m.frm, self.term, reject=True))
            return
        if m.kind in (RaftType.VOTE, RaftType.PREVOTE):
            self._step_vote(m)
        elif self.role is Role.LEADER:
            self._step_leader(m)
        elif self.role is Role.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    def _step_vote(self, m: RaftMsg) -> None:
        pre = m.kind == RaftType.PREVOTE
        can_vote = self.vote == m.frm or (self.vote == "" and self.lead == "") or (pre and m.term > self.term)
        resp = RaftType.PREVOTE_RESP if pre else RaftType.VOTE_RESP
        if can_vote and self.log.up_to_date(m.index, m.log_term):
            self._send(RaftMsg(resp, self.id, m.frm, m.term))
            if not pre:
                self.elapsed = 0
                self.vote = m.frm
        else:
            self._send(RaftMsg(resp, self.id, m.frm, self.term, reject=True))

    def _step_follower(self, m: RaftMsg) -> None:
        if m.kind in (RaftType.APP, RaftType.HEARTBEAT, RaftType.SNAP):
            self.elapsed = 0
            self.lead = m.frm
            if m.kind == RaftType.APP:
                self._handle_append(m)
            elif m.kind == RaftType.HEARTBEAT:
                self.log.commit_to(min(m.commit, self.log.last_index()))
                self._send(RaftMsg(RaftType.HEARTBEAT_RESP, self.id, m.frm, self.term, ctx=m.ctx))
            else:
                self._handle_snapshot(m)
        elif m.kind == RaftType.READ_INDEX and self.lead:
            self._send(RaftMsg(RaftType.READ_INDEX, self.id, self.lead, self.term, ctx=m.ctx))
        elif m.kind == RaftType.READ_INDEX_RESP:
            self.read_states.append((m.ctx, m.index))

    def _step_candidate(self, m: RaftMsg) -> None:
        if m.kind in (RaftType.APP, RaftType.HEARTBEAT, RaftType.SNAP):
            self._become_follower(self.term, m.frm)
            self._step_follower(m)
            return
        want = RaftType.PREVOTE_RESP if self.role is Role.PRE_CANDIDATE else RaftType.VOTE_RESP
        if m.kind != want:
            return
        self.votes[m.frm] = not m.reject
        if self._tally() >= self.quorum():
            self._won(self.role is Role.PRE_CANDIDATE)
            return
        rejected = sum(1 for v, g in self.votes.items() if not g and v in self.voters)
        if rejected >= len(self.voters) - self.quorum() + 1:
            self._become_follower(self.term, "")

    def _step_leader(self, m: RaftMsg) -> None:
        pr = self.progress.get(m.frm)
        if m.kind == RaftType.READ_INDEX:
            self._handle_read(m.frm, m.ctx)
            return
        if pr is None:
            return
        pr.active = True
        if m.kind == RaftType.APP_RESP:
            if m.reject:
                if m.index <= pr.match:
                    return  # stale rejection
                pr.next = max(pr.match + 1, min(m.index, m.hint + 1))
                pr.probing, pr.paused, pr.inflight = True, False, 0
                self._send_append(m.frm)
                return
            pr.paused = False
            pr.inflight = max(0, pr.inflight - 1)
            if m.index > pr.match:
                pr.match = m.index
                pr.next = max(pr.next, m.index + 1)
                pr.probing = False
                if self._maybe_commit():
                    self._bcast_append(carry_commit=True)
                    return
            if pr.next <= self.log.last_index():
                self._send_append(m.frm)
        elif m.kind == RaftType.HEARTBEAT_RESP:
            pr.paused = False
            pr.inflight = 0  # lost appends free their slots at least once per heartbeat
            if pr.match < self.log.last_index():
                self._send_append(m.frm, allow_empty=True)
            self._ack_reads(m.frm, m.ctx)

    def _ack_reads(self, peer: str, ctx: int) -> None:
        for read in self._reads:
            if read.seq <= ctx:
                read.acks.add(peer)
        while self._reads and sum(1 for a in self._reads[0].acks if a in self.voters) >= self.quorum():
            read = self._reads.pop(0)
            self._deliver_read(read.requester, read.ctx, read.index)

    def _handle_append(self, m: RaftMsg) -> None:
        if m.index < self.log.committed:
            self._send(RaftMsg(RaftType.APP_RESP, self.id, m.frm, self.term, index=self.log.committed))
            return
        if not self.log.matches(m.index, m.log_term):
            hint = min(m.index, self.log.last_index())
            while hint > self.log.committed and (self.log.term(hint) or 0) > m.log_term:
                hint -= 1
            self._send(RaftMsg(RaftType.APP_RESP, self.id, m.frm, self.term, index=m.index, reject=True,
                               hint=hint))
            return
        conflict = self.log.find_conflict(m.entries)
        if conflict:
            fresh = m.entries[conflict - m.entries[0].index:]
            had_conf = self._conf_index >= conflict
            self.log.append(fresh)
            if had_conf or any(e.kind == ENTRY_CONF for e in fresh):
                self._recompute_conf()
        last_new = m.index + len(m.entries)
        self.log.commit_to(min(m.commit, last_new))
        self._send(RaftMsg(RaftType.APP_RESP, self.id, m.frm, self.term, index=last_new))

    def _handle_snapshot(self, m: RaftMsg) -> None:
        snap = m.snapshot
        if snap is None:
            return
        if snap.index <= self.log.committed:
            self._send(RaftMsg(RaftType.APP_RESP, self.id, m.frm, self.term, index=self.log.committed))
            return
        if self.log.matches(snap.index, snap.term):
            self.log.commit_to(snap.index)
        else:
            self.log.restore(snap)
            self._base_voters, self._base_learners = list(snap.voters), list(snap.learners)
            self._recompute_conf()
        self._send(RaftMsg(RaftType.APP_RESP, self.id, m.frm, self.term, index=snap.index))

    # ------------------------------------------------------------ replication
    def _send_append(self, to: str, allow_empty: bool = False) -> None:
        pr = self.progress[to]
        if to == self.id or pr.paused or (not pr.probing and pr.inflight >= self.opts.max_inflight):
            return
        prev = pr.next - 1
        prev_term = self.log.term(prev)
        if prev_term is None:
            self._send(RaftMsg(RaftType.SNAP, self.id, to, self.term, snapshot=self.log.snap))
            pr.probing, pr.paused = True, True
            return
        last = self.log.last_index()
        entries = self.log.slice(pr.next, min(last + 1, pr.next + self.opts.max_batch))
        if not entries and not pr.probing and not allow_empty:
            return
        self._send(RaftMsg(RaftType.APP, self.id, to, self.term, index=prev, log_term=prev_term,
                           entries=entries, commit=self.log.committed))
        if pr.probing:
            pr.paused = True
        elif entries:
            pr.next = entries[-1].index + 1
            pr.inflight += 1

    def _bcast_append(self, carry_commit: bool = False) -> None:
        for peer in sorted(self.progress):
            if peer != self.id:
                self._send_append(peer, allow_empty=carry_commit)

    def _bcast_heartbeat(self) -> None:
        for peer in sorted(self.progress):
            if peer != self.id:
                pr = self.progress[peer]
                commit = min(pr.match, self.log.committed)
                self._send(RaftMsg(RaftType.HEARTBEAT, self.id, peer, self.term, commit=commit,
                                   ctx=self._read_seq))

    def _maybe_commit(self) -> bool:
        matches = sorted((self.progress[v].match if v in self.progress else 0 for v in self.voters), reverse=True)
        q = self.quorum()
        if not matches or q > len(matches):
            return False
        n = matches[q - 1]
        if n > self.log.committed and self.log.term(n) == self.term:
            self.log.commit_to(n)
            if self.id not in self.voters and self._conf_index <= n:
                self._become_follower(self.term, "")  # committed our own removal: step down
            return True
        return False

    # ------------------------------------------------------------ ready / advance
    def has_ready(self) -> bool:
        """True when `ready()` would carry work."""
        return bool(self.msgs or self.read_states or self._dirty or self.log.snap_pending
                    or self.log.stable < self.log.last_index() or self.log.applied < self.log.committed
                    or self._hard_state() != self._prev_hs)

    def _hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.committed)

    def ready(self) -> RaftReady:
        """Collect what the caller must persist, send and apply (see module docstring)."""
        if self._dirty:
            self._dirty = False
            if self.role is Role.LEADER:
                self._bcast_append()
        hs = self._hard_state()
        rd = RaftReady(
            hard_state=hs if hs != self._prev_hs else None,
            entries=self.log.unstable(),
            snapshot=self.log.snap if self.log.snap_pending else None,
            committed=self.log.next_committed(),
            messages=self.msgs,
            read_states=self.read_states,
            leader=self.lead, term=self.term, role=self.role,
        )
        self.msgs, self.read_states = [], []
        return rd

    def advance(self, rd: RaftReady) -> None:
        """The caller finished the Ready: mark persisted and applied."""
        if rd.hard_state is not None:
            self._prev_hs = rd.hard_state
        if rd.snapshot is not None:
            self.log.snap_pending = False
        if rd.entries:
            last = rd.entries[-1]
            self.log.stable_to(last.index, last.term)
            if self.role is Role.LEADER and self.id in self.progress:
                self.progress[self.id].match = self.log.stable
                if self._maybe_commit():
                    self._bcast_append(carry_commit=True)
        if rd.committed:
            self.log.applied = max(self.log.applied, rd.committed[-1].index)

    def compact(self, index: int, data: bytes) -> Snapshot:
        """Snapshot the state machine at `index` (<= applied) and drop the entries it covers."""
        term = self.log.term(index)
        if term is None:
            raise ValueError(f"cannot snapshot at {index}")
        voters, learners = self.conf_at(index)
        snap = Snapshot(index, term, voters, data, learners)
        self.log.compact(snap)
        self._base_voters, self._base_learners = list(snap.voters), list(snap.learners)
        return snap

    def status(self) -> dict[str, object]:
        """Small JSON-able summary for health and the cluster API."""
        return {"id": self.id, "role": self.role.value, "term": self.term, "leader": self.lead,
                "commit": self.log.committed, "applied": self.log.applied, "last_index": self.log.last_index(),
                "voters": sorted(self.voters), "learners": sorted(self.learners)}


def _apply_conf(voters: set[str], learners: set[str], cc: ConfChange) -> None:
    """'learner' adds a non-voting member, 'add' makes a member (or learner) a voter, 'remove' drops it."""
    if cc.op == "learner":
        if cc.node_id not in voters:
            learners.add(cc.node_id)
    elif cc.op == "add":
        voters.add(cc.node_id)
        learners.discard(cc.node_id)
    elif cc.op == "remove":
        voters.discard(cc.node_id)
        learners.discard(cc.node_id)
