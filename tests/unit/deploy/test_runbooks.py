"""Runbooks use this agent's real commands: every `dwcp-agent X` is a subcommand of the CLI and
every :8080 path is a route the agent serves."""

from __future__ import annotations

import re

from deploy_support import ROOT

from dwcp_agent.cli import build_parser

RUNBOOKS = sorted((ROOT / "docs" / "runbooks").glob("*.md"))
ROUTES = {"/health", "/metrics", "/metrics/summary", "/api/v3/sla", "/api/v3/rollout", "/api/v3/migrations"}


def subcommands() -> dict[str, set[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    out: dict[str, set[str]] = {}
    for name, p in sub.choices.items():
        nested = [a for a in p._actions if getattr(a, "choices", None) and a.dest.endswith("_command")]
        out[name] = set(nested[0].choices) if nested else set()
    return out


def test_runbooks_call_real_subcommands():
    commands = subcommands()
    assert RUNBOOKS
    for path in [*RUNBOOKS, ROOT / "docs" / "operations.md"]:
        if not path.exists():
            continue
        # a command line starting with dwcp-agent, in a code block or in backticks
        for cmd, action in re.findall(r"(?m)(?:^\s*|`)dwcp-agent (\w[\w-]*)(?: (\w+))?", path.read_text()):
            assert cmd in commands, f"{path.name}: dwcp-agent {cmd} is not a command"
            if commands[cmd] and action:
                assert action in commands[cmd], f"{path.name}: dwcp-agent {cmd} {action} is not a command"


def test_runbooks_curl_real_routes():
    for path in RUNBOOKS:
        for route in re.findall(r"http://127\.0\.0\.1:8080(/[\w/]*)", path.read_text()):
            assert route in ROUTES or route.startswith("/health/"), f"{path.name}: {route}"
