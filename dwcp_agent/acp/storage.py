"""What a replica persists and recovers, and an in-memory storage for the simulation.

A replica hands `PersistOps` to its storage before anything of that Ready leaves the process;
`load()` returns what survived. `MemoryStorage` keeps the same semantics in RAM so a simulated
crash loses exactly what a real crash would: nothing that was saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from dwcp_agent.acp.messages import Checkpoint, Entry, HardState, PreparedProof, Snapshot

__all__ = ["EpochStart", "MemoryStorage", "PbftCheckpoint", "PersistOps", "Recovered", "Storage"]


@dataclass(frozen=True)
class EpochStart:
    """A protocol instance begins: everything before it is replaced by `image` (registry state)."""

    epoch: int
    protocol: str
    members: dict[str, str]
    image: bytes


@dataclass(frozen=True)
class PbftCheckpoint:
    """A stable PBFT checkpoint with its proof, and the view the replica is in."""

    seq: int
    image: bytes
    proof: list[Checkpoint]
    view: int


@dataclass
class PersistOps:
    """Everything one Ready asks to persist, applied in field order."""

    hard_state: HardState | None = None
    entries: list[Entry] = field(default_factory=list)
    snapshot: Snapshot | None = None
    snapshot_replaces_log: bool = False
    checkpoint: PbftCheckpoint | None = None
    prepared: list[PreparedProof] = field(default_factory=list)
    view: int | None = None
    spoke: tuple[int, int] | None = None
    epoch_start: EpochStart | None = None

    def empty(self) -> bool:
        """True when nothing needs to reach the disk."""
        return (self.hard_state is None and not self.entries and self.snapshot is None
                and self.checkpoint is None and not self.prepared and self.view is None
                and self.spoke is None and self.epoch_start is None)


@dataclass
class Recovered:
    """State found at start-up."""

    epoch: EpochStart
    hard_state: HardState = field(default_factory=HardState)
    snapshot: Snapshot | None = None
    entries: list[Entry] = field(default_factory=list)
    checkpoint: PbftCheckpoint | None = None
    prepared: list[PreparedProof] = field(default_factory=list)
    view: int = 0
    spoke: tuple[int, int] | None = None  # PBFT: (view, seq) bound of the normal-case messages sent


class Storage(Protocol):
    """Durable storage of one replica."""

    def save(self, ops: PersistOps) -> None:
        """Persist `ops` durably (fsync) before returning."""

    def load(self) -> Recovered | None:
        """What was saved, or None on first start."""


def merge(rec: Recovered, ops: PersistOps) -> None:
    """Apply `ops` to a recovered image in place (shared by the memory and file storages)."""
    if ops.hard_state is not None:
        rec.hard_state = ops.hard_state
    if ops.entries:
        first = ops.entries[0].index
        rec.entries = [e for e in rec.entries if e.index < first] + list(ops.entries)
    if ops.snapshot is not None:
        rec.snapshot = ops.snapshot
        if ops.snapshot_replaces_log:
            rec.entries = []
        else:
            rec.entries = [e for e in rec.entries if e.index > ops.snapshot.index]
    if ops.prepared:
        rec.prepared = rec.prepared + list(ops.prepared)
    if ops.checkpoint is not None:
        rec.checkpoint = ops.checkpoint
        rec.prepared = [p for p in rec.prepared if p.pre_prepare.seq > ops.checkpoint.seq]
    if ops.view is not None:
        rec.view = ops.view
    if ops.spoke is not None:
        rec.spoke = ops.spoke
    if ops.epoch_start is not None:
        rec.epoch = ops.epoch_start
        rec.hard_state = HardState()
        rec.snapshot = None
        rec.entries = []
        rec.checkpoint = None
        rec.prepared = []
        rec.view = 0
        rec.spoke = None


class MemoryStorage:
    """Storage in RAM with crash semantics: what `save` got survives, nothing else exists."""

    def __init__(self) -> None:
        self.rec: Recovered | None = None
        self.saves = 0

    def save(self, ops: PersistOps) -> None:
        """Apply ops to the stored image."""
        if self.rec is None:
            if ops.epoch_start is None:
                raise ValueError("the first save must start an epoch")
            self.rec = Recovered(ops.epoch_start)
        merge(self.rec, ops)
        self.saves += 1

    def load(self) -> Recovered | None:
        """A copy of the stored image (so the replica cannot alter storage without save)."""
        if self.rec is None:
            return None
        r = self.rec
        return Recovered(r.epoch, r.hard_state, r.snapshot, list(r.entries), r.checkpoint, list(r.prepared), r.view,
                         r.spoke)
