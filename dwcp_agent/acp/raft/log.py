"""The in-memory Raft log: a snapshot base plus the entries after it, with the persisted mark.

Raft owns one `RaftLog`; the caller sees only what `unstable()` returns (entries to persist) and
tells the log what reached the disk through `stable_to`. Indices are 1-based as in the paper; the
snapshot covers every index up to and including `snap.index`.
"""

from __future__ import annotations

from dwcp_agent.acp.messages import Entry, Snapshot

__all__ = ["RaftLog"]


class RaftLog:
    """Entries after a snapshot, the commit/apply marks and the first unpersisted index."""

    def __init__(self, snapshot: Snapshot | None = None, entries: list[Entry] | None = None,
                 commit: int = 0) -> None:
        self.snap = snapshot or Snapshot()
        self.entries: list[Entry] = list(entries or [])
        if self.entries and self.entries[0].index != self.snap.index + 1:
            raise ValueError(f"log starts at {self.entries[0].index}, snapshot ends at {self.snap.index}")
        self.committed = max(commit, self.snap.index)
        self.applied = self.snap.index
        self.stable = self.last_index()  # everything handed in at construction came from disk
        self.snap_pending = False  # a received snapshot the caller must persist and restore

    # ------------------------------------------------------------ queries
    def first_index(self) -> int:
        """Lowest index still held as an entry."""
        return self.snap.index + 1

    def last_index(self) -> int:
        """Index of the newest entry (or of the snapshot when the log is empty)."""
        return self.entries[-1].index if self.entries else self.snap.index

    def last_term(self) -> int:
        """Term of the newest entry."""
        return self.entries[-1].term if self.entries else self.snap.term

    def term(self, index: int) -> int | None:
        """Term at `index`, or None when compacted away or beyond the end."""
        if index == self.snap.index:
            return self.snap.term
        if index < self.snap.index or index > self.last_index():
            return None
        return self.entries[index - self.snap.index - 1].term

    def matches(self, index: int, term: int) -> bool:
        """True when our entry at `index` has `term` (log matching check of AppendEntries)."""
        return self.term(index) == term

    def up_to_date(self, last_index: int, last_term: int) -> bool:
        """Election restriction: is a candidate's log at least as up to date as ours."""
        return last_term > self.last_term() or (last_term == self.last_term() and last_index >= self.last_index())

    def slice(self, lo: int, hi: int) -> list[Entry]:
        """Entries with lo <= index < hi; lo must be >= first_index()."""
        base = self.snap.index + 1
        return self.entries[lo - base:hi - base]

    def unstable(self) -> list[Entry]:
        """Entries appended since the last `stable_to` call; the caller persists them."""
        return self.slice(self.stable + 1, self.last_index() + 1)

    def next_committed(self) -> list[Entry]:
        """Committed entries not yet handed out for applying."""
        return self.slice(max(self.applied, self.snap.index) + 1, self.committed + 1)

    # ------------------------------------------------------------ updates
    def append(self, entries: list[Entry]) -> None:
        """Append entries, truncating any conflicting suffix first (never below the commit index)."""
        if not entries:
            return
        first = entries[0].index
        if first <= self.committed:
            raise ValueError(f"truncating committed entry {first} (commit {self.committed})")
        del self.entries[first - self.snap.index - 1:]
        self.entries.extend(entries)
        self.stable = min(self.stable, first - 1)

    def find_conflict(self, entries: list[Entry]) -> int:
        """Index of the first entry that is new or conflicts with ours; 0 when all match."""
        for entry in entries:
            if self.term(entry.index) != entry.term:
                return entry.index
        return 0

    def commit_to(self, index: int) -> bool:
        """Raise the commit index; never lowers it."""
        if index > self.committed:
            if index > self.last_index():
                raise ValueError(f"commit {index} beyond last index {self.last_index()}")
            self.committed = index
            return True
        return False

    def stable_to(self, index: int, term: int) -> None:
        """The caller persisted entries up to `index`; ignored when the entry was replaced meanwhile."""
        if self.term(index) == term and index > self.stable:
            self.stable = index

    def restore(self, snapshot: Snapshot) -> None:
        """Replace the whole log by a snapshot received from the leader."""
        self.snap = snapshot
        self.entries = []
        self.committed = snapshot.index
        self.applied = snapshot.index
        self.stable = snapshot.index
        self.snap_pending = True

    def compact(self, snapshot: Snapshot) -> None:
        """Drop entries covered by a snapshot taken locally at snapshot.index (<= applied)."""
        if snapshot.index > self.applied:
            raise ValueError(f"snapshot at {snapshot.index} beyond applied {self.applied}")
        if snapshot.index <= self.snap.index:
            return
        del self.entries[:snapshot.index - self.snap.index]
        self.snap = snapshot
