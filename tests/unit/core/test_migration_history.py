"""Ended migrations survive a restart of the history (the agent's), bounded by count and age."""

from __future__ import annotations

from pathlib import Path

from dwcp_agent.migration.history import MigrationHistory


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def record(i: int, finished: float) -> dict:
    return {"id": f"m-{i}", "state": "completed" if i % 2 else "failed", "started": finished - 1, "finished": finished}


def test_history_is_reloaded_bounded_by_count_and_age(tmp_path: Path) -> None:
    path = tmp_path / "state" / "migrations.jsonl"
    clock = Clock()
    history = MigrationHistory(path, max_entries=5, max_age_s=3600, clock=clock)
    for i in range(12):
        history.add(record(i, clock.now))
        clock.now += 60
    assert [r["id"] for r in history.records()] == [f"m-{i}" for i in range(7, 12)]
    assert len(path.read_text().splitlines()) <= 2 * 5  # compacted while appending
    with path.open("a") as f:
        f.write('{"id": "torn')  # a crash mid-line: the other lines are still read
    again = MigrationHistory(path, max_entries=5, max_age_s=3600, clock=clock)
    assert [r["id"] for r in again.records()] == [f"m-{i}" for i in range(7, 12)]
    assert again.get("m-8") == record(8, 1_700_000_000.0 + 8 * 60)
    clock.now = 1_700_000_000.0 + 8 * 60 + 3600 + 30  # m-7 and m-8 are now older than an hour
    assert [r["id"] for r in MigrationHistory(path, 5, 3600, clock).records()] == ["m-9", "m-10", "m-11"]
