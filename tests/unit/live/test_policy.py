"""The convergence policy as scripts: observations in, QMP levers out."""

from __future__ import annotations

import pytest

from dwcp_agent.live.policy import (
    THROTTLE_STEPS,
    ConvergencePolicy,
    Observation,
    PolicyError,
    parse_policy,
)

MB = 1_000_000


def obs(t: float, iterations: int, dirty_mb: float, expected_ms: float | None, predicted_mb: float | None,
        ratio: float = 1.0, status: str = "active") -> Observation:
    return Observation(t, status, iterations, 100 * MB, dirty_mb * MB, expected_ms,
                       None if predicted_mb is None else predicted_mb * MB, ratio)


def kinds(actions: list) -> list[str]:
    return [a.kind for a in actions]


def test_parse_policy_accepts_the_documented_forms_and_names_a_bad_one() -> None:
    assert parse_policy("precopy").throttle is False
    assert parse_policy("auto-converge").throttle is True
    assert parse_policy("postcopy-after:30s").postcopy_after_s == 30.0
    assert parse_policy("postcopy-after:4i").postcopy_after_iterations == 4
    for bad in ("postcopy", "postcopy-after:10", "postcopy-after:xs", "fast"):
        with pytest.raises(PolicyError, match="precopy, auto-converge"):
            parse_policy(bad)


def test_first_step_sets_downtime_limit_once_and_caps_bandwidth_from_prediction() -> None:
    policy = ConvergencePolicy(parse_policy("precopy"), 300)
    first = policy.step(obs(0.1, 0, 0, None, 100, status="setup"))
    assert kinds(first) == ["set-downtime-limit", "set-max-bandwidth"]
    assert first[0].params == {"downtime-limit": 300}
    assert first[1].params["max-bandwidth"] == 150 * MB
    # A 30 % change: nothing new. Doubled: a new cap. HDE's ratio raises the cap (stream bytes).
    assert policy.step(obs(0.2, 1, 0, 50, 130)) == []
    assert kinds(policy.step(obs(0.3, 2, 0, 50, 200))) == ["set-max-bandwidth"]
    assert policy.step(obs(0.4, 3, 0, 50, 200, ratio=2.0))[0].params["max-bandwidth"] == 600 * MB


def test_no_prediction_no_bandwidth_cap() -> None:
    policy = ConvergencePolicy(parse_policy("auto-converge"), 300)
    assert kinds(policy.step(obs(0.1, 1, 500, 5000, None))) == ["set-downtime-limit"]


def test_auto_converge_throttles_only_when_end_to_end_rate_is_below_dirty_rate() -> None:
    policy = ConvergencePolicy(parse_policy("auto-converge"), 300)
    policy.step(obs(0.0, 0, 0, None, 100, status="setup"))
    # 100 MB/s wire x ratio 3 = 300 MB/s end to end > 200 MB/s dirty: no throttle.
    assert "throttle" not in kinds(policy.step(obs(1, 2, 200, 900, 100, ratio=3.0)))
    # Same wire, ratio 1: 100 < 200 -> throttle, and harder on each further poll that still lags.
    first = [a for a in policy.step(obs(2, 3, 200, 900, 100, ratio=1.0)) if a.kind == "throttle"]
    assert first and first[0].params["cpu-throttle-initial"] == THROTTLE_STEPS[0]
    second = policy.step(obs(3, 4, 200, 900, 100, ratio=1.0))
    assert kinds(second) == ["throttle"] and second[0].params["cpu-throttle-initial"] == THROTTLE_STEPS[1]


def test_throttle_stops_once_the_downtime_target_is_met_and_never_exceeds_the_last_step() -> None:
    policy = ConvergencePolicy(parse_policy("auto-converge"), 300)
    policy.step(obs(0.0, 0, 0, None, 100, status="setup"))
    assert policy.step(obs(1, 2, 200, 250, 100)) == []  # expected 250 ms <= 300 ms
    for i in range(len(THROTTLE_STEPS) + 3):
        policy.step(obs(2 + i, 3 + i, 200, 900, 100))
    assert policy.throttle_step == len(THROTTLE_STEPS) - 1


def test_precopy_policy_never_throttles_or_switches() -> None:
    policy = ConvergencePolicy(parse_policy("precopy"), 300)
    policy.step(obs(0.0, 0, 0, None, 100, status="setup"))
    for i in range(50):
        assert set(kinds(policy.step(obs(i, i + 1, 500, 9000, 100)))) <= {"set-max-bandwidth"}


def test_postcopy_after_seconds_switches_once_when_precopy_has_not_converged() -> None:
    policy = ConvergencePolicy(parse_policy("postcopy-after:10s"), 300)
    policy.step(obs(0.0, 0, 0, None, 1000, status="setup"))
    assert "start-postcopy" not in kinds(policy.step(obs(9.9, 5, 10, 900, 1000)))
    assert "start-postcopy" in kinds(policy.step(obs(10.0, 6, 10, 900, 1000)))
    assert policy.step(obs(11.0, 7, 10, 900, 1000)) == []  # once in postcopy, no more levers


def test_postcopy_after_iterations_switches_a_precopy_still_running_at_the_bound() -> None:
    policy = ConvergencePolicy(parse_policy("postcopy-after:3i"), 300)
    policy.step(obs(0.0, 0, 0, None, 1000, status="setup"))
    assert "start-postcopy" not in kinds(policy.step(obs(5, 2, 10, 900, 1000)))
    assert "start-postcopy" in kinds(policy.step(obs(6, 3, 10, 200, 1000)))
    assert not policy.step(obs(7, 4, 10, 200, 1000, status="completed"))


def test_bandwidth_cap_never_falls_below_what_qemu_already_achieves() -> None:
    policy = ConvergencePolicy(parse_policy("precopy"), 300)
    low_sample = Observation(0.5, "active", 1, 100 * MB, 0, 300, 20 * MB, 1.0, None, qemu_bytes_per_s=400 * MB)
    caps = [a.params["max-bandwidth"] for a in policy.step(low_sample) if a.kind == "set-max-bandwidth"]
    assert caps == [600 * MB]
