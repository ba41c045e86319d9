"""Rollout and SLA policy: which protocol profile a migration uses, the SLA guard that judges
the service from its counters, automatic rollback, and the SLA report.

Telemetry (dwcp_agent.telemetry) measures; this package decides. Modules:
`controller` (rollout percentage, freeze, stores), `sla` (SLIs, GO/NO-GO, rollback),
`http` (the /api/v3/sla, /api/v3/rollout and /metrics/summary routes), `report` (monthly report
from Prometheus) and `cli` (`dwcp-agent rollout` / `sla` / `sla-report`).
"""

from dwcp_agent.rollout.controller import (
    FileRolloutStore,
    MemoryRolloutStore,
    RolloutController,
    RolloutError,
    RolloutState,
    RolloutStore,
)
from dwcp_agent.rollout.sla import SlaGuard

__all__ = [
    "FileRolloutStore",
    "MemoryRolloutStore",
    "RolloutController",
    "RolloutError",
    "RolloutState",
    "RolloutStore",
    "SlaGuard",
]
