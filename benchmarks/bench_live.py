"""Live migration of a real QEMU guest on the WAN bed: QEMU direct vs through the agents.

For each profile (datacenter, internet) and workload (idle; dirtying ~25 MB/s over 64 MiB), in
one bed and one run, the same guest (tools/guest) is migrated:
- directly by QEMU over TCP between the namespaces: plain; multifd 4; multifd 4 + zstd;
- through the agents (source agent in a, destination agent in b, default settings).
Reported: total time, QEMU's downtime, wire bytes, convergence actions, and whether the guest's
heartbeat went on at the destination (same boot). A variant that does not finish within the
bound is reported as such (and cancelled). Ratios only against the direct variants of the same run.

    .venv/bin/python -m benchmarks.bench_live [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import wanbed  # noqa: E402
from guest.build import Guest, build_guest, guest_command  # noqa: E402
from guest.build import unsupported_reason as guest_unsupported  # noqa: E402
from guest.vm import GuestVm, Heartbeats, destination_template, kill_qemus_under  # noqa: E402

from benchmarks.harness import standalone  # noqa: E402
from dwcp_agent.client import TOKEN_ENV, api_call  # noqa: E402
from dwcp_agent.live.qmp import QemuControl  # noqa: E402

DIRTY_MBPS = 25
DIRTY_MB = 64
PORT = 4445
VARIANTS = {"plain": {}, "multifd4": {"multifd-channels": 4},
            "multifd4-zstd": {"multifd-channels": 4, "multifd-compression": "zstd"}}


def _boot(bed: wanbed.WanBed, guest: Guest, root: Path, name: str, mem: int, dirty: int,
          incoming: bool) -> tuple[Any, Path, Path]:
    qmp, serial = root / f"{name}.qmp", root / f"{name}.serial"
    argv = guest_command(guest, qmp, serial, mem, dirty, DIRTY_MB if dirty else 0, incoming=incoming)
    proc = bed.popen("b" if incoming else "a", argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not qmp.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc, qmp, serial


async def _direct(src_qmp: Path, dst_qmp: Path, params: dict[str, Any], bound_s: float) -> dict[str, Any]:
    async with QemuControl(src_qmp) as src, QemuControl(dst_qmp) as dst:
        caps = ["multifd"] if params else []
        if caps:
            await src.set_capabilities(caps)
            await dst.set_capabilities(caps)
            await src.set_parameters(params)
            await dst.set_parameters(params)
        await dst.migrate_incoming(f"tcp:{wanbed.ADDR_B}:{PORT}")
        await asyncio.sleep(0.3)
        started = time.monotonic()
        await src.migrate(f"tcp:{wanbed.ADDR_B}:{PORT}")
        while True:
            info = await src.query_migrate()
            if info.status in ("completed", "failed") or time.monotonic() - started > bound_s:
                break
            await asyncio.sleep(0.1)
        if info.status != "completed":
            with contextlib.suppress(Exception):
                await src.cancel()
            return {"finished": False, "status": info.status, "seconds": round(time.monotonic() - started, 1),
                    "bound_s": bound_s}
        await dst.cont()
        return {"finished": True, "seconds": (info.total_time_ms or 0) / 1000, "downtime_ms": info.downtime_ms,
                "wire_bytes": info.transferred_bytes, "iterations": info.iterations}


def _guest_view(beats: Heartbeats, src_serial: Path, dst_serial: Path) -> dict[str, Any]:
    """Did the guest go on at the destination (same boot, next beat), and the heartbeat gap the
    guest saw (host clock, last beat on the source to first on the destination; includes the
    100 ms beat period): the like-for-like downtime, whatever QEMU counts in its own."""
    with contextlib.suppress(TimeoutError):
        beats.wait_for(3, 20, dst_serial.name)
    src = [b for b in beats.beats if b.source == src_serial.name]
    dst = [b for b in beats.beats if b.source == dst_serial.name]
    if not (src and dst):
        return {"guest_continued": False, "guest_gap_ms": None}
    return {"guest_continued": src[-1].boot_id == dst[0].boot_id and dst[0].seq == src[-1].seq + 1,
            "guest_gap_ms": round((dst[0].host_t - src[-1].host_t) * 1000)}


def direct_run(bed: wanbed.WanBed, guest: Guest, root: Path, variant: str, mem: int, dirty: int,
               bound_s: float) -> dict[str, Any]:
    src, src_qmp, src_serial = _boot(bed, guest, root, f"d-{variant}-{dirty}-src", mem, dirty, False)
    dst, dst_qmp, dst_serial = _boot(bed, guest, root, f"d-{variant}-{dirty}-dst", mem, dirty, True)
    beats = Heartbeats(src_serial, dst_serial)
    try:
        beats.wait_for(3, 120, src_serial.name)
        result = asyncio.run(_direct(src_qmp, dst_qmp, VARIANTS[variant], bound_s))
        if result["finished"]:
            result.update(_guest_view(beats, src_serial, dst_serial))
        return result
    finally:
        beats.close()
        for proc in (src, dst):
            proc.kill()
            proc.wait()


def agent_run(bed: wanbed.WanBed, guest: Guest, root: Path, mem: int, dirty: int, bound_s: float) -> dict[str, Any]:
    tag = f"a-{dirty}"
    psk = root / f"{tag}.psk"
    psk.write_text(secrets.token_hex(32))
    qmp_dir = root / f"{tag}-qmp"
    qmp_dir.mkdir()
    vm = GuestVm(guest, qmp_dir / "vm1.sock", root / f"{tag}.src.serial", mem, dirty, DIRTY_MB if dirty else 0)
    vm.start()
    serial_dir = root / tag
    serial_dir.mkdir()
    dst_serial = serial_dir / "vm1.dest.serial"
    beats = Heartbeats(vm.serial_log, dst_serial)
    template = destination_template(guest, serial_dir, mem, dirty, DIRTY_MB if dirty else 0)
    src = wanbed.BedAgent(bed, "a", root / f"{tag}-src", psk, {"DWCP_QMP_DIR": str(qmp_dir),
                                                               "DWCP_MIGRATION_TARGETS": f"{wanbed.ADDR_B}:*"})
    dst = wanbed.BedAgent(bed, "b", root / f"{tag}-dst", psk, {"DWCP_LIVE_QEMU_COMMAND": template})
    try:
        src.wait_ready()
        dst.wait_ready()
        beats.wait_for(3, 120, vm.serial_log.name)
        with bed.enter("a"):
            url = f"http://127.0.0.1:{wanbed.BedAgent.ADMIN_PORT}"
            record = api_call(url, "POST", "/api/v3/migrations", {"kind": "live", "vm_id": "vm1", "to": dst.address},
                              timeout=120)
            started = time.monotonic()
            while record["phase"] not in ("completed", "failed", "cancelled"):
                if time.monotonic() - started > bound_s:
                    record = api_call(url, "DELETE", f"/api/v3/migrations/{record['id']}")
                    break
                time.sleep(0.2)
                record = api_call(url, "GET", f"/api/v3/migrations/{record['id']}")
        done = record["phase"] == "completed"
        return {"finished": done, "status": record["phase"], "seconds": record["duration_s"],
                "downtime_ms": record["downtime_ms"], "wire_bytes": record["wire_bytes"],
                "stream_bytes": record["stream_bytes"], "iterations": record["iteration"],
                "convergence_actions": [a["action"] for a in record["actions"]],
                "postcopy_used": record["postcopy_used"], "throttle_used": record["throttle_used"],
                **(_guest_view(beats, vm.serial_log, dst_serial) if done else {})}
    finally:
        src.stop()
        dst.stop()
        vm.kill()
        beats.close()
        kill_qemus_under(root)


def run(quick: bool) -> dict[str, Any]:
    reason = wanbed.unsupported_reason() or guest_unsupported()
    if reason:
        return {"skipped": reason}
    guest = build_guest()
    if not os.environ.get(TOKEN_ENV):  # the agents and api_call share one admin token
        token = Path(tempfile.mkdtemp(prefix="dlb-token-")) / "admin.token"
        token.write_text(secrets.token_urlsafe(32))
        token.chmod(0o600)
        os.environ[TOKEN_ENV] = str(token)
    mem = 256 if quick else 1024
    profiles = ("datacenter",) if quick else ("datacenter", "internet")
    workloads = {"idle": 0, "dirty25": DIRTY_MBPS}
    result: dict[str, Any] = {"guest_mib": mem, "accel": "tcg", "dirty_mbps": DIRTY_MBPS, "profiles": {}}
    for profile in profiles:
        bound_s = 60.0 if quick else 300.0
        rows: dict[str, Any] = {}
        root = Path(tempfile.mkdtemp(prefix="dlb-"))
        try:
            with wanbed.WanBed(profile) as bed:
                for workload, dirty in workloads.items():
                    row: dict[str, Any] = {}
                    for variant in (("plain",) if quick else VARIANTS):
                        row[f"qemu-{variant}"] = direct_run(bed, guest, root, variant, mem, dirty, bound_s)
                    row["agents"] = agent_run(bed, guest, root, mem, dirty, bound_s)
                    rows[workload] = row
        finally:
            kill_qemus_under(root)
            shutil.rmtree(root, ignore_errors=True)
        result["profiles"][profile] = rows
    return result


def markdown(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return f"### live\n\nskipped: {result['skipped']}"
    lines = [f"### live ({result['guest_mib']} MiB guest, {result['accel']}, dirty {result['dirty_mbps']} MB/s)", "",
             "| profile | workload | variant | total s | downtime ms (QEMU) | heartbeat gap ms | wire MiB | actions "
             "| guest continued |",
             "|---|---|---|---|---|---|---|---|---|"]
    for profile, rows in result["profiles"].items():
        for workload, row in rows.items():
            for variant, r in row.items():
                total = f"{r['seconds']:.1f}" if r["finished"] else f"not done in {r.get('bound_s', '?')}"
                wire = f"{r['wire_bytes'] / 2**20:.0f}" if r.get("wire_bytes") else "-"
                actions = ", ".join(sorted(set(r.get("convergence_actions", [])))) or "-"
                lines.append(f"| {profile} | {workload} | {variant} | {total} | {r.get('downtime_ms', '-')} | "
                             f"{r.get('guest_gap_ms', '-')} | {wire} | {actions} | {r.get('guest_continued')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    standalone("live", run, __doc__, markdown)
