"""What a migration is and how it ends: the request, live progress, result and errors.

Shared by the sender, the per-attempt machinery and the migration manager.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dwcp_agent.migration.core.kinds import is_retryable
from dwcp_agent.migration.safe_files import SourceImage

POLL_S = 0.1


class MigrationError(Exception):
    """A migration could not complete; the source is untouched and the destination path too.

    Whether another attempt may help follows from the kind alone (core.kinds.is_retryable)."""

    def __init__(self, message: str, error_type: str) -> None:
        super().__init__(message)
        self.error_type = error_type

    @property
    def retryable(self) -> bool:
        return is_retryable(self.error_type)


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
    image: SourceImage | None = None  # the source, opened once at validation (safe_files.open_source)


@dataclass
class Progress:
    """Counters the agent and the CLI read while a migration runs (written by its threads)."""

    total_bytes: int = 0
    acked_bytes: int = 0
    skipped_bytes: int = 0
    wire_bytes: int = 0
    attempts: int = 0
    streams: int = 0
    retries: list[str] = field(default_factory=list)  # why each failed attempt failed, in order
    # Streams actually used: peak, the count when the transfer ended, and stream-seconds for a
    # time-weighted mean from the first stream to the end (gaps between attempts count as 0).
    peak_streams: int = 0
    final_streams: int | None = None
    _stream_seconds: float = field(default=0.0, repr=False)
    _streams_first: float | None = field(default=None, repr=False)
    _streams_t: float = field(default=0.0, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, amount: int) -> None:
        """Thread-safe increment (several stream threads update the same counters)."""
        with self._lock:
            if name == "streams":
                self._account_streams(time.monotonic())
            setattr(self, name, getattr(self, name) + amount)
            if name == "streams":
                self.peak_streams = max(self.peak_streams, self.streams)

    def _account_streams(self, now: float) -> None:
        if self.final_streams is not None:
            return
        if self._streams_first is None:
            self._streams_first = now
        else:
            self._stream_seconds += self.streams * (now - self._streams_t)
        self._streams_t = now

    def end_transfer(self) -> None:
        """Every chunk is acknowledged: freeze the stream statistics before streams wind down."""
        with self._lock:
            if self._streams_first is not None:
                self._account_streams(time.monotonic())
            if self.final_streams is None:
                self.final_streams = self.streams

    def stream_stats(self) -> dict[str, float | int]:
        """Peak, final (live count while running) and time-weighted mean of open data streams."""
        with self._lock:
            seconds, span = self._stream_seconds, 0.0
            if self._streams_first is not None:
                end = self._streams_t if self.final_streams is not None else time.monotonic()
                if self.final_streams is None:
                    seconds += self.streams * (end - self._streams_t)
                span = end - self._streams_first
            final = self.streams if self.final_streams is None else self.final_streams
            mean = seconds / span if span > 0 else float(final)
            return {"peak": self.peak_streams, "final": final, "mean": round(mean, 2)}

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
