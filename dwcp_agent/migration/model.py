"""What a migration is and how it ends: the request, live progress, result and errors.

Shared by the sender, the per-attempt machinery and the migration manager.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

# Refusals that another attempt cannot fix.
FATAL_ERRORS = frozenset({"version", "auth", "forbidden", "bad_request", "unwritable", "no_space", "busy",
                          "rdma_unavailable",
                          "io", "malformed", "identity"})
POLL_S = 0.1


class MigrationError(Exception):
    """A migration could not complete; the source is untouched and the destination path too."""

    def __init__(self, message: str, error_type: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.retryable = retryable


class Interrupted(MigrationError):
    """Stopped on purpose (cancel or agent shutdown)."""


@dataclass
class MigrationRequest:
    """What to move, where to, and under which protocol profile."""

    migration_id: str
    vm_id: str
    source: Path
    host: str
    port: int
    dest_path: str
    protocol: str = "v3"
    mode: str = "datacenter"
    mode_measured: bool = False  # True once PBA named the mode from measurements


@dataclass
class Progress:
    """Counters the agent and the CLI read while a migration runs (written by its threads)."""

    total_bytes: int = 0
    acked_bytes: int = 0
    skipped_bytes: int = 0
    wire_bytes: int = 0
    attempts: int = 0
    streams: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, amount: int) -> None:
        """Thread-safe increment (several stream threads update the same counters)."""
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)

    @property
    def done_bytes(self) -> int:
        return self.acked_bytes + self.skipped_bytes


@dataclass(frozen=True)
class SendResult:
    digest: bytes
    logical_bytes: int
    wire_bytes: int
    skipped_bytes: int
    attempts: int
