"""Seeded deterministic simulation of an ACP cluster, with invariant and linearizability checks.

One seed fixes everything: message delays, drops, duplicates, reordering, partitions, crashes and
restarts from the (simulated) WAL, Byzantine behaviour, and the client workload. The production
`Replica` runs unchanged; the network, the disks and the clock are this module. A schedule that
breaks an invariant reports its seed, and `run_schedule(SimConfig(seed=...))` replays it exactly.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import Any

from dwcp_agent.acp.adaptive import Replica, ReplicaOptions, ReplicaReady, bootstrap
from dwcp_agent.acp.auth import KeyRing
from dwcp_agent.acp.messages import Envelope, RaftMsg
from dwcp_agent.acp.pbft.byzantine_faults import FaultyReplica
from dwcp_agent.acp.pbft.pbft import PbftOptions
from dwcp_agent.acp.raft.raft import NotLeader, ProposalDropped, RaftOptions, Role
from dwcp_agent.acp.registry import (
    AcquireLease,
    ClaimVm,
    Command,
    Op,
    ReadOwner,
    Registry,
    ReleaseLease,
    Result,
    SwitchProtocol,
    TransferOwnership,
    encode_command,
)
from dwcp_agent.acp.storage import MemoryStorage, PersistOps
from dwcp_agent.acp.testing.linearizability import UNKNOWN, CheckResult, Model, Operation, check_per_key

__all__ = ["BEHAVIOURS", "SimConfig", "SimReport", "registry_model", "run_schedule"]

BEHAVIOURS = ("equivocate", "silent", "garbage", "replay", "forge", "wrong_result")
MS_PER_TICK = 10


@dataclass
class SimConfig:
    """One schedule. Rates are per tick; delays are in steps (`steps_per_tick` steps = one tick)."""

    protocol: str = "raft"
    nodes: int = 3
    seed: int = 0
    ticks: int = 200
    quiet_ticks: int = 120
    steps_per_tick: int = 4
    max_delay: int = 6
    drop: float = 0.03
    duplicate: float = 0.02
    partition_rate: float = 0.01
    crash_rate: float = 0.01
    byzantine: dict[str, str] = field(default_factory=dict)
    clients: int = 3
    keys: int = 2
    op_rate: float = 0.15
    op_timeout: int = 40
    switch_at: int = -1
    snapshot_every: int = 16
    unsafe_quorum: int = 0
    real_signatures: bool = False
    outage: dict[str, int] = field(default_factory=dict)  # node -> tick it goes down, until the heal
    late: dict[str, int] = field(default_factory=dict)  # node -> tick it first starts
    restarts: list[tuple[str, int, int]] = field(default_factory=list)  # (node, down tick, up tick)
    fast_clock: dict[str, int] = field(default_factory=dict)  # node -> ticks it counts per real tick


@dataclass
class SimReport:
    """What a schedule produced: violations (empty when all checks held) and counters."""

    seed: int
    violations: list[str] = field(default_factory=list)
    completed: int = 0
    unknown: int = 0
    leader_changes: int = 0
    view_changes: int = 0
    switches: int = 0
    detections: dict[str, int] = field(default_factory=dict)
    history: list[Operation] = field(default_factory=list)
    pbft_low: dict[str, int] = field(default_factory=dict)       # per live node at the end: stable checkpoint
    pbft_executed: dict[str, int] = field(default_factory=dict)  # and the last sequence it executed
    pbft_view: dict[str, tuple[int, bool]] = field(default_factory=dict)  # and its (view, active)


def registry_model() -> Model[bytes]:
    """Sequential spec for one key: the registry itself, applied to that key's commands only."""
    def step(state: bytes, op_input: tuple[Op, int]) -> tuple[Any, bytes]:
        reg = Registry.restore(state)
        op, now = op_input
        result = reg.apply(Command("", 0, op, now))
        reg.state.applied = 0
        return result, reg.snapshot()
    return Model(init=lambda: Registry().snapshot(), step=step)


@dataclass
class _Client:
    cid: str
    home: str
    seq: int = 0
    busy: bool = False
    started: int = 0
    key: str = ""
    op: Op | None = None
    now_ms: int = 0
    target: str = ""
    read_ctx: int = 0
    call_step: int = 0


class _Sim:
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.ids = [f"n{i}" for i in range(1, cfg.nodes + 1)]
        self.keys = KeyRing.simulated(self.ids, random.Random(cfg.seed ^ 0x5EED), fast=not cfg.real_signatures)
        self.members = {i: f"127.0.0.1:{9000 + k}" for k, i in enumerate(self.ids)}
        self.storage = {i: MemoryStorage() for i in self.ids}
        self.replicas: dict[str, Replica | None] = {}
        self.incarnation = dict.fromkeys(self.ids, 0)
        self.down_until: dict[str, int] = {}
        self.groups: dict[str, int] = dict.fromkeys(self.ids, 0)
        self.partition_until = -1
        self.queue: list[tuple[int, int, Envelope]] = []
        self.counter = 0
        self.step_no = 0
        self.tick_no = 0
        self.report = SimReport(cfg.seed)
        self.positions: dict[int, bytes] = {}
        self.leaders: dict[tuple[int, int], str] = {}
        self.committed_terms: dict[tuple[int, int], int] = {}
        self.results: dict[tuple[str, int], tuple[int, Result]] = {}
        self.faulty = set(cfg.byzantine)
        self.faulty_out = {node: FaultyReplica(node, behaviour, self.keys[node], self.ids,
                                               random.Random(f"{cfg.seed}/byzantine/{node}"))
                           for node, behaviour in cfg.byzantine.items()}
        self.honest = [i for i in self.ids if i not in self.faulty]
        self.clients = [_Client(f"{self.honest[k % len(self.honest)]}/0/c{k}", self.honest[k % len(self.honest)])
                        for k in range(cfg.clients)]
        self.read_ctx = 0
        start = bootstrap(cfg.protocol, self.members)
        for i in self.ids:
            self.storage[i].save(PersistOps(epoch_start=start))
            if i in cfg.late:
                self.down_until[i] = cfg.late[i]
            else:
                self._boot(i)

    # ------------------------------------------------------------ nodes
    def _options(self) -> ReplicaOptions:
        c = self.cfg
        return ReplicaOptions(
            raft=RaftOptions(election_ticks=10, heartbeat_ticks=2, max_batch=16, max_inflight=8,
                             unsafe_quorum=c.unsafe_quorum),
            pbft=PbftOptions(checkpoint_interval=8, window=32, max_batch=8, max_inflight=4, request_timeout=30,
                             view_change_timeout=30, unsafe_quorum=c.unsafe_quorum),
            snapshot_every=c.snapshot_every,
        )

    def _boot(self, node: str) -> None:
        rec = self.storage[node].load()
        assert rec is not None
        self.incarnation[node] += 1
        self.replicas[node] = Replica(node, rec, keys=self.keys[node],
                                      rng=random.Random(f"{self.cfg.seed}/{node}/{self.incarnation[node]}"),
                                      options=self._options(), incarnation=self.incarnation[node])

    def _crash(self, node: str) -> None:
        self._check_logs()
        self.replicas[node] = None
        self.down_until[node] = self.tick_no + self.rng.randint(5, 40)

    # ------------------------------------------------------------ network
    def _send(self, env: Envelope) -> None:
        c = self.cfg
        for out in self._byzantine_out(env):
            drop = c.drop if self.tick_no < c.ticks else 0.0  # the network heals for the quiet phase
            if self.groups[out.frm] != self.groups[out.to] or self.rng.random() < drop:
                continue
            # Raft tolerates duplicated datagrams; PBFT links are TCP-like (an exact repeat is a replay).
            copies = 2 if isinstance(out.body, RaftMsg) and self.rng.random() < c.duplicate else 1
            for _ in range(copies):
                self.counter += 1
                heapq.heappush(self.queue, (self.step_no + self.rng.randint(1, c.max_delay), self.counter, out))

    def _byzantine_out(self, env: Envelope) -> list[Envelope]:
        faulty = self.faulty_out.get(env.frm)
        return [env] if faulty is None else faulty.out(env)

    def _deliver(self, env: Envelope) -> None:
        replica = self.replicas.get(env.to)
        if replica is None:
            return
        try:
            replica.receive(env)
        except Exception as exc:  # an engine must never crash on input; count it as a violation
            self._violation(f"{env.to} raised on receive: {exc!r}")
            return
        self._drain(env.to)

    # ------------------------------------------------------------ readies and invariants
    def _violation(self, text: str) -> None:
        if len(self.report.violations) < 20:
            self.report.violations.append(f"tick {self.tick_no}: {text}")

    def _drain(self, node: str) -> None:
        replica = self.replicas[node]
        guard = 0
        while replica is not None and replica.has_ready() and guard < 50:
            guard += 1
            was_leader = replica.raft is not None and replica.raft.role is Role.LEADER
            try:
                rd = replica.ready()
            except Exception as exc:
                self._violation(f"{node} raised in ready: {exc!r}")
                self.replicas[node] = None
                self.down_until[node] = 1 << 30
                return
            if not rd.persist.empty():
                self.storage[node].save(rd.persist)
            self._observe(node, replica, rd, was_leader)
            for env in rd.messages:
                self._send(env)
            replica = self.replicas[node]

    def _observe(self, node: str, replica: Replica, rd: ReplicaReady, was_leader: bool) -> None:
        honest = node not in self.faulty
        if rd.leader_changed:
            self.report.leader_changes += 1
        self.report.view_changes += rd.view_changes
        if rd.switched:
            self.report.switches += 1
        for det in rd.detections:
            self.report.detections[det.reason] = self.report.detections.get(det.reason, 0) + 1
            if det.peer not in self.faulty and honest:
                self._violation(f"{node} accused honest {det.peer} of {det.reason}")
        for pos, cmd, _result in rd.applied:
            if not honest:
                continue
            data = encode_command(cmd)
            prev = self.positions.setdefault(pos, data)
            if prev != data:
                self._violation(f"state machine safety: {node} applied a different command at position {pos}")
        for client, seq, result in rd.confirmed:  # what a client may accept (f+1 alike under PBFT)
            if honest and seq and (client, seq) not in self.results:
                self.results[(client, seq)] = (self.step_no, result)
        raft = replica.raft
        if raft is not None and honest:
            if raft.role is Role.LEADER:
                holder = self.leaders.setdefault((replica.epoch, raft.term), node)
                if holder != node:
                    self._violation(f"election safety: {holder} and {node} lead term {raft.term}")
                if not was_leader:
                    self._check_leader_completeness(node, replica)
            for index in range(max(raft.log.first_index(), raft.log.applied - 64), raft.log.applied + 1):
                term = raft.log.term(index)
                if term is not None and index > 0:
                    known = self.committed_terms.setdefault((replica.epoch, index), term)
                    if known != term:
                        self._violation(f"committed entry {index} has term {known} and {term}")
        for ctx in rd.reads:
            self._finish_read(node, replica, ctx)

    def _check_leader_completeness(self, node: str, replica: Replica) -> None:
        raft = replica.raft
        assert raft is not None
        for (epoch, index), term in self.committed_terms.items():
            if epoch != replica.epoch or index <= raft.log.snap.index:
                continue
            if raft.log.term(index) != term:
                self._violation(f"leader completeness: {node} leads term {raft.term} without committed {index}")
                return

    def _check_logs(self) -> None:
        rafts = [(i, r.raft, r.epoch) for i, r in self.replicas.items() if r is not None and r.raft is not None
                 and i not in self.faulty]
        for a in range(len(rafts)):
            for b in range(a + 1, len(rafts)):
                (na, ra, ea), (nb, rb, eb) = rafts[a], rafts[b]
                if ea != eb:
                    continue
                lo = max(ra.log.first_index(), rb.log.first_index())
                hi = min(ra.log.last_index(), rb.log.last_index())
                match_at = 0
                for i in range(hi, lo - 1, -1):
                    if ra.log.term(i) == rb.log.term(i):
                        match_at = i
                        break
                if match_at and ra.log.slice(lo, match_at + 1) != rb.log.slice(lo, match_at + 1):
                    self._violation(f"log matching: {na} and {nb} agree on term at {match_at} but differ before")

    # ------------------------------------------------------------ clients
    def _client_tick(self, final: bool) -> None:
        for client in self.clients:
            if client.busy:
                key = (client.cid, client.seq)
                # (Under PBFT a read is an ordered command too, and completes like one.)
                if key in self.results and client.op is not None:
                    self._finish(client, self.results[key][1])
                elif self.tick_no - client.started > self.cfg.op_timeout:
                    self._give_up(client)
                elif self.tick_no % 3 == 0:
                    self._issue(client)
            elif self.rng.random() < self.cfg.op_rate:
                self._start(client)

    def _start(self, client: _Client) -> None:
        rng = self.rng
        key = f"vm{rng.randrange(self.cfg.keys)}"
        host = rng.choice(self.ids)
        kind = rng.random()
        op: Op
        if kind < 0.2:
            op = ClaimVm(key, host)
        elif kind < 0.45:
            op = ReadOwner(key)
        elif kind < 0.7:
            op = AcquireLease(key, host, rng.choice((50, 200, 1000)))
        elif kind < 0.9:
            op = TransferOwnership(key, host, rng.choice(self.ids), rng.randint(1, 3))
        else:
            op = ReleaseLease(key, host, rng.randint(1, 3))
        client.seq += 1
        client.busy, client.started, client.key, client.op = True, self.tick_no, key, op
        client.now_ms, client.call_step = self.tick_no * MS_PER_TICK, self.step_no
        client.target = client.home if self.cfg.protocol == "pbft" else rng.choice(self.ids)
        client.read_ctx = 0
        self._issue(client)

    def _issue(self, client: _Client) -> None:
        replica = self.replicas.get(client.target if self._protocol_of(client.target) == "raft" else client.home)
        if replica is None or client.op is None:
            client.target = self.rng.choice(self.ids)
            return
        if isinstance(client.op, ReadOwner) and replica.raft is not None:
            self.read_ctx += 1
            client.read_ctx = self.read_ctx
            replica.read_index(self.read_ctx)
        else:
            cmd = Command(client.cid, client.seq, client.op, client.now_ms, client.seq - 1)
            try:
                replica.submit(cmd)
            except NotLeader as exc:
                client.target = exc.leader or self.rng.choice(self.ids)
                return
            except ProposalDropped:
                return
        self._drain(replica.id)

    def _protocol_of(self, node: str) -> str:
        replica = self.replicas.get(node)
        return replica.protocol if replica is not None else self.cfg.protocol

    def _finish_read(self, node: str, replica: Replica, ctx: int) -> None:
        for client in self.clients:
            if client.busy and client.read_ctx == ctx and isinstance(client.op, ReadOwner):
                self._finish(client, Result(True, replica.registry.owner(client.op.vm_id)))

    def _finish(self, client: _Client, result: Result) -> None:
        assert client.op is not None
        self.report.history.append(Operation(client.key, (client.op, client.now_ms), result, client.call_step,
                                             self.step_no))
        self.report.completed += 1
        client.busy = False

    def _give_up(self, client: _Client) -> None:
        assert client.op is not None
        if not isinstance(client.op, ReadOwner):
            self.report.history.append(Operation(client.key, (client.op, client.now_ms), UNKNOWN, client.call_step))
            self.report.unknown += 1
        client.busy = False

    # ------------------------------------------------------------ faults
    def _faults(self) -> None:
        c, rng = self.cfg, self.rng
        for node, tick in c.outage.items():
            if tick == self.tick_no:
                self.replicas[node] = None
                self.down_until[node] = c.ticks  # booted again by the heal
        for node, down, up in c.restarts:
            if down == self.tick_no and self.replicas.get(node) is not None:
                self._crash(node)
                self.down_until[node] = up
        if self.partition_until == self.tick_no:
            self.groups = dict.fromkeys(self.ids, 0)
        elif self.partition_until < self.tick_no and rng.random() < c.partition_rate:
            self.groups = {i: rng.randrange(2) for i in self.ids}
            self.partition_until = self.tick_no + rng.randint(5, 40)
        for node, until in list(self.down_until.items()):
            if until <= self.tick_no:
                del self.down_until[node]
                self._boot(node)
        if rng.random() < c.crash_rate:
            budget = (c.nodes - 1) // 2 if c.protocol == "raft" else (c.nodes - 1) // 3 - len(self.faulty)
            live = [i for i in self.honest if self.replicas.get(i) is not None]
            if len(self.down_until) < budget and live:
                self._crash(rng.choice(live))

    def _heal(self) -> None:
        self.groups = dict.fromkeys(self.ids, 0)
        self.partition_until = -1
        for node in list(self.down_until):
            if self.down_until[node] < 1 << 30:
                del self.down_until[node]
                self._boot(node)

    # ------------------------------------------------------------ main loop
    def run(self) -> SimReport:
        c = self.cfg
        switch_client = _Client(f"{self.honest[0]}/0/switch", self.honest[0])
        for tick in range(c.ticks + c.quiet_ticks):
            self.tick_no = tick
            final = tick >= c.ticks
            if tick == c.ticks:
                self._heal()
            elif not final:
                self._faults()
            if tick == c.switch_at:
                target = "pbft" if c.protocol == "raft" else "raft"
                switch_client.seq = 1
                switch_client.op = SwitchProtocol(target, forced=True)
                switch_client.busy, switch_client.started = True, tick
                switch_client.target = switch_client.home
            if switch_client.busy:
                self._retry_switch(switch_client)
            for node in self.ids:
                replica = self.replicas.get(node)
                if replica is not None:
                    for _ in range(c.fast_clock.get(node, 1)):
                        replica.tick()
                    self._drain(node)
            if not final or tick < c.ticks + c.quiet_ticks // 2:
                self._client_tick(final)
            else:
                for client in self.clients:
                    if client.busy:
                        self._client_tick(final)
                        break
            for _ in range(c.steps_per_tick):
                self.step_no += 1
                while self.queue and self.queue[0][0] <= self.step_no:
                    _, _, env = heapq.heappop(self.queue)
                    self._deliver(env)
        for client in self.clients:
            if client.busy:
                self._give_up(client)
        self._final_checks()
        return self.report

    def _retry_switch(self, client: _Client) -> None:
        if (client.cid, client.seq) in self.results:
            client.busy = False
            return
        if self.tick_no % 5:
            return
        for node in self.honest:
            replica = self.replicas.get(node)
            if replica is None or client.op is None or (replica.protocol == "pbft" and node != client.home):
                continue  # PBFT requests are signed by the client's own node
            try:
                replica.submit(Command(client.cid, client.seq, client.op, self.tick_no * MS_PER_TICK))
            except (NotLeader, ProposalDropped):
                continue
            self._drain(node)
            if replica.protocol == "pbft":
                return

    def _final_checks(self) -> None:
        self._check_logs()
        for node, replica in self.replicas.items():
            if replica is not None and replica.pbft is not None:
                self.report.pbft_low[node] = replica.pbft.low
                self.report.pbft_executed[node] = replica.pbft.last_exec
                self.report.pbft_view[node] = (replica.pbft.view, replica.pbft.active)
        images: dict[int, bytes] = {}
        for node in self.honest:
            replica = self.replicas.get(node)
            if replica is None:
                continue
            image = replica.registry.snapshot()
            prev = images.setdefault(replica.registry.state.applied, image)
            if prev != image:
                self._violation(f"replicas at position {replica.registry.state.applied} hold different states")
        if self.report.completed == 0:
            self._violation("no client operation completed (liveness)")
        try:
            result: CheckResult = check_per_key(self.report.history, registry_model())
        except RuntimeError as exc:
            self._violation(str(exc))
            return
        if not result.ok:
            self._violation(f"history of {result.key} is not linearizable")


def run_schedule(cfg: SimConfig) -> SimReport:
    """Run one schedule; `report.violations` is empty when every check held."""
    return _Sim(cfg).run()

