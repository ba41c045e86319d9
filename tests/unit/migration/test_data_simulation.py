"""Seeded simulation of the data path: both object kinds under drops, duplicates, delays,
corruption, killed streams and (images) destination restarts.

`make test` runs 2,000 schedules per kind; `make soak` sets DWCP_SIM_SCHEDULES=50000. A failing
seed is in the assertion message; `run_schedule(DataSimConfig(kind, seed=...))` replays it.
"""

from __future__ import annotations

import os

import pytest

from dwcp_agent.migration.simulation import DataSimConfig, DataSimReport, run_schedule

SCHEDULES = int(os.environ.get("DWCP_SIM_SCHEDULES", "2000"))


def _run(kind: str, count: int) -> list[DataSimReport]:
    reports, failures = [], []
    for seed in range(count):
        report = run_schedule(DataSimConfig(kind=kind, seed=seed))
        reports.append(report)
        if report.violations:
            failures.append(f"seed {seed}: {report.violations[:3]}")
    assert not failures, f"{len(failures)} {kind} schedules broke an invariant: {failures[:5]}"
    return reports


@pytest.mark.timeout(max(300, SCHEDULES // 40))
@pytest.mark.parametrize("kind", ["stream", "image"])
def test_data_path_simulation_finds_no_violation(kind: str) -> None:
    reports = _run(kind, SCHEDULES)
    assert all(r.completed for r in reports)
    # The schedules did exercise the faults they are meant to survive.
    assert sum(r.faults for r in reports) > SCHEDULES
    assert sum(r.kills for r in reports) > SCHEDULES // 10
    if kind == "image":
        assert sum(r.restarts for r in reports) > SCHEDULES // 10


def test_simulation_is_deterministic_per_seed() -> None:
    for kind in ("stream", "image"):
        a = run_schedule(DataSimConfig(kind=kind, seed=1234))
        b = run_schedule(DataSimConfig(kind=kind, seed=1234))
        assert (a.steps, a.frames, a.faults, a.kills, a.restarts) == (b.steps, b.frames, b.faults, b.kills, b.restarts)


def test_simulation_catches_a_sender_that_forgets_chunks_of_a_lost_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """The invariants are not vacuous: break the redo rule and schedules fail."""
    from dwcp_agent.migration.core.stream import StreamSender

    def forget(self: StreamSender, stream: int) -> None:
        self._streams.pop(stream, None)
        self._carrying.pop(stream, None)

    monkeypatch.setattr(StreamSender, "stream_lost", forget)
    bad = [s for s in range(100) if run_schedule(DataSimConfig(kind="stream", seed=s)).violations]
    assert len(bad) > 20


def test_simulation_catches_a_destination_that_ignores_sequence_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    from dwcp_agent.migration.core import checks, image

    original = checks.check_frame

    def lax(h: checks.Header, session: int, stream: int, version: int, expected_seq: int, ftype: int = 2) -> None:
        original(h, session, stream, version, h.sequence, ftype)

    monkeypatch.setattr(image, "check_frame", lax)
    bad = [s for s in range(200) if run_schedule(DataSimConfig(kind="image", seed=s)).violations]
    assert bad
