"""The record of one live migration as the API, CLI and metrics see it."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LivePhase", "LiveRecord", "LiveRequest"]


class LivePhase:
    """Phases in order; `done_phases` end a record."""

    SETUP = "setup"
    PRECOPY = "precopy"
    POSTCOPY = "postcopy"
    SWITCHOVER = "switchover"
    COMMIT = "commit"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    done_phases = (COMPLETED, FAILED, CANCELLED)


@dataclass(frozen=True)
class LiveRequest:
    """What the caller asked for; None fields take the agent's configuration."""

    vm_id: str
    destination: str  # host:port of the destination agent's data port
    qmp: str = ""
    dest_qmp: str = ""
    downtime_ms: int | None = None
    policy: str | None = None


@dataclass
class LiveRecord:
    """Progress and outcome of one outgoing live migration."""

    request: LiveRequest
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    phase: str = LivePhase.SETUP
    policy: str = ""
    mode: str = "datacenter"
    started: float = field(default_factory=time.time)
    ended: float | None = None
    iteration: int = 0
    remaining_bytes: int = 0
    dirty_bytes_per_s: float = 0.0
    predicted_bytes_per_s: float | None = None
    expected_downtime_ms: float | None = None
    last_action: str = ""
    actions: list[dict[str, Any]] = field(default_factory=list)
    switchover: bool = False
    committed: bool = False
    downtime_ms: float | None = None
    wire_bytes: int = 0
    stream_bytes: int = 0
    return_bytes: int = 0
    resent_chunks: int = 0  # chunks sent again after their data connection broke
    postcopy_used: bool = False
    throttle_used: bool = False
    error: str = ""
    destination_node: str = ""

    @property
    def done(self) -> bool:
        return self.phase in LivePhase.done_phases

    def to_dict(self) -> dict[str, Any]:
        end = self.ended or time.time()
        return {
            "id": self.id, "kind": "live", "vm_id": self.request.vm_id,
            "destination": self.request.destination, "destination_node": self.destination_node,
            "state": self.phase, "phase": self.phase, "policy": self.policy, "mode": self.mode,
            "started": self.started, "duration_s": round(end - self.started, 3),
            "iteration": self.iteration, "remaining_bytes": self.remaining_bytes,
            "dirty_bytes_per_s": round(self.dirty_bytes_per_s),
            "predicted_bytes_per_s": None if self.predicted_bytes_per_s is None else round(self.predicted_bytes_per_s),
            "expected_downtime_ms": self.expected_downtime_ms, "convergence_action": self.last_action,
            "actions": self.actions, "switchover": self.switchover, "committed": self.committed,
            "downtime_ms": self.downtime_ms, "wire_bytes": self.wire_bytes, "stream_bytes": self.stream_bytes,
            "return_bytes": self.return_bytes, "resent_chunks": self.resent_chunks,
            "ratio": round(self.stream_bytes / self.wire_bytes, 3) if self.wire_bytes else None,
            "postcopy_used": self.postcopy_used, "throttle_used": self.throttle_used, "error": self.error,
        }
