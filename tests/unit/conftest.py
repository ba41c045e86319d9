"""Shared unit-test fixtures: a settable clock, a fresh metrics registry and an SLA-ready config."""

from __future__ import annotations

import pytest

from dwcp_agent.config import load_config
from dwcp_agent.telemetry.metrics import Metrics


class FakeClock:
    """Time that moves only when the test says so (seconds since an arbitrary epoch)."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def config():
    return load_config(environ={}, overrides={"node_id": "node-a", "sla_nogo_hold_s": 30.0,
                                                  "sla_min_samples": 1})
