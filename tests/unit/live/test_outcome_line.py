"""The handover line (live/outcome.py) and the guards that hold it, over real sockets and real
processes (a `sleep` stands in for the destination QEMU)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

from dwcp_agent.live.guard import Guard
from dwcp_agent.live.outcome import COMMIT, RUNNING, OutcomeLine

PSK = b"k" * 32


def _pair(session: int = 7, migration: str = "m1") -> tuple[OutcomeLine, OutcomeLine]:
    a, b = socket.socketpair()
    return OutcomeLine(a, PSK, session, migration), OutcomeLine(b, PSK, session, migration)


def test_a_word_said_is_heard_and_only_that_word() -> None:
    source, destination = _pair()
    source.say(COMMIT)
    assert not destination.wait_for(RUNNING, 0.2)  # a different word does not count
    source.say(COMMIT)
    assert destination.wait_for(COMMIT, 1.0)
    source.close()
    destination.close()


def test_a_word_without_the_right_mac_is_ignored() -> None:
    forged, destination = _pair()
    other_migration = OutcomeLine(forged.sock, PSK, 7, "m2")
    other_key = OutcomeLine(forged.sock, b"x" * 32, 7, "m1")
    other_migration.say(COMMIT)
    other_key.say(COMMIT)
    forged.sock.sendall(COMMIT + b" " + b"0" * 64 + b"\n")
    assert not destination.wait_for(COMMIT, 0.3)
    forged.close()
    destination.close()


def test_the_line_closing_is_heard_at_once() -> None:
    source, destination = _pair()
    threading.Timer(0.1, source.close).start()
    started = time.monotonic()
    assert not destination.wait_for(COMMIT, 30)
    assert time.monotonic() - started < 10
    destination.close()


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"], start_new_session=True)


def _agent_dies(guard: Guard) -> None:
    """The agent's end of the guard's pipe closes without `disarm`, as when it is SIGKILLed."""
    assert guard.proc is not None and guard.proc.stdin is not None
    guard.proc.stdin.close()


def test_handover_guard_kills_the_paused_copy_when_the_source_rolls_back() -> None:
    qemu = _sleeper()
    source, destination = _pair()
    guard = Guard("handover", str(qemu.pid), "/nonexistent.qmp", line=destination)
    destination.close()  # the agent's own copy: the guard holds the line now
    _agent_dies(guard)
    source.close()  # the source rolled back (or died) without `commit`
    assert qemu.wait(20) is not None
    assert guard.proc is not None and guard.proc.wait(20) == 0


def test_disarmed_handover_guard_leaves_the_vm_alone() -> None:
    qemu = _sleeper()
    source, destination = _pair()
    guard = Guard("handover", str(qemu.pid), "/nonexistent.qmp", line=destination)
    guard.disarm()
    source.close()
    time.sleep(0.3)
    assert qemu.poll() is None
    qemu.kill()
    qemu.wait()
    destination.close()


def test_quit_guard_waits_for_running_and_never_acts_without_it() -> None:
    source, destination = _pair()
    guard = Guard("quit", "/nonexistent.qmp", line=source)
    source.close()
    _agent_dies(guard)
    destination.close()  # no `running`: the guard leaves the paused source as it is and exits
    assert guard.proc is not None and guard.proc.wait(20) == 0
