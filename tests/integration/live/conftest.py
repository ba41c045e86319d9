"""Two real agents on loopback and a real QEMU guest between them, cleaned up whatever happens.

The guest (tools/guest) is built once and cached; QEMU runs under TCG. Unix sockets live in a
short directory of our own (socket paths are limited to 108 bytes).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from guest.build import Guest
from guest.vm import BOOT_TIMEOUT_S, GuestVm, Heartbeats, continuity, destination_template
from live_support import kill_qemus_under, qemu_pids_under, require_guest

from dwcp_agent.client import ApiError, api_call
from dwcp_agent.demo import LocalAgent

MEM_MIB = 256
DIRTY_MB = 64
END_PHASES = ("completed", "failed", "cancelled")


@pytest.fixture(scope="session")
def guest() -> Guest:
    return require_guest()


class LiveBed:
    """Source agent + destination agent + one guest on the source; helpers to migrate and check."""

    def __init__(self, guest: Guest, root: Path, dirty_mbps: int = 0, dest_mem_mib: int = MEM_MIB,
                 src_settings: dict[str, str] | None = None, dst_settings: dict[str, str] | None = None,
                 src_env: dict[str, str] | None = None) -> None:
        self.guest = guest
        self.root = root
        self.psk = root / "psk"
        self.psk.write_text(secrets.token_hex(32))
        self.qmp_dir = root / "qmp"
        self.qmp_dir.mkdir()
        dirty_mb = DIRTY_MB if dirty_mbps else 0
        self.vm = GuestVm(guest, self.qmp_dir / "vm1.sock", root / "vm1.src.serial", MEM_MIB, dirty_mbps, dirty_mb)
        self.dest_serial = root / "vm1.dest.serial"
        self.beats = Heartbeats(self.vm.serial_log, self.dest_serial)
        template = destination_template(guest, root, dest_mem_mib, dirty_mbps, dirty_mb)
        self.src = LocalAgent("src", root, self.psk, src_env, {"qmp_dir": str(self.qmp_dir), **(src_settings or {})})
        self.dst = LocalAgent("dst", root, self.psk, None, {"live_qemu_command": template, **(dst_settings or {})})

    def boot(self) -> None:
        self.vm.start()
        self.src.wait_ready()
        self.dst.wait_ready()
        self.beats.wait_for(3, BOOT_TIMEOUT_S, self.vm.serial_log.name)

    @property
    def to(self) -> str:
        return f"127.0.0.1:{self.dst.data_port}"

    def start(self, **fields: Any) -> dict[str, Any]:
        body = {"kind": "live", "vm_id": "vm1", "to": self.to, **fields}
        return api_call(self.src.url, "POST", "/api/v3/migrations", body, timeout=90)

    def refused(self, **fields: Any) -> ApiError:
        with pytest.raises(ApiError) as info:
            self.start(**fields)
        return info.value

    def record(self, migration_id: str) -> dict[str, Any]:
        return api_call(self.src.url, "GET", f"/api/v3/migrations/{migration_id}")

    def wait_phase(self, migration_id: str, phases: tuple[str, ...], timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.record(migration_id)
            if record["phase"] in phases:
                return record
            time.sleep(0.1)
        raise AssertionError(f"migration {migration_id} not in {phases} after {timeout:.0f} s: {record}")

    def wait_end(self, migration_id: str, timeout: float = 180) -> dict[str, Any]:
        return self.wait_phase(migration_id, END_PHASES, timeout)

    def owner(self, agent: LocalAgent) -> str | None:
        return api_call(agent.url, "GET", "/api/v3/vms/vm1/owner").get("owner")  # type: ignore[no-any-return]

    def owner_after_kill(self, victim: str) -> str | None:
        """The owner of vm1 in the source agent's ACP registry; a killed source agent is
        restarted (same state directory and ports) to ask it."""
        if victim == "src":
            self.src.start()
            self.src.wait_ready()
        return self.owner(self.src)

    def qemus(self) -> list[int]:
        return qemu_pids_under(self.root)

    def assert_runs_on_source_only(self, more_beats: int = 5) -> None:
        """Exactly one QEMU left (the source), and its guest still beats."""
        deadline = time.monotonic() + 10
        while len(self.qemus()) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert self.qemus() == [self.vm.proc.pid]  # type: ignore[union-attr]
        seen = len([b for b in self.beats.beats if b.source == self.vm.serial_log.name])
        self.beats.wait_for(seen + more_beats, 30, self.vm.serial_log.name)
        beats = [b for b in self.beats.beats if b.source == self.vm.serial_log.name]
        assert len({b.boot_id for b in beats}) == 1, "the guest rebooted"
        assert all(a.seq < b.seq for a, b in itertools.pairwise(beats)), "the heartbeat sequence went back"

    def assert_moved(self, more_beats: int = 5) -> Any:
        """Exactly one QEMU left (the destination's), the guest went on without rebooting."""
        deadline = time.monotonic() + 10
        while self.vm.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not self.vm.alive(), "source QEMU still runs after the migration completed"
        assert len(self.qemus()) == 1
        self.beats.wait_for(more_beats, 30, self.dest_serial.name)
        c = continuity(self.beats.beats, self.vm.serial_log.name, self.dest_serial.name)
        assert c.same_boot, "the guest rebooted"
        assert c.continued, c
        return c

    def beating(self, serial: Path, within: float = 30) -> bool:
        """Whether the guest behind `serial` prints new heartbeats now."""
        seen = len([b for b in self.beats.beats if b.source == serial.name])
        try:
            self.beats.wait_for(seen + 5, within, serial.name)
        except TimeoutError:
            return False
        return True

    def assert_runs_on_destination_only(self) -> None:
        """The guest beats at the destination (same boot, sequence continued); the source is
        paused or gone and prints nothing more."""
        assert self.beating(self.dest_serial)
        c = continuity(self.beats.beats, self.vm.serial_log.name, self.dest_serial.name)
        assert c.continued, c
        assert not self.beating(self.vm.serial_log, within=3), "the source copy runs too"

    def close(self) -> None:
        for agent in (self.src, self.dst):
            with contextlib.suppress(Exception):
                agent.stop(timeout=5)
        self.vm.kill()
        kill_qemus_under(self.root)
        self.beats.close()


@pytest.fixture
def live_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix=f"dl{os.getpid()}-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def make_bed(guest: Guest, live_root: Path) -> Iterator[Any]:
    beds: list[LiveBed] = []

    def make(**kwargs: Any) -> LiveBed:
        bed = LiveBed(guest, live_root, **kwargs)
        beds.append(bed)
        bed.boot()
        return bed

    yield make
    for bed in beds:
        bed.close()
