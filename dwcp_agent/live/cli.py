"""`dwcp-agent migrate --vm VM_ID --to HOST:PORT`: start a live migration and follow it."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from dwcp_agent.client import api_call
from dwcp_agent.live.progress import progress_line, summary
from dwcp_agent.live.record import LivePhase

__all__ = ["add_live_arguments", "migrate_live"]

EXIT_FAILED = 1


def add_live_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vm", dest="live_vm", metavar="VM_ID",
                   help="live-migrate the running QEMU VM VM_ID (instead of --source)")
    p.add_argument("--qmp", metavar="PATH", help="QMP socket of the VM (default: qmp_dir/VM_ID.sock)")
    p.add_argument("--dest-qmp", metavar="PATH",
                   help="QMP socket of a destination QEMU started by you with -incoming defer -S "
                        "(default: the destination agent starts one from live_qemu_command)")
    p.add_argument("--downtime-ms", type=int, metavar="N", help="downtime target (default live_downtime_ms)")
    p.add_argument("--policy", metavar="P",
                   help="precopy | auto-converge | postcopy-after:<N>s|<N>i (default live_policy). Once "
                        "postcopy starts the VM runs on the destination: a broken link is then a recovery "
                        "or a lost VM, never a rollback")


def migrate_live(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"kind": "live", "vm_id": args.live_vm, "to": args.to}
    for field, value in (("qmp", args.qmp), ("dest_qmp", args.dest_qmp), ("downtime_ms", args.downtime_ms),
                         ("policy", args.policy)):
        if value is not None:
            body[field] = value
    started = api_call(args.agent, "POST", "/api/v3/migrations", body, timeout=120)
    if args.no_wait:
        print(json.dumps(started) if args.json else started["id"])
        return 0
    try:
        while True:
            m = api_call(args.agent, "GET", f"/api/v3/migrations/{started['id']}")
            if not args.json:
                print(progress_line(m), file=sys.stderr)
            if m["phase"] in LivePhase.done_phases:
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        api_call(args.agent, "DELETE", f"/api/v3/migrations/{started['id']}")
        print("\ncancelled", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(m, indent=1) if args.json else summary(m))
    return 0 if m["phase"] == LivePhase.COMPLETED else EXIT_FAILED
