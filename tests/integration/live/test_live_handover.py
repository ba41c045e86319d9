"""The handover after the ACP commit, with an agent SIGKILLed in it (issue #12, item 4).

The commit decides where the VM lives; the messages that tell each side travel after it. These
tests kill an agent in that window and check what the handover line (dwcp_agent/live/outcome.py)
and the guards do: exactly one QEMU left, running where ACP says the VM is, and the guest's
heartbeat went on (same boot, sequence continued).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from dwcp_agent.live.hold import TEST_HOLD_ENV

HOLD_S = 8  # long enough to kill the held agent on a loaded machine; the tests do not wait it out


def _wait_committed(bed: Any, migration_id: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        record = bed.record(migration_id)
        if record["committed"]:
            return
        assert record["phase"] not in ("completed", "failed", "cancelled"), record
        time.sleep(0.05)
    raise AssertionError(f"no ownership commit within 120 s: {bed.record(migration_id)}")


def test_destination_agent_killed_between_the_commit_and_its_cont_the_guard_runs_the_vm(
        make_bed: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The destination agent got Commit and is held before `cont` (its QEMU paused, ownership
    already committed to it). Killed there: its guard reads `commit` on the handover line and
    `cont`s the VM; the source agent hears `running` from that guard and quits its paused copy."""
    monkeypatch.setenv(TEST_HOLD_ENV, f"before-cont:{HOLD_S}")  # only the destination has that point
    bed = make_bed()
    started = bed.start()
    _wait_committed(bed, started["id"])
    assert not [b for b in bed.beats.beats if b.source == bed.dest_serial.name], "ran before the hold"
    bed.dst.kill()
    done = bed.wait_end(started["id"], timeout=120)
    assert done["phase"] == "completed", done["error"]
    gap = bed.assert_moved()  # source QEMU gone, exactly one QEMU, the guest went on
    assert gap.same_boot
    assert bed.owner(bed.src) == "dst"


def test_source_agent_killed_after_the_commit_its_guard_quits_the_paused_source(make_bed: Any) -> None:
    """The source agent committed, sent Commit and is held before it would quit its paused QEMU.
    Killed there: its guard hears `running` on the handover line and quits the paused source;
    it never resumes it."""
    bed = make_bed(src_env={TEST_HOLD_ENV: f"after-commit:{HOLD_S}"})
    started = bed.start()
    _wait_committed(bed, started["id"])
    bed.beats.wait_for(1, 30, bed.dest_serial.name)  # the destination runs the VM
    assert bed.vm.alive(), "the source QEMU went before its agent was killed"
    bed.src.kill()
    bed.assert_moved()  # the paused source is quit: exactly one QEMU, the guest went on
    bed.src.start()
    bed.src.wait_ready()
    assert bed.owner(bed.src) == "dst"
