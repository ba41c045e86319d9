"""A running test guest and a watcher of its heartbeat, for tests, benchmarks and the demo.

`GuestVm` starts QEMU with QMP on a unix socket and the serial console appended to a file.
`Heartbeats` tails serial files (the source's, then the destination's) and stamps every
`HB <seq> <boot_id> <ms>` line with the host's clock, so a test can check continuity (the
sequence goes on, same boot id: no reboot) and measure the gap a migration caused.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from guest.build import Guest, guest_command, machine_args

_BEAT = re.compile(rb"HB (\d+) ([0-9a-f-]+) (\d+)")
# TCG boots in ~11 s on an idle 2-core host; several times that when the host is loaded.
BOOT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Beat:
    host_t: float
    seq: int
    boot_id: str
    source: str  # which serial file it came from


class Heartbeats:
    """Tails serial files in a thread; `beats` in arrival order."""

    def __init__(self, *paths: Path) -> None:
        self.paths = list(paths)
        self.beats: list[Beat] = []
        self._offsets: dict[Path, int] = {}
        self._partial: dict[Path, bytes] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def add(self, path: Path) -> None:
        with self._lock:
            self.paths.append(path)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                paths = list(self.paths)
            for path in paths:
                self._poll(path)
            time.sleep(0.01)

    def _poll(self, path: Path) -> None:
        try:
            with path.open("rb") as f:
                f.seek(self._offsets.get(path, 0))
                data = f.read()
        except FileNotFoundError:
            return
        if not data:
            return
        now = time.monotonic()
        self._offsets[path] = self._offsets.get(path, 0) + len(data)
        data = self._partial.pop(path, b"") + data
        lines = data.split(b"\n")
        self._partial[path] = lines.pop()
        for line in lines:
            match = _BEAT.search(line)
            if match:
                self.beats.append(Beat(now, int(match.group(1)), match.group(2).decode(), path.name))

    def wait_for(self, count: int, timeout: float, source: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len([b for b in self.beats if source is None or b.source == source]) >= count:
                return
            time.sleep(0.05)
        raise TimeoutError(f"fewer than {count} heartbeats from {source or 'any'} after {timeout:.0f} s")

    def last(self, source: str) -> Beat | None:
        mine = [b for b in self.beats if b.source == source]
        return mine[-1] if mine else None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


@dataclass
class Continuity:
    """What the heartbeats say about a migration from serial file `a` to serial file `b`."""

    last_source_seq: int
    first_dest_seq: int
    same_boot: bool
    gap_s: float

    @property
    def continued(self) -> bool:
        """Same boot, and the sequence goes on. A line the guest wrote to its UART in the last
        instant before the source paused can be lost with the serial backend's buffer, so the
        destination may start one or two beats (100 ms each) later; a reboot or a stall cannot
        pass this."""
        return self.same_boot and self.last_source_seq < self.first_dest_seq <= self.last_source_seq + 3


def continuity(beats: list[Beat], source: str, dest: str) -> Continuity:
    src = [b for b in beats if b.source == source]
    dst = [b for b in beats if b.source == dest]
    if not src or not dst:
        raise AssertionError(f"no heartbeats from {'source' if not src else 'destination'}")
    return Continuity(src[-1].seq, dst[0].seq, src[-1].boot_id == dst[0].boot_id, dst[0].host_t - src[-1].host_t)


class GuestVm:
    """One QEMU running the test guest."""

    def __init__(self, guest: Guest, qmp_socket: Path, serial_log: Path, mem_mib: int = 256,
                 dirty_mbps: int = 0, dirty_mb: int = 0, accel: str = "tcg") -> None:
        self.qmp_socket = qmp_socket
        self.serial_log = serial_log
        self.argv = guest_command(guest, qmp_socket, serial_log, mem_mib, dirty_mbps, dirty_mb, accel)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> GuestVm:
        self.qmp_socket.parent.mkdir(parents=True, exist_ok=True)
        self.qmp_socket.unlink(missing_ok=True)
        with self.serial_log.with_suffix(".qemu.log").open("wb") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def destination_template(guest: Guest, serial_dir: Path, mem_mib: int = 256, dirty_mbps: int = 0,
                         dirty_mb: int = 0, accel: str = "tcg") -> str:
    """The destination agent's live_qemu_command for this guest: machine args + serial file."""
    argv = machine_args(guest, mem_mib, dirty_mbps, dirty_mb, accel)
    argv += ["-chardev", f"file,id=serial0,path={serial_dir}/{{vm_id}}.dest.serial", "-serial", "chardev:serial0"]
    return shlex.join(argv)


def qemu_pids_under(root: Path) -> list[int]:
    """Live QEMU processes with an argument under `root` (ours, never another test's)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0]
            if (os.path.basename(argv[0]).startswith(b"qemu-system") and state != "Z"
                    and any(str(root).encode() in arg for arg in argv)):
                pids.append(int(proc.name))
    return pids


def kill_qemus_under(root: Path) -> None:
    for pid in qemu_pids_under(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
