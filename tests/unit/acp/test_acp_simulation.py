"""Seeded simulation of whole clusters: every schedule checks Raft/PBFT invariants and linearizability.

CI runs 2,000 schedules per protocol; `make soak` sets DWCP_SIM_SCHEDULES for more. A failing seed
is in the assertion message; `run_schedule(SimConfig(...seed...))` replays it exactly.
"""

from __future__ import annotations

import os

import pytest

from dwcp_agent.acp.testing.simulation import BEHAVIOURS, SimConfig, SimReport, run_schedule

SCHEDULES = int(os.environ.get("DWCP_SIM_SCHEDULES", "2000"))


def _raft_config(seed: int) -> SimConfig:
    nodes = 5 if seed % 4 == 3 else 3
    switch = 60 if seed % 10 == 7 else -1
    return SimConfig(protocol="raft", nodes=nodes, seed=seed, ticks=120, quiet_ticks=60, switch_at=switch)


def _pbft_config(seed: int) -> SimConfig:
    byzantine = {}
    if seed % 2:
        byzantine = {f"n{1 + seed % 4}": BEHAVIOURS[(seed // 2) % len(BEHAVIOURS)]}
    switch = 60 if seed % 10 == 4 else -1
    return SimConfig(protocol="pbft", nodes=4, seed=seed, ticks=120, quiet_ticks=60, byzantine=byzantine,
                     switch_at=switch)


def _run_all(make: object, count: int) -> list[SimReport]:
    failures: list[str] = []
    reports = []
    for seed in range(count):
        cfg = make(seed)  # type: ignore[operator]
        report = run_schedule(cfg)
        reports.append(report)
        if report.violations:
            failures.append(f"seed {seed} ({cfg}): {report.violations[:3]}")
    assert not failures, f"{len(failures)} failing schedules, first: {failures[:3]}"
    return reports


# 2,000 whole-cluster schedules take about 1 min (Raft) and 4 min (PBFT) on one core here: above
# pytest's default 300 s once the CI box is busy, so these two carry their own bound.
@pytest.mark.timeout(1200)
def test_raft_simulation_schedules_keep_safety_and_linearizability() -> None:
    reports = _run_all(_raft_config, SCHEDULES)
    assert sum(r.completed for r in reports) > 10 * len(reports)
    assert sum(r.leader_changes for r in reports) > len(reports)
    assert sum(r.switches for r in reports) > 0


@pytest.mark.timeout(1200)
def test_pbft_simulation_schedules_keep_agreement_with_a_byzantine_replica() -> None:
    reports = _run_all(_pbft_config, SCHEDULES)
    assert sum(r.completed for r in reports) > 5 * len(reports)
    detected = {reason for r in reports for reason in r.detections}
    assert {"equivocation", "replay", "invalid_mac", "malformed"} <= detected


@pytest.mark.parametrize("protocol,nodes", [("raft", 3), ("pbft", 4)])
def test_simulation_catches_commit_without_quorum(protocol: str, nodes: int) -> None:
    # PBFT's view changes are rare now (no replica escalates alone), and they are where a slot
    # committed without a quorum gets lost: more partitions give the broken variant more chances.
    # (PBFT: about half the schedules catch it; 40 seeds so the share, not the luck of 20, is tested.)
    faults = {"partition_rate": 0.05} if protocol == "pbft" else {}
    seeds = 40 if protocol == "pbft" else 20
    caught = sum(bool(run_schedule(SimConfig(protocol=protocol, nodes=nodes, seed=s, unsafe_quorum=1,
                                             **faults)).violations)  # type: ignore[arg-type]
                 for s in range(seeds))
    assert caught >= 0.4 * seeds if protocol == "pbft" else caught >= 10


def test_simulation_seed_replays_identically() -> None:
    a = run_schedule(SimConfig(protocol="pbft", nodes=4, seed=1234, byzantine={"n2": "replay"}))
    b = run_schedule(SimConfig(protocol="pbft", nodes=4, seed=1234, byzantine={"n2": "replay"}))
    assert a.history == b.history and a.detections == b.detections and a.view_changes == b.view_changes


def test_simulation_pbft_equivocating_primary_is_detected_and_progress_resumes() -> None:
    # n1 is the primary of view 0; real Ed25519 signatures, no losses, no crashes.
    report = run_schedule(SimConfig(protocol="pbft", nodes=4, seed=7, byzantine={"n1": "equivocate"},
                                    drop=0.0, crash_rate=0.0, partition_rate=0.0, real_signatures=True))
    assert not report.violations
    assert report.detections.get("equivocation", 0) >= 1
    assert report.view_changes >= 1
    assert report.completed >= 10


def test_simulation_switch_under_load_loses_and_duplicates_nothing() -> None:
    for seed in range(20):
        report = run_schedule(SimConfig(protocol="raft", nodes=4, seed=seed, switch_at=60))
        assert not report.violations, (seed, report.violations)
        assert report.switches >= 3


def test_pbft_replica_down_past_the_watermark_window_catches_up_by_state_transfer() -> None:
    """n4 is down while the others order far more than the window (32) holds; with no message loss
    it must learn their stable checkpoint from the re-broadcast and fetch the state."""
    for seed in range(3):
        report = run_schedule(SimConfig(protocol="pbft", nodes=4, seed=seed, ticks=700, quiet_ticks=120, drop=0.0,
                                        duplicate=0.0, partition_rate=0.0, crash_rate=0.0, op_rate=1.0,
                                        outage={"n4": 5}))
        assert not report.violations, (seed, report.violations)
        others = min(report.pbft_low[n] for n in ("n1", "n2", "n3"))
        assert others > 8 + 64, report.pbft_low  # past n4's checkpoint plus both watermark windows
        assert report.pbft_executed["n4"] >= others, (seed, report.pbft_low, report.pbft_executed)


# ------------------------------------------------------------------ PBFT view synchronisation

_CALM = {"drop": 0.0, "duplicate": 0.0, "partition_rate": 0.0, "crash_rate": 0.0}


def _completed_between(report: SimReport, first_tick: int, last_tick: int, steps_per_tick: int = 4) -> int:
    return sum(1 for op in report.history
               if op.ret is not None and first_tick * steps_per_tick <= op.ret <= last_tick * steps_per_tick)


def test_pbft_replica_that_starts_late_joins_the_current_view_and_carries_a_quorum() -> None:
    """n4 starts after the others changed view (n1 down from tick 10); from tick 150 n1 stays down
    and n4 is needed for every quorum: the cluster must keep completing operations."""
    for seed in range(4):
        report = run_schedule(SimConfig(protocol="pbft", nodes=4, seed=seed, ticks=300, quiet_ticks=80, op_rate=0.5,
                                        late={"n4": 80}, outage={"n1": 10}, **_CALM))  # type: ignore[arg-type]
        assert not report.violations, (seed, report.violations)
        assert _completed_between(report, 150, 300) >= 5, seed
        views = {report.pbft_view[n] for n in ("n2", "n3", "n4")}
        assert len(views) == 1 and next(iter(views))[1], (seed, report.pbft_view)


def test_pbft_replica_restarting_at_every_point_of_a_view_change_rejoins() -> None:
    """The primary n1 dies at tick 30 (view change to view 1); n3 crashes at each offset into that
    view change and comes back 5 ticks later. With n1 still down, n3 is needed for every quorum."""
    for offset in range(0, 60, 4):
        down = 30 + offset
        report = run_schedule(SimConfig(protocol="pbft", nodes=4, seed=offset, ticks=260, quiet_ticks=60,
                                        op_rate=0.5, outage={"n1": 30}, restarts=[("n3", down, down + 5)],
                                        **_CALM))  # type: ignore[arg-type]
        assert not report.violations, (offset, report.violations)
        assert _completed_between(report, down + 100, 260) >= 5, (offset, report.pbft_view)


def test_pbft_replica_with_a_fast_clock_does_not_run_ahead_alone() -> None:
    """n3 counts three ticks for every real one, so its timers fire early; it must not climb views
    on its own, and when n4 goes down the other three still make progress."""
    for seed in range(4):
        report = run_schedule(SimConfig(protocol="pbft", nodes=4, seed=seed, ticks=300, quiet_ticks=80, op_rate=0.5,
                                        fast_clock={"n3": 3}, outage={"n4": 150}, **_CALM))  # type: ignore[arg-type]
        assert not report.violations, (seed, report.violations)
        assert _completed_between(report, 160, 300) >= 8, (seed, report.pbft_view)
        assert report.pbft_view["n3"][0] <= 2, report.pbft_view
