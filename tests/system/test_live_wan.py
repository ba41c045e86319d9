"""Live migration of the real guest between two agents in two network namespaces (WAN bed).

The source QEMU runs on the host (its QMP socket is a path, reachable from any namespace); the
source agent runs in namespace a, the destination agent in b and starts the destination QEMU
there. Every byte of QEMU's stream and return path crosses the shaped veth pair.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import wanbed
from guest.build import Guest
from guest.vm import BOOT_TIMEOUT_S, GuestVm, Heartbeats, continuity, destination_template
from live_support import kill_qemus_under, qemu_pids_under, require_guest

from dwcp_agent.client import api_call

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def guest() -> Guest:
    return require_guest()


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dlw-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _api(bed: wanbed.WanBed, side: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    with bed.enter(side):
        return api_call(f"http://127.0.0.1:{wanbed.BedAgent.ADMIN_PORT}", method, path, body, timeout=120)


def _migrate_between_namespaces(bed: wanbed.WanBed, guest: Guest, root: Path, dirty_mbps: int,
                                timeout: float) -> tuple[dict[str, Any], Any]:
    psk = root / "psk"
    psk.write_text(secrets.token_hex(32))
    qmp_dir = root / "qmp"
    qmp_dir.mkdir()
    dirty_mb = 64 if dirty_mbps else 0
    vm = GuestVm(guest, qmp_dir / "vm1.sock", root / "vm1.src.serial", 256, dirty_mbps, dirty_mb).start()
    dest_serial = root / "vm1.dest.serial"
    beats = Heartbeats(vm.serial_log, dest_serial)
    template = destination_template(guest, root, 256, dirty_mbps, dirty_mb)
    src = wanbed.BedAgent(bed, "a", root / "src", psk, {"DWCP_QMP_DIR": str(qmp_dir),
                                                        "DWCP_MIGRATION_TARGETS": f"{wanbed.ADDR_B}:*"})
    dst = wanbed.BedAgent(bed, "b", root / "dst", psk, {"DWCP_LIVE_QEMU_COMMAND": template})
    try:
        src.wait_ready()
        dst.wait_ready()
        beats.wait_for(3, BOOT_TIMEOUT_S, vm.serial_log.name)
        started = _api(bed, "a", "POST", "/api/v3/migrations",
                       {"kind": "live", "vm_id": "vm1", "to": dst.address})
        deadline = time.monotonic() + timeout
        while True:
            record = _api(bed, "a", "GET", f"/api/v3/migrations/{started['id']}")
            if record["phase"] in ("completed", "failed", "cancelled") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert record["phase"] == "completed", record
        beats.wait_for(5, 30, dest_serial.name)
        assert not vm.alive() and len(qemu_pids_under(root)) == 1
        owner = _api(bed, "a", "GET", "/api/v3/vms/vm1/owner")["owner"]
        assert owner == f"b-{bed.suffix}"
        return record, continuity(beats.beats, vm.serial_log.name, dest_serial.name)
    finally:
        src.stop()
        dst.stop()
        vm.kill()
        kill_qemus_under(root)
        beats.close()


def test_live_migration_between_namespaces_datacenter_profile(wan_bed, guest: Guest, root: Path) -> None:
    record, gap = _migrate_between_namespaces(wan_bed("datacenter"), guest, root, dirty_mbps=5, timeout=120)
    assert gap.continued, gap
    assert record["committed"] and record["wire_bytes"] > 0


def test_live_migration_over_the_internet_profile(wan_bed, guest: Guest, root: Path) -> None:
    record, gap = _migrate_between_namespaces(wan_bed("internet"), guest, root, dirty_mbps=0, timeout=240)
    assert gap.continued, gap
    assert record["committed"] and record["return_bytes"] > 0
