"""`dwcp-agent rollout status|set N|rollback|unfreeze` and `dwcp-agent sla-report`.

The rollout commands talk to the local agent's admin API (`--agent`, default
http://127.0.0.1:8080), which accepts changes from loopback only. `sla-report` reads the
Prometheus HTTP API and prints the monthly SLA report of the ops guide as markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

DEFAULT_AGENT = "http://127.0.0.1:8080"

__all__ = ["register"]


def _call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    from dwcp_agent.client import api_call

    return api_call(args.agent, method, path, body, timeout=10.0)


def _print_state(args: argparse.Namespace, state: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(state, indent=1))
        return
    changed = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(state.get("changed_at") or 0))
    v3 = "enabled" if state.get("enable_v3") else "DISABLED (ENABLE_V3=false)"
    print(f"rollout: {state['percentage']}% of migrations on protocol v3, v3 {v3}")
    print(f"frozen:  {'YES - run `dwcp-agent rollout unfreeze` to allow changes' if state['frozen'] else 'no'}")
    print(f"last change: {state.get('reason') or '-'} by {state.get('changed_by') or '-'} at {changed} "
          f"(version {state.get('version')})")


def cmd_status(args: argparse.Namespace) -> int:
    state = _call(args, "GET", "/api/v3/rollout")
    if args.json:
        sla = _call(args, "GET", "/api/v3/sla")
        print(json.dumps({"rollout": state, "decision": sla["decision"], "violations": sla["violations"]},
                         indent=1))
        return 0
    _print_state(args, state)
    sla = _call(args, "GET", "/api/v3/sla")
    line = f"SLA guard: {sla['decision']}"
    if sla["violations"]:
        line += f" ({', '.join(sla['violations'])})"
    if sla.get("rollback_in_s") is not None and not state["frozen"] and state["percentage"] > 0:
        line += f", automatic rollback in {sla['rollback_in_s']:.0f} s"
    print(line)
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    _print_state(args, _call(args, "POST", "/api/v3/rollout", {"percentage": args.percentage}))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    _print_state(args, _call(args, "POST", "/api/v3/rollout/rollback", {"reason": args.reason or ""}))
    return 0


def cmd_unfreeze(args: argparse.Namespace) -> int:
    _print_state(args, _call(args, "POST", "/api/v3/rollout/unfreeze", {}))
    return 0


def cmd_sla_report(args: argparse.Namespace) -> int:
    from dwcp_agent.rollout.report import PrometheusError, build_report, month_range

    try:
        start, end = month_range(args.month)
    except ValueError as exc:
        print(f"dwcp-agent: --month: {exc}", file=sys.stderr)
        return 2
    try:
        report = build_report(args.prometheus, start, end, now=time.time())
    except PrometheusError as exc:
        print(f"dwcp-agent: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report.data, indent=1) if args.json else report.markdown, end="" if not args.json else "\n")
    return 0


def _percentage(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError("must be 0..100")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agent", default=DEFAULT_AGENT, metavar="URL",
                   help=f"admin URL of the local agent (default {DEFAULT_AGENT})")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")


def register(subparsers: Any) -> None:
    """Add `rollout` and `sla-report` to the `dwcp-agent` command line."""
    rollout = subparsers.add_parser(
        "rollout", help="show or change the v3 protocol rollout",
        description="Show or change which share of migrations uses protocol profile v3. An automatic "
                    "rollback (SLA guard NO-GO) sets 0% and freezes the rollout until `unfreeze`.")
    sub = rollout.add_subparsers(dest="rollout_command", metavar="ACTION", required=True)
    p = sub.add_parser("status", help="percentage, frozen flag, SLA guard decision")
    _common(p)
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("set", help="set the v3 percentage (refused while frozen)")
    p.add_argument("percentage", type=_percentage, help="0..100")
    _common(p)
    p.set_defaults(func=cmd_set)
    p = sub.add_parser("rollback", help="send every new migration to v1 and freeze the rollout")
    p.add_argument("--reason", help="free text recorded with the rollback")
    _common(p)
    p.set_defaults(func=cmd_rollback)
    p = sub.add_parser("unfreeze", help="allow `set` again after a rollback")
    _common(p)
    p.set_defaults(func=cmd_unfreeze)

    p = subparsers.add_parser(
        "sla-report", help="monthly SLA report (markdown) from Prometheus",
        description="Build the ops guide's monthly SLA report from the Prometheus HTTP API: availability, "
                    "P99 latency, error rate, throughput, downtime and error budget, incidents (critical "
                    "alerts that fired), migrations and bytes moved.")
    p.add_argument("--prometheus", required=True, metavar="URL", help="Prometheus base URL, e.g. http://prometheus:9090")
    p.add_argument("--month", required=True, metavar="YYYY-MM", help="calendar month (UTC)")
    p.add_argument("--json", action="store_true", help="print the report's numbers as JSON")
    p.set_defaults(func=cmd_sla_report)
