"""Live migration of a real QEMU guest between two real agents on loopback.

Each test checks the two things a live migration promises: the guest went on (its heartbeat
sequence continues on the destination, same boot id) and exactly one copy runs afterwards,
with ACP naming the host that runs it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

# A TCG guest's boot alone may take up to BOOT_TIMEOUT_S (300 s) on a loaded host; the default
# per-test timeout (300 s) would cut such a test off before its boot wait could even report.
pytestmark = pytest.mark.timeout(600)


def test_idle_guest_moves_keeps_beating_and_ownership_follows(make_bed) -> None:
    bed = make_bed()
    started = bed.start()
    assert started["kind"] == "live" and started["phase"] in ("setup", "precopy")
    done = bed.wait_end(started["id"])
    assert done["phase"] == "completed", done["error"]
    assert done["committed"] and done["switchover"] and done["iteration"] >= 1
    assert done["downtime_ms"] is not None and done["wire_bytes"] > 0 and done["return_bytes"] > 0
    gap = bed.assert_moved()
    assert gap.gap_s < 10
    assert bed.owner(bed.src) == "dst"
    listed = bed.record(started["id"])
    assert listed["kind"] == "live"


def test_dirtying_guest_moves_with_auto_converge(make_bed) -> None:
    bed = make_bed(dirty_mbps=25)
    done = bed.wait_end(bed.start(policy="auto-converge")["id"])
    assert done["phase"] == "completed", done["error"]
    assert done["stream_bytes"] > 64 << 20  # at least the dirtied area went, non-zero data
    bed.assert_moved()
    assert bed.owner(bed.src) == "dst"


def test_postcopy_commits_before_the_switch_and_the_guest_runs_on_the_destination(make_bed) -> None:
    bed = make_bed(dirty_mbps=25)
    # Postcopy from the first poll in pre-copy on: the policy commits, then switches.
    done = bed.wait_end(bed.start(policy="postcopy-after:0s", downtime_ms=1)["id"])
    assert done["phase"] == "completed", done["error"]
    assert done["postcopy_used"] and done["committed"]
    kinds = [a["action"] for a in done["actions"]]
    assert "start-postcopy" in kinds
    bed.assert_moved()
    assert bed.owner(bed.src) == "dst"


def test_cancel_leaves_the_source_running_and_kills_the_destination_copy(make_bed) -> None:
    bed = make_bed(dirty_mbps=25)
    # precopy with a 1 ms target under a dirtying guest never converges: it is still running.
    started = bed.start(policy="precopy", downtime_ms=1)
    bed.wait_phase(started["id"], ("precopy",))
    assert len(bed.qemus()) == 2  # the paused destination copy exists
    from dwcp_agent.client import api_call

    cancelled = api_call(bed.src.url, "DELETE", f"/api/v3/migrations/{started['id']}")
    assert cancelled["phase"] == "cancelled", cancelled
    bed.assert_runs_on_source_only()
    assert bed.owner(bed.src) == "src"


@pytest.mark.parametrize("victim", ["dst", "src"])
def test_agent_killed_during_precopy_leaves_exactly_the_source_running(make_bed, victim: str) -> None:
    bed = make_bed(dirty_mbps=25)
    started = bed.start(policy="precopy", downtime_ms=1)
    bed.wait_phase(started["id"], ("precopy",))
    (bed.dst if victim == "dst" else bed.src).kill()
    if victim == "dst":
        done = bed.wait_end(started["id"], timeout=60)
        assert done["phase"] == "failed" and not done["committed"], done
        assert bed.owner(bed.src) == "src"
    bed.assert_runs_on_source_only()


def test_missing_qmp_socket_unknown_vm_and_incompatible_qemu_are_clear_4xx_and_change_nothing(make_bed) -> None:
    bed = make_bed(dest_mem_mib=512)
    missing = bed.refused(qmp=str(bed.root / "nope.sock"))
    assert missing.status == 400 and "no QMP socket" in str(missing)
    unknown = bed.refused(vm_id="vm-unknown")
    assert unknown.status == 404 and "unknown VM 'vm-unknown'" in str(unknown)
    incompatible = bed.refused()
    assert incompatible.status == 409 and "RAM size differs" in str(incompatible)
    bad_policy = bed.refused(policy="sometimes")
    assert bad_policy.status == 400 and "unknown convergence policy" in str(bad_policy)
    bed.assert_runs_on_source_only()
    assert bed.owner(bed.src) == "src"


@pytest.mark.parametrize("victim", ["dst", "src"])
def test_agent_killed_during_setup_leaves_exactly_the_source_running(make_bed, victim: str) -> None:
    import threading

    from dwcp_agent.client import ApiError

    bed = make_bed()
    outcome: list[object] = []

    def start() -> None:
        try:
            outcome.append(bed.start())
        except ApiError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while len(bed.qemus()) < 2 and time.monotonic() < deadline:  # the destination QEMU is starting
        time.sleep(0.01)
    (bed.dst if victim == "dst" else bed.src).kill()
    thread.join(90)
    if victim == "dst":
        assert outcome and isinstance(outcome[0], ApiError), outcome
    bed.assert_runs_on_source_only()


@pytest.mark.parametrize(("hold", "victim", "runs_on"), [
    ("switchover", "dst", "source"),
    ("switchover", "src", "source"),
    ("before-commit", "dst", "source"),
    ("before-commit", "src", "source"),
    ("after-commit", "dst", "destination"),
    ("after-commit", "src", "destination"),
])
def test_agent_killed_from_switchover_to_after_commit_leaves_exactly_one_copy_running(
        make_bed, hold: str, victim: str, runs_on: str) -> None:
    """One agent is SIGKILLed while the source agent is held: in the switchover (QEMU stopped the
    source VM for stop-and-copy and waits there: pause-before-switchover), after QEMU reported
    completed just before the ACP commit, or just after it sent Commit. Afterwards exactly one
    copy runs, its guest beating on without a reboot, and ACP names its host."""
    bed = make_bed(src_env={"LIVE_MIGRATION_TEST_HOLD": f"{hold}:{30 if hold == 'switchover' else 8}"})
    started = bed.start()
    held_in = "switchover" if hold == "switchover" else "commit"
    record = bed.wait_phase(started["id"], (held_in, "completed", "failed"), timeout=120)
    assert record["phase"] == held_in, record
    if hold == "after-commit":
        deadline = time.monotonic() + 20
        while not bed.record(started["id"])["committed"] and time.monotonic() < deadline:
            time.sleep(0.05)
        # The destination has the Commit and runs the VM once its guest beats there (a fixed
        # sleep raced a loaded machine: killing it before its `cont` is the documented lost-VM gap).
        bed.beats.wait_for(1, 30, bed.dest_serial.name)
    (bed.dst if victim == "dst" else bed.src).kill()
    if runs_on == "source":
        bed.assert_runs_on_source_only()
    else:
        bed.assert_runs_on_destination_only()
        assert len(bed.qemus()) <= 2
    if victim == "dst" and runs_on == "source":
        done = bed.wait_end(started["id"], timeout=60)
        assert done["phase"] == "failed" and not done["committed"], done
    assert bed.owner_after_kill(victim) == ("src" if runs_on == "source" else "dst")


def test_destination_qemu_started_by_the_management_layer_is_used_through_its_qmp_socket(make_bed) -> None:
    from guest.build import guest_command
    from guest.vm import GuestVm

    bed = make_bed(dst_settings={"live_qemu_command": ""})  # this destination agent starts no QEMU
    dest = GuestVm(bed.guest, bed.root / "mgmt-dest.qmp", bed.dest_serial, 256)
    dest.argv = guest_command(bed.guest, dest.qmp_socket, dest.serial_log, 256, incoming=True)
    dest.start()
    deadline = time.monotonic() + 30
    while not dest.qmp_socket.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    done = bed.wait_end(bed.start(dest_qmp=str(dest.qmp_socket))["id"])
    assert done["phase"] == "completed", done["error"]
    bed.assert_moved()
    assert dest.alive()


def _tunnel_data_connections(dport: int) -> list[tuple[str, int, int]]:
    """(local address:port, bytes acked, bytes in the send queue) of every established
    connection to `dport` (ss -ti)."""
    out = subprocess.run(["ss", "-tinH", "state", "established", "dst", "127.0.0.1", f"dport = :{dport}"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    conns: list[tuple[str, int, int]] = []
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            fields = line.split()
            conns.append((fields[2], 0, int(fields[1])))
        elif conns:
            acked = re.search(r"bytes_acked:(\d+)", line)
            conns[-1] = (conns[-1][0], int(acked.group(1)) if acked else 0, conns[-1][2])
    return conns


def _destroy(local: str, dport: int) -> None:
    port = local.rpartition(":")[2]
    subprocess.run(["ss", "-K", "dst", "127.0.0.1", f"dport = :{dport}", "sport", "=", f":{port}"],
                   capture_output=True, timeout=10, check=True)


def test_a_tunnel_connection_destroyed_mid_precopy_does_not_fail_the_migration(make_bed) -> None:
    """One of the tunnel's TCP data connections is destroyed by the kernel (ss -K) during
    pre-copy: what it held goes again on the other connections, the migration
    completes, the guest goes on, exactly one copy runs and the ownership moved."""
    if os.geteuid() != 0 or shutil.which("ss") is None:
        pytest.skip("destroying a TCP connection needs ss -K as root")
    bed = make_bed(dirty_mbps=25)
    started = bed.start(policy="auto-converge")
    bed.wait_phase(started["id"], ("precopy",))
    dport = bed.dst.data_port
    deadline = time.monotonic() + 60
    victim = ""
    while not victim and time.monotonic() < deadline:
        conns = _tunnel_data_connections(dport)
        # A data connection well into the stream, with bytes still queued (so chunks of it are
        # unacknowledged when it dies: a connection caught idle would have nothing to resend).
        loaded = [c for c in conns if c[2] > 0]
        busiest = max(loaded, key=lambda c: c[1], default=("", 0, 0))
        if len(conns) > 2 and busiest[1] > 8 << 20:
            victim = busiest[0]
        time.sleep(0.05)
    assert victim, "no busy tunnel data connection carried 8 MiB within 60 s"
    _destroy(victim, dport)
    assert bed.record(started["id"])["phase"] == "precopy"  # destroyed mid pre-copy, not after it
    assert victim not in [c[0] for c in _tunnel_data_connections(dport)]
    done = bed.wait_end(started["id"])
    assert done["phase"] == "completed", done["error"]
    # Whether the victim still held unacknowledged chunks at the instant it died depends on the
    # schedule (QEMU often has nothing queued), so resending itself is asserted where it can be
    # forced: tests/integration/bytestream (a connection killed with chunks in flight) and the
    # data-path simulation. Here: the live migration survives the lost connection.
    assert done["stream_bytes"] > 64 << 20
    bed.assert_moved()
    assert bed.owner(bed.src) == "dst"
