"""The replicated state machine ACP protects: VM owners, migration leases, members, rollout, protocol.

Pure and deterministic: every replica that applies the same commands in the same order holds the
same state, byte for byte (`snapshot()` encodes with sorted keys, so the digest compares across
replicas). Time inside commands is the proposer's clock (`now_ms`), never the replica's own.

Client sessions give exactly-once semantics across retries and protocol switches: a command carries
(client, seq, acked); a seq already applied returns the cached result instead of applying twice,
results at or below `acked` are forgotten because the client will not ask again.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

__all__ = [
    "SWITCH_INTERVAL_MS",
    "AcquireLease",
    "AddMember",
    "ClaimVm",
    "Command",
    "Lease",
    "Member",
    "Noop",
    "Op",
    "ReadOwner",
    "Registry",
    "RegistryState",
    "Reinstate",
    "ReleaseLease",
    "RemoveMember",
    "Result",
    "RolloutSetting",
    "SetRollout",
    "SwitchProtocol",
    "TransferOwnership",
    "decode_command",
    "encode_command",
]

SWITCH_INTERVAL_MS = 300_000  # at most one protocol switch per 5 minutes unless forced


class ClaimVm(msgspec.Struct, tag=True, frozen=True):
    """Record `host` as the owner of a VM nobody owns yet."""

    vm_id: str
    host: str


class ReadOwner(msgspec.Struct, tag=True, frozen=True):
    """Ordered read of a VM's owner (used where reads go through the log, as in PBFT)."""

    vm_id: str


class AcquireLease(msgspec.Struct, tag=True, frozen=True):
    """Take (or renew) the migration lease on a VM; a new holder gets a new fencing token."""

    vm_id: str
    holder: str
    ttl_ms: int


class ReleaseLease(msgspec.Struct, tag=True, frozen=True):
    """Give the lease back early; only with the current token."""

    vm_id: str
    holder: str
    token: int


class TransferOwnership(msgspec.Struct, tag=True, frozen=True):
    """End of a migration: owner moves from_host -> to_host if `token` is the live lease's token."""

    vm_id: str
    from_host: str
    to_host: str
    token: int


class AddMember(msgspec.Struct, tag=True, frozen=True):
    """A member joined, as a learner or a voter (mirrors a committed Raft configuration change)."""

    node_id: str
    addr: str
    public_key: bytes = b""
    voter: bool = True


class RemoveMember(msgspec.Struct, tag=True, frozen=True):
    """A member left."""

    node_id: str


class SetRollout(msgspec.Struct, tag=True, frozen=True):
    """Change rollout settings; None leaves a field unchanged."""

    percentage: int | None = None
    frozen: bool | None = None
    enable_v3: bool | None = None


class SwitchProtocol(msgspec.Struct, tag=True, frozen=True):
    """Move the cluster to `target` ("raft" | "pbft") from the point where this commits."""

    target: str
    forced: bool = False


class Reinstate(msgspec.Struct, tag=True, frozen=True):
    """Operator clears a quarantined peer on every replica."""

    peer: str


class Noop(msgspec.Struct, tag=True, frozen=True):
    """Does nothing; used as a barrier and by PBFT's null requests."""


Op = (ClaimVm | ReadOwner | AcquireLease | ReleaseLease | TransferOwnership | AddMember | RemoveMember
      | SetRollout | SwitchProtocol | Reinstate | Noop)


class Command(msgspec.Struct, array_like=True, frozen=True):
    """One client command; (client, seq) identifies it across retries."""

    client: str
    seq: int
    op: Op
    now_ms: int = 0
    acked: int = 0


class Result(msgspec.Struct, frozen=True):
    """Outcome of a command; `value` is JSON-able."""

    ok: bool
    value: Any = None
    error: str = ""


class Lease(msgspec.Struct, frozen=True):
    """A migration lease; `token` grows with every new grant on the same VM (fencing)."""

    vm_id: str
    holder: str
    token: int
    expires_ms: int


class Member(msgspec.Struct, frozen=True):
    """A cluster member, its ACP address, its pinned signing key and whether it votes yet."""

    node_id: str
    addr: str
    public_key: bytes = b""
    voter: bool = True


class RolloutSetting(msgspec.Struct, frozen=True):
    """Share of migrations on v3, the rollback freeze, and the v3 master switch."""

    percentage: int = 100
    frozen: bool = False
    enable_v3: bool = True


class _Session(msgspec.Struct):
    floor: int = 0
    results: dict[str, Result] = {}  # str(seq): msgpack with sorted keys needs str keys


class RegistryState(msgspec.Struct):
    """Everything the registry holds; the snapshot is this struct encoded."""

    owners: dict[str, str] = {}
    leases: dict[str, Lease] = {}
    tokens: dict[str, int] = {}  # vm_id -> last fencing token granted
    members: dict[str, Member] = {}
    rollout: RolloutSetting = RolloutSetting()
    protocol: str = "raft"
    epoch: int = 0
    last_switch_ms: int = -SWITCH_INTERVAL_MS
    quarantined: list[str] = []
    reinstated: list[str] = []
    sessions: dict[str, _Session] = {}
    applied: int = 0


_ENC = msgspec.msgpack.Encoder(order="sorted")
_CMD_DEC = msgspec.msgpack.Decoder(Command)
_STATE_DEC = msgspec.msgpack.Decoder(RegistryState)


def encode_command(cmd: Command) -> bytes:
    """Wire form of a command (what goes into log entries and PBFT requests)."""
    return _ENC.encode(cmd)


def decode_command(data: bytes) -> Command:
    """Parse a command; raises msgspec errors on malformed input."""
    return _CMD_DEC.decode(data)


class Registry:
    """Applies commands; `state` is only changed here."""

    def __init__(self, state: RegistryState | None = None) -> None:
        self.state = state or RegistryState()

    # ------------------------------------------------------------ snapshots
    def snapshot(self) -> bytes:
        """Deterministic encoding of the whole state."""
        return _ENC.encode(self.state)

    @staticmethod
    def digest_of(data: bytes) -> bytes:
        """SHA-256 of a snapshot; replicas compare these at checkpoints."""
        return hashlib.sha256(data).digest()

    def digest(self) -> bytes:
        """Digest of the current state."""
        return self.digest_of(self.snapshot())

    @classmethod
    def restore(cls, data: bytes) -> Registry:
        """Registry from a snapshot."""
        return cls(_STATE_DEC.decode(data) if data else RegistryState())

    # ------------------------------------------------------------ reads (local, after a read barrier)
    def owner(self, vm_id: str) -> str | None:
        """Owner of a VM, or None."""
        return self.state.owners.get(vm_id)

    def lease(self, vm_id: str) -> Lease | None:
        """Current lease record (may be expired)."""
        return self.state.leases.get(vm_id)

    # ------------------------------------------------------------ apply
    def apply(self, cmd: Command) -> Result:
        """Apply one command exactly once per (client, seq)."""
        st = self.state
        st.applied += 1
        if cmd.seq == 0:  # replica-generated (membership mirrored from Raft): no session
            return self._execute(cmd)
        session = st.sessions.get(cmd.client)
        if session is None:
            session = st.sessions[cmd.client] = _Session(0, {})
        if cmd.seq <= session.floor:
            return Result(False, error="duplicate")
        cached = session.results.get(str(cmd.seq))
        if cached is not None:
            return cached
        result = self._execute(cmd)
        if cmd.seq > 0:
            session.results[str(cmd.seq)] = result
        if cmd.acked > session.floor:
            session.floor = cmd.acked
            session.results = {s: r for s, r in session.results.items() if int(s) > cmd.acked}
        return result

    def _execute(self, cmd: Command) -> Result:
        op, st, now = cmd.op, self.state, cmd.now_ms
        if isinstance(op, ClaimVm):
            current = st.owners.get(op.vm_id)
            if current is not None and current != op.host:
                return Result(False, current, "owned")
            st.owners[op.vm_id] = op.host
            return Result(True, op.host)
        if isinstance(op, ReadOwner):
            return Result(True, st.owners.get(op.vm_id))
        if isinstance(op, AcquireLease):
            lease = st.leases.get(op.vm_id)
            if lease is not None and lease.expires_ms > now and lease.holder != op.holder:
                return Result(False, _lease_dict(lease), "leased")
            if lease is not None and lease.expires_ms > now:
                token = lease.token
            else:
                token = st.tokens.get(op.vm_id, 0) + 1
                st.tokens[op.vm_id] = token
            lease = Lease(op.vm_id, op.holder, token, now + op.ttl_ms)
            st.leases[op.vm_id] = lease
            return Result(True, _lease_dict(lease))
        if isinstance(op, ReleaseLease):
            lease = st.leases.get(op.vm_id)
            if lease is None or lease.token != op.token or lease.holder != op.holder:
                return Result(False, None, "stale token")
            del st.leases[op.vm_id]
            return Result(True)
        if isinstance(op, TransferOwnership):
            return self._transfer(op, now)
        if isinstance(op, AddMember):
            known = st.members.get(op.node_id)
            key = known.public_key if known is not None and known.public_key else op.public_key
            st.members[op.node_id] = Member(op.node_id, op.addr, key, op.voter)
            return Result(True)
        if isinstance(op, RemoveMember):
            st.members.pop(op.node_id, None)
            return Result(True)
        if isinstance(op, SetRollout):
            return self._set_rollout(op)
        if isinstance(op, SwitchProtocol):
            return self._switch(op, now)
        if isinstance(op, Reinstate):
            st.quarantined = [p for p in st.quarantined if p != op.peer]
            st.reinstated = sorted({*st.reinstated, op.peer})
            return Result(True)
        return Result(True)

    def _transfer(self, op: TransferOwnership, now: int) -> Result:
        st = self.state
        lease = st.leases.get(op.vm_id)
        if lease is None or lease.token != op.token:
            return Result(False, None, "stale token")
        if lease.expires_ms <= now:
            return Result(False, None, "lease expired")
        current = st.owners.get(op.vm_id)
        if current is not None and current != op.from_host:
            return Result(False, current, "not the owner")
        st.owners[op.vm_id] = op.to_host
        del st.leases[op.vm_id]
        return Result(True, op.to_host)

    def _set_rollout(self, op: SetRollout) -> Result:
        st = self.state
        if op.percentage is not None and not 0 <= op.percentage <= 100:
            return Result(False, None, "percentage out of range")
        old = st.rollout
        st.rollout = RolloutSetting(
            old.percentage if op.percentage is None else op.percentage,
            old.frozen if op.frozen is None else op.frozen,
            old.enable_v3 if op.enable_v3 is None else op.enable_v3,
        )
        return Result(True, msgspec.to_builtins(st.rollout))

    def _switch(self, op: SwitchProtocol, now: int) -> Result:
        st = self.state
        if op.target not in ("raft", "pbft"):
            return Result(False, None, f"unknown protocol {op.target!r}")
        if op.target == st.protocol:
            return Result(True, {"protocol": st.protocol, "epoch": st.epoch, "switched": False})
        if not op.forced and now - st.last_switch_ms < SWITCH_INTERVAL_MS:
            return Result(False, None, "switched less than 5 minutes ago")
        st.protocol, st.epoch, st.last_switch_ms = op.target, st.epoch + 1, now
        return Result(True, {"protocol": st.protocol, "epoch": st.epoch, "switched": True})


def _lease_dict(lease: Lease) -> dict[str, Any]:
    return {"vm_id": lease.vm_id, "holder": lease.holder, "token": lease.token, "expires_ms": lease.expires_ms}
