"""Test support for ACP, never imported by the agent: the seeded cluster simulation (`simulation`)
and the linearizability checker for recorded client histories (`linearizability`)."""

from dwcp_agent.acp.testing.linearizability import UNKNOWN, CheckResult, Model, Operation, check, check_per_key
from dwcp_agent.acp.testing.simulation import SimConfig, SimReport, run_schedule

__all__ = ["UNKNOWN", "CheckResult", "Model", "Operation", "SimConfig", "SimReport", "check", "check_per_key",
           "run_schedule"]
