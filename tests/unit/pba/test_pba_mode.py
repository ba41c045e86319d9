"""Mode rule, hysteresis and dwell, driven by injected time (real-namespace tests are in tests/system)."""

from __future__ import annotations

import numpy as np
import pytest

from dwcp_agent.pba.mode import DATACENTER, GBIT, HYBRID, INTERNET, ModeDetector, classify
from dwcp_agent.telemetry.metrics import Metrics


@pytest.mark.parametrize(("rtt", "bw", "loss", "mode"), [
    (0.0002, 5 * GBIT, 0.0, DATACENTER),
    (0.005, 10 * GBIT, 0.0, DATACENTER),      # metro: 5 ms, 10 Gbit meets the datacenter rule
    (0.050, 0.95 * GBIT, 0.001, INTERNET),    # internet profile as measured: min RTT 50.00 ms
    (0.045, 2 * GBIT, 0.0, HYBRID),
    (0.152, 0.09 * GBIT, 0.01, INTERNET),     # bad-internet
    (0.020, 2 * GBIT, 0.0, HYBRID),
    (0.005, 0.5 * GBIT, 0.0, INTERNET),       # < 1 Gbit/s is internet even at low RTT
    (0.005, 5 * GBIT, 0.02, INTERNET),        # > 1 % loss is internet
    (0.005, None, 0.0, DATACENTER),           # capacity unknown: RTT and loss decide
])
def test_rule(rtt: float, bw: float | None, loss: float, mode: str) -> None:
    assert classify(rtt, bw, loss) == mode


def test_hysteresis_keeps_the_current_mode_near_a_threshold() -> None:
    assert classify(0.011, 5 * GBIT, 0.0) == HYBRID
    assert classify(0.011, 5 * GBIT, 0.0, current=DATACENTER) == DATACENTER
    assert classify(0.045, 5 * GBIT, 0.0, current=INTERNET) == INTERNET
    assert classify(0.035, 5 * GBIT, 0.0, current=INTERNET) == HYBRID


def feed(det: ModeDetector, t0: float, seconds: float, rtt: float, bw: float, loss: float = 0.0) -> float:
    t = t0
    while t < t0 + seconds:
        t += 0.5
        det.observe(t, rtt, bw, loss)
    return t


def test_first_decision_within_seconds_and_metrics_show_it() -> None:
    metrics = Metrics()
    det = ModeDetector(metrics=metrics)
    t = 0.0
    while det.mode is None:
        t += 0.5
        det.observe(t, 0.051, 0.9 * GBIT, 0.001)
    assert det.mode == INTERNET and t <= 2.0
    assert metrics.current_mode.labels(INTERNET)._value.get() == 1
    assert metrics.current_mode.labels(DATACENTER)._value.get() == 0


def test_switch_needs_confirmation_and_minimum_dwell() -> None:
    metrics = Metrics()
    det = ModeDetector(metrics=metrics, min_dwell_s=60, confirm_s=2)
    t = feed(det, 0, 5, 0.0003, 5 * GBIT)
    assert det.mode == DATACENTER
    t = feed(det, t, 30, 0.080, 0.5 * GBIT)        # the path changed, but dwell holds the mode
    assert det.mode == DATACENTER
    t = feed(det, t, 40, 0.080, 0.5 * GBIT)        # 60 s after the first decision: switch
    assert det.mode == INTERNET and det.switches == 1
    assert metrics.mode_switches.labels(DATACENTER, INTERNET)._value.get() == 1


def test_noisy_path_at_a_threshold_switches_at_most_once_a_minute() -> None:
    rng = np.random.default_rng(11)
    det = ModeDetector()
    t = 0.0
    for _ in range(1200):  # 10 minutes of 0.5 s samples around the 10 ms boundary
        t += 0.5
        det.observe(t, float(0.010 * (1 + 0.3 * rng.standard_normal())), 5 * GBIT, 0.0)
    assert det.switches <= 10


def test_idle_intervals_keep_the_mode() -> None:
    det = ModeDetector()
    t = feed(det, 0, 5, 0.0003, 5 * GBIT)
    for _ in range(200):
        t += 0.5
        det.observe(t, 0.0, None, 0.0)  # nothing acked: no RTT, capacity unknown
    assert det.mode == DATACENTER and det.switches == 0


def test_forced_initial_mode() -> None:
    assert ModeDetector(initial=HYBRID).mode == HYBRID


def test_probe_seed_names_a_mode_that_the_first_measurements_may_replace_without_dwell() -> None:
    metrics = Metrics()
    det = ModeDetector(metrics=metrics, min_dwell_s=60.0)
    assert det.seed(0.0002, 100.0) == DATACENTER
    assert metrics.current_mode.labels(DATACENTER)._value.get() == 1
    # Under load the path shows < 1 Gbit/s: internet, well inside the 60 s dwell, and not a switch.
    feed(det, 100.0, 3.0, 0.0002, 0.3 * GBIT)
    assert det.mode == INTERNET and det.switches == 0
    assert metrics.mode_switches.labels(DATACENTER, INTERNET)._value.get() == 0
    assert det.seed(0.050, 104.0) == INTERNET  # a second seed never overrides a named mode
