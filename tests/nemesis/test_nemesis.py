"""Jepsen-style runs over real agent processes, one per network namespace (see nemesis_run.py).

`make test` runs a short schedule per cluster (Raft 3, Raft 5, PBFT 4): leader/primary kill and
restart, a real partition (majority/minority), a one-way cut, a paused node, packet loss, a full
disk and failing fsyncs (the WAL sits on a small tmpfs); PBFT also restarts a replica and then
faults another one. `make soak` sets DWCP_NEMESIS_SECONDS to
repeat the cycle (adding bridge partitions and delay) for that long. Every history must be
linearizable; the numbers (ops ok/failed/unknown, throughput, latency, time to the first write
after each fault) go to benchmarks/results/nemesis-<cluster>.json and the test log. Timings are
reported, not asserted.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from nemesis_run import Node, Run

from dwcp_agent.client import ApiError

pytestmark = [pytest.mark.slow, pytest.mark.system]

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
SOAK_SECONDS = float(os.environ.get("DWCP_NEMESIS_SECONDS", "0"))


def _others(run: Run, *exclude: Node) -> list[Node]:
    return [n for n in run.nodes if n not in exclude]


def _restart(run: Run, node: Node) -> float:
    node.kill()
    node.start()
    return run.wait_ready(node)


def _common_faults(run: Run, soak: bool) -> None:
    leader = run.leader()
    rest = _others(run, leader)
    size = (run.n - 1) // 3 if run.protocol == "pbft" else (run.n - 1) // 2
    minority = [leader, *rest[: size - 1]]
    majority = _others(run, *minority)
    idx = [n.index for n in minority], [n.index for n in majority]
    run.fault(f"partition leader {leader.name} in minority", lambda: run.net.partition(idx), run.net.heal, 3.0,
              partition=True)
    leader = run.leader()
    others = [n.index for n in _others(run, leader)]
    run.fault(f"one-way: {leader.name} hears nobody", lambda: run.net.one_way(others, [leader.index]),
              run.net.heal, 3.0, partition=True)
    follower = _others(run, run.leader())[0]
    run.fault(f"pause {follower.name}", follower.pause, follower.resume, 2.0)
    run.fault("10% loss on every link", lambda: run.net.loss(0.10), run.net.heal, 3.0)
    _disk_faults(run)
    if soak:
        leader = run.leader()
        rest = [n.index for n in _others(run, leader)]
        left, right = rest[: len(rest) // 2], rest[len(rest) // 2:]
        run.fault(f"bridge through {leader.name}", lambda: run.net.bridge(left, leader.index, right), run.net.heal,
                  4.0, partition=True)
        run.fault("20 ms delay on every link", lambda: run.net.delay(0.020), run.net.heal, 3.0)


def _disk_faults(run: Run) -> None:
    """A follower's disk fills up, then the leader's fsync fails: each stops taking part (fail-stop)
    and is restarted once its disk is repaired."""
    follower = _others(run, run.leader())[0]

    def repair_follower() -> None:
        follower.free_disk()
        _restart(run, follower)
    run.fault(f"disk full on {follower.name}", follower.fill_disk, repair_follower, 3.0)
    leader = run.leader()

    def repair_leader() -> None:
        leader.fsync_flag.unlink(missing_ok=True)
        _restart(run, leader)
    run.fault(f"fsync fails on {leader.name} (leader)", leader.fsync_flag.touch, repair_leader, 3.0)


def _kill_leader(run: Run) -> None:
    leader = run.leader()
    run.fault(f"kill {leader.name} (leader)", leader.kill, lambda: _restart(run, leader), 3.0)


def _pbft_rejoin(run: Run) -> None:
    """Kill a backup, restart it, time until it executes again; then fault another replica: the
    restarted one must carry the quorum."""
    primary = run.leader()
    backup = _others(run, primary)[0]
    backup.kill()
    time.sleep(3.0)
    backup.start()
    run.wait_ready(backup)
    ready_at = time.monotonic()
    base = run.in_hub(lambda: int(backup.status()["executed"]))

    def executing() -> bool:
        try:
            return int(backup.status()["executed"]) > base
        except (ApiError, KeyError):
            return False
    deadline = ready_at + 60
    while not run.in_hub(executing):
        assert time.monotonic() < deadline, f"{backup.name} did not execute again within 60 s of being ready"
        time.sleep(0.05)
    run.report.extra["pbft_restarted_replica_executes_after_ready_s"] = round(time.monotonic() - ready_at, 3)
    victim = _others(run, primary, backup)[0]
    record = run.fault(f"second fault: kill {victim.name} after {backup.name} rejoined", victim.kill,
                       lambda: _restart(run, victim), 5.0)
    writes = [op for op in run.work.history if op.call >= record.at and op.ret <= record.healed
              and op.input[0] in ("claim", "lease", "transfer") and op.output[0] == "ok"]
    run.report.extra["writes_during_second_fault"] = len(writes)
    assert writes, "the cluster stopped when a second replica failed after the first rejoined"


def _cycle(run: Run, soak: bool) -> None:
    _kill_leader(run)
    if run.protocol == "pbft":
        _pbft_rejoin(run)
    _common_faults(run, soak)


@pytest.mark.parametrize("protocol,n", [("raft", 3), ("raft", 5), ("pbft", 4)])
def test_nemesis_history_is_linearizable(nemesis_supported: None, tmp_path: Path, protocol: str, n: int) -> None:
    with Run(tmp_path, protocol, n) as run:
        time.sleep(2.0)
        end = time.monotonic() + SOAK_SECONDS
        _cycle(run, soak=SOAK_SECONDS > 0)
        while time.monotonic() < end:
            _cycle(run, soak=True)
        report = run.finish(RESULTS)
    summary = report.summary()
    print(json.dumps(summary, indent=2))
    assert report.partitions >= 1
    assert report.ok > 20, summary
    assert report.linearizable, summary
