"""`dwcp-agent demo --live`: boot the test guest under a local agent, live-migrate it to a second
local agent, and show its heartbeat going on at the destination.

The guest builder lives in the source tree (tools/guest), so the demo runs from a checkout.
"""

from __future__ import annotations

import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dwcp_agent.client import api_call
from dwcp_agent.demo import LocalAgent
from dwcp_agent.live.progress import progress_line, summary
from dwcp_agent.live.record import LivePhase

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def run_live_demo(dirty_mbps: int = 0, mem_mib: int = 256) -> int:
    if not (TOOLS / "guest" / "build.py").is_file():
        print("dwcp-agent demo --live: needs the source tree (tools/guest); run it from a checkout",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(TOOLS))
    from guest.build import build_guest, unsupported_reason
    from guest.vm import GuestVm, Heartbeats, continuity, destination_template, kill_qemus_under

    reason = unsupported_reason()
    if reason:
        print(f"dwcp-agent demo --live: {reason}", file=sys.stderr)
        return 2
    print("building (or reusing) the test guest ...", file=sys.stderr)
    guest = build_guest()
    root = Path(tempfile.mkdtemp(prefix="dwcp-live-demo-"))
    psk = root / "psk"
    psk.write_text(secrets.token_hex(32))
    qmp_dir = root / "qmp"
    dirty_mb = 64 if dirty_mbps else 0
    vm = GuestVm(guest, qmp_dir / "demo-vm.sock", root / "demo-vm.src.serial", mem_mib, dirty_mbps, dirty_mb)
    dest_serial = root / "demo-vm.dest.serial"
    beats = Heartbeats(vm.serial_log, dest_serial)
    source = LocalAgent("source", root, psk, None, {"qmp_dir": str(qmp_dir)})
    dest = LocalAgent("destination", root, psk, None,
                      {"live_qemu_command": destination_template(guest, root, mem_mib, dirty_mbps, dirty_mb)})
    final: dict[str, Any] = {}
    try:
        vm.start()
        source.wait_ready()
        dest.wait_ready()
        print("booting the guest under TCG ...", file=sys.stderr)
        beats.wait_for(5, 120, vm.serial_log.name)
        print(f"guest running on the source: heartbeat {beats.last(vm.serial_log.name)}", file=sys.stderr)
        started = api_call(source.url, "POST", "/api/v3/migrations",
                           {"kind": "live", "vm_id": "demo-vm", "to": f"127.0.0.1:{dest.data_port}"}, timeout=120)
        while True:
            final = api_call(source.url, "GET", f"/api/v3/migrations/{started['id']}")
            print(progress_line(final), file=sys.stderr)
            if final["phase"] in LivePhase.done_phases:
                break
            time.sleep(0.3)
        if final["phase"] == LivePhase.COMPLETED:
            beats.wait_for(10, 30, dest_serial.name)
            gap = continuity(beats.beats, vm.serial_log.name, dest_serial.name)
            print(summary(final, guest_gap_ms=gap.gap_s * 1000))
            print(f"guest heartbeat: last on source #{gap.last_source_seq}, first on destination "
                  f"#{gap.first_dest_seq}, same boot: {gap.same_boot}; now "
                  f"#{beats.last(dest_serial.name).seq} on the destination")
        else:
            print(summary(final))
        return 0 if final.get("phase") == LivePhase.COMPLETED else 1
    finally:
        for agent in (source, dest):
            agent.stop()
        vm.kill()
        beats.close()
        kill_qemus_under(root)  # the destination's VM outlives its agent by design
        shutil.rmtree(root, ignore_errors=True)
