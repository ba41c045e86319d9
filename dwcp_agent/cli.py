"""`dwcp-agent` command line: serve, migrate, status, cancel, gen-image, demo, and component commands.

Exit status: 0 success, 1 the operation failed (a migration did not complete), 2 bad usage or
bad configuration (the message names the key).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dwcp_agent import __version__
from dwcp_agent.acp import cli as acp_cli
from dwcp_agent.client import TOKEN_ENV, ApiError, api_call, follow, use_token_file
from dwcp_agent.config import FIELDS, ConfigError, load_config, parse_size
from dwcp_agent.live.cli import add_live_arguments
from dwcp_agent.progress import human_bytes, human_rate, summary
from dwcp_agent.rollout import cli as rollout_cli
from dwcp_agent.security import pki_cli

DEFAULT_AGENT = "http://127.0.0.1:8080"
EXIT_FAILED = 1
EXIT_USAGE = 2


# ---------------------------------------------------------------------------------------------
# serve

SERVE_FLAGS = {  # flag -> config key
    "data_port": "data_port", "admin_port": "admin_port", "state_dir": "state_dir", "node_id": "node_id",
    "psk_file": "psk_file", "log_level": "log_level", "listen_host": "listen_host", "admin_host": "admin_host",
    "admin_token_file": "admin_token_file",
}


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {key: getattr(args, flag) for flag, key in SERVE_FLAGS.items()}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(key, "--set expects KEY=VALUE")
        values[key.strip()] = value
    return values


def cmd_serve(args: argparse.Namespace) -> int:
    from dwcp_agent.agent import Agent
    from dwcp_agent.telemetry.logs import setup_logging

    config = load_config(args.config, overrides=_overrides(args))
    setup_logging(config.log_level, config.node_id)
    agent = Agent(config, config_loader=lambda: load_config(args.config, overrides=_overrides(args)))
    asyncio.run(agent.run())
    return 0


# ---------------------------------------------------------------------------------------------
# migrate / status / cancel

def cmd_migrate(args: argparse.Namespace) -> int:
    if args.live_vm:
        from dwcp_agent.live.cli import migrate_live

        return migrate_live(args)
    if not args.source or not args.dest_path:
        print("dwcp-agent migrate: either --vm (live) or --source and --dest-path (image) are required",
              file=sys.stderr)
        return EXIT_USAGE
    body: dict[str, Any] = {"source": args.source, "to": args.to, "dest_path": args.dest_path}
    if args.vm_id:
        body["vm_id"] = args.vm_id
    if args.migration_id:
        body["migration_id"] = args.migration_id
    if args.protocol:
        body["protocol"] = args.protocol
    started = api_call(args.agent, "POST", "/api/v3/migrations", body)
    if args.no_wait:
        print(json.dumps(started) if args.json else started["id"])
        return 0
    try:
        final = follow(args.agent, started["id"], show_progress=not args.json)
    except KeyboardInterrupt:
        api_call(args.agent, "DELETE", f"/api/v3/migrations/{started['id']}")
        print("\ncancelled", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(final, indent=1) if args.json else summary(final))
    return 0 if final["state"] == "completed" else EXIT_FAILED


def _emit(data: Any, output: str) -> bool:
    """Print `data` as JSON or YAML when asked; False for the human formats."""
    if output == "json":
        print(json.dumps(data, indent=1))
    elif output == "yaml":
        import yaml

        print(yaml.safe_dump(data, sort_keys=False), end="")
    else:
        return False
    return True


def cmd_status(args: argparse.Namespace) -> int:
    output = "json" if args.json else args.output
    if args.id:
        data = api_call(args.agent, "GET", f"/api/v3/migrations/{args.id}")
        if not _emit(data, output):
            print(summary(data))
        return 0
    data = api_call(args.agent, "GET", "/api/v3/migrations")
    if _emit(data, output):
        return 0
    rows = data["migrations"]
    if not rows:
        print("no migrations")
        return 0
    wide = output == "wide"
    header = f"{'ID':<18} {'STATE':<11} {'VM':<16} {'DONE':>20} {'RATE':>12}"
    if wide:
        header += f" {'MODE':<10} {'STREAMS':>14} {'CC':<6} {'DURATION':>9} {'ATTEMPTS':>8} {'ERROR':<14}"
    print(header + "  DESTINATION")
    for m in rows:
        done = f"{human_bytes(m['done_bytes'])}/{human_bytes(m['total_bytes'])}"
        rate = human_rate(m["throughput_bytes_per_second"]) if m.get("throughput_bytes_per_second") else "-"
        line = f"{m['id']:<18} {m['state']:<11} {m['vm_id'][:16]:<16} {done:>20} {rate:>12}"
        if wide:
            used = m.get("streams_used") or {}
            streams = f"{used.get('peak', 0)}/{used.get('final', 0)}/{used.get('mean', 0):g}" if used else "-"
            line += (f" {m.get('mode') or '-':<10} {streams:>14} {m.get('tcp_congestion') or '-':<6} "
                     f"{m.get('duration_s', 0):>8.1f}s {m.get('attempts', 0):>8} {m.get('error_type') or '-':<14}")
        print(f"{line}  {m['destination']}:{m['dest_path']}")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    """Validate a configuration (file < environment) exactly as `serve` would, starting nothing."""
    config = load_config(args.config)
    problems = []
    try:
        if len(config.psk_bytes) < 16:
            problems.append("psk: a pre-shared key of at least 16 bytes is required (psk_file or psk)")
    except ConfigError as exc:
        problems.append(str(exc))
    if problems:
        for problem in problems:
            print(f"dwcp-agent: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        import dataclasses

        values = dataclasses.asdict(config)
        values["psk"] = "<set>" if values["psk"] else ""
        print(json.dumps(values, indent=1))
    else:
        source = args.config or "defaults and environment"
        print(f"configuration OK ({source}): stream_count {config.stream_count or 'auto'}, "
              f"compression {config.compression_algo}, transport {config.transport_mode}, "
              f"network mode {config.network_mode}, state_dir {config.state_dir}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    data = api_call(args.agent, "DELETE", f"/api/v3/migrations/{args.id}")
    print(json.dumps(data, indent=1) if args.json else f"migration {data['id']}: {data['state']}")
    return 0


# ---------------------------------------------------------------------------------------------
# gen-image / demo

def cmd_gen_image(args: argparse.Namespace) -> int:
    from dwcp_agent.migration.images import PROFILES, generate

    if args.profile not in PROFILES:
        print(f"unknown profile {args.profile!r}; choose from {', '.join(PROFILES)}", file=sys.stderr)
        return EXIT_USAGE
    started = time.monotonic()
    path = generate(args.path, args.size, args.profile, args.seed)
    print(f"wrote {path}: {human_bytes(args.size)} {args.profile} seed {args.seed} "
          f"in {time.monotonic() - started:.1f} s")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.live:
        from dwcp_agent.live.demo import run_live_demo

        return run_live_demo(args.dirty_mbps)
    from dwcp_agent.demo import run_demo

    return run_demo(args.size, args.state_dir, args.streams, args.codec, args.profile)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run benchmarks/run_all.py from the source tree this package was installed from."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "run_all.py").is_file():
        print("dwcp-agent: the benchmarks ship with the source tree; run this from a checkout "
              "(pip install -e .) or use `make bench` there", file=sys.stderr)
        return EXIT_USAGE
    sys.path.insert(0, str(root))
    from benchmarks.run_all import main as run_all

    return run_all((["--quick"] if args.quick else []) + (["--only", *args.only] if args.only else []))


# ---------------------------------------------------------------------------------------------
# parser

def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _agent_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agent", default=DEFAULT_AGENT, metavar="URL",
                   help=f"admin URL of the local agent (default {DEFAULT_AGENT})")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dwcp-agent",
        description="Per-node agent that migrates VM state between hosts over DWCP v3 "
                    "(multi-stream transport, page-aware compression, verified and resumable).",
        epilog="Exit status: 0 success, 1 operation failed, 2 bad usage or configuration.")
    parser.add_argument("--version", action="version", version=f"dwcp-agent {__version__}")
    parser.add_argument("--token-file", metavar="FILE",
                        help=f"admin token for the commands that call the agent (default: ${TOKEN_ENV}, "
                             "else /var/lib/dwcp-agent/admin.token)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    keys = ", ".join(sorted(FIELDS))
    p = sub.add_parser("serve", help="run the agent (data listener + admin HTTP server)",
                       description="Run the agent until SIGTERM/SIGINT. Configuration: defaults < YAML file "
                                   "(--config or DWCP_CONFIG) < environment (STREAM_COUNT, COMPRESSION_ALGO, "
                                   "TRANSPORT_MODE, TRACE_SAMPLING, FEATURE_FLAG_ROLLOUT, ENABLE_V3, DWCP_<KEY>) "
                                   "< these flags.",
                       epilog=f"Config keys: {keys}.")
    p.add_argument("--config", metavar="FILE", help="YAML configuration file")
    p.add_argument("--data-port", type=int, help="data listener port (default 9876)")
    p.add_argument("--admin-port", type=int, help="admin HTTP port (default 8080)")
    p.add_argument("--listen-host", help="data listener address (default 0.0.0.0)")
    p.add_argument("--admin-host", help="admin HTTP address (default 127.0.0.1)")
    p.add_argument("--admin-token-file", help="admin bearer token file, created if missing "
                                              "(default STATE_DIR/admin.token)")
    p.add_argument("--state-dir", help="state directory (default /var/lib/dwcp-agent)")
    p.add_argument("--node-id", help="name of this agent (default: host name)")
    p.add_argument("--psk-file", help="file holding the pre-shared key that authenticates peers")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="log threshold")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="set any config key (repeatable)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("migrate", help="migrate an image to another agent, with a progress bar",
                       description="Ask the local agent to migrate SOURCE to the agent at HOST:PORT, show "
                                   "progress (bytes, rate, ETA, live streams), then a summary. Exit 0 only when the "
                                   "destination committed the image with a verified digest.",
                       epilog="Ctrl-C cancels the running migration (the agent stops it and the destination "
                              "discards its partial image; the source is never modified), then exits 1. "
                              "With --no-wait, Ctrl-C has nothing to cancel: use `dwcp-agent cancel ID`.")
    p.add_argument("--source", metavar="PATH", help="image file on this host")
    p.add_argument("--to", required=True, metavar="HOST:PORT", help="data address of the destination agent")
    p.add_argument("--dest-path", metavar="PATH", help="absolute path on the destination host (images)")
    p.add_argument("--vm-id", metavar="ID", help="VM identifier (default: source file name)")
    p.add_argument("--migration-id", metavar="ID", help="migration identifier (default: random)")
    p.add_argument("--protocol", choices=("v1", "v3"), help="force a protocol profile (default: rollout)")
    p.add_argument("--no-wait", action="store_true", help="start the migration and return its id")
    add_live_arguments(p)
    _agent_opts(p)
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("status", help="list migrations, or show one",
                       description="List this agent's migrations (also those ended before a restart), or show "
                                   "one migration in detail.")
    p.add_argument("id", nargs="?", help="migration id")
    p.add_argument("-o", "--output", choices=("text", "wide", "json", "yaml"), default="text",
                   help="output format: text (default), wide (mode, streams peak/final/mean, congestion control, "
                        "duration, attempts, error), json or yaml")
    _agent_opts(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("config", help="configuration tools (config check)",
                       description="Configuration tools that start nothing.")
    config_sub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    c = config_sub.add_parser("check", help="validate a configuration without starting anything",
                              description="Load the configuration as `serve` would (defaults < YAML file < "
                                          "environment), validate every key and the pre-shared key, and report. "
                                          "Exit 0 when valid, 2 naming the first bad key otherwise.")
    c.add_argument("--config", metavar="FILE", help="YAML configuration file (default $DWCP_CONFIG)")
    c.add_argument("--json", action="store_true", help="print the resulting configuration as JSON")
    c.set_defaults(func=cmd_config_check)

    p = sub.add_parser("cancel", help="cancel a running migration",
                       description="Cancel a migration: the destination discards its partial image; the source "
                                   "image is never modified.")
    p.add_argument("id", help="migration id")
    _agent_opts(p)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("gen-image", help="write a synthetic VM memory image",
                       description="Write a deterministic synthetic VM memory image (same size, profile and seed "
                                   "give the same bytes). Profiles: vm-mix (zero, duplicate, text, binary, random "
                                   "pages), idle-vm, random, zero.")
    p.add_argument("path", help="output file")
    p.add_argument("--size", type=_size, default=_size("1GiB"), help="size, e.g. 1GiB, 512MiB (default 1GiB)")
    p.add_argument("--profile", default="vm-mix", help="page mix profile (default vm-mix)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=cmd_gen_image)

    p = sub.add_parser("demo", help="two local agents migrate a VM image, with progress and summary",
                       description="Start two agents on loopback (own ports and state directories), migrate a "
                                   "synthetic VM image between them with the progress bar, print the summary, "
                                   "and stop both agents. Exit 0 when the digest was verified.")
    p.add_argument("--size", type=_size, default=_size("1GiB"), help="image size (default 1GiB)")
    p.add_argument("--profile", default="vm-mix", help="image profile (default vm-mix)")
    p.add_argument("--streams", type=int, default=0, help="data streams (default 0 = tuned online by PBA)")
    p.add_argument("--codec", default="auto", choices=("auto", "none", "lz4", "zstd", "snappy"),
                   help="compression (default auto)")
    p.add_argument("--state-dir", default="demo-state", help="where the demo keeps images and state")
    p.add_argument("--live", action="store_true",
                   help="instead: boot the test guest (tools/guest) and live-migrate it between two agents")
    p.add_argument("--dirty-mbps", type=int, default=0, help="with --live: guest dirties memory at this rate")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="run the benchmarks (results in benchmarks/results/)",
                       description="Run the benchmarks of the source tree (data path against iperf3, HDE "
                                   "kernels against numpy/memcpy and the zstd/lz4 tools, WAN profiles, consensus "
                                   "against PySyncObj/etcd) and write JSON plus summary.md to benchmarks/results/.")
    p.add_argument("--quick", action="store_true", help="small inputs (minutes instead of tens of minutes)")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="kernels, datapath, hde, repeat_migration, acp, prediction, wan")
    p.set_defaults(func=cmd_bench)

    acp_cli.register(sub)
    rollout_cli.register(sub)
    pki_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    use_token_file(args.token_file)
    try:
        result: int = args.func(args)
        return result
    except ConfigError as exc:
        print(f"dwcp-agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ApiError as exc:
        print(f"dwcp-agent: {exc}", file=sys.stderr)
        return EXIT_USAGE if exc.status == 400 else EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
