"""`dwcp-agent cluster status|members|join|leave|switch|reinstate` and `dwcp-agent vm owner|claim`.

Every subcommand talks to the local agent's admin API (`--agent`), which answers from the replicated
registry with linearizable semantics (a read goes through a ReadIndex round or is ordered).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["register"]


def _call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    from dwcp_agent.client import api_call

    return api_call(args.agent, method, path, body)


def _print(args: argparse.Namespace, data: dict[str, Any], text: str) -> int:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    st = _call(args, "GET", "/api/v3/cluster")
    term = f"term {st.get('term')}" if st.get("protocol") == "raft" else f"view {st.get('view')}"
    text = (f"status: {st['status']}\nprotocol: {st.get('protocol')} (epoch {st.get('epoch')}, {term})\n"
            f"leader: {st.get('leader') or '(none)'}\nmembers: {', '.join(sorted(st.get('members', {})))}")
    if st.get("quarantined"):
        text += f"\nquarantined: {', '.join(st['quarantined'])}"
    return _print(args, st, text)


def cmd_members(args: argparse.Namespace) -> int:
    data = _call(args, "GET", "/api/v3/cluster/members")
    leader = data.get("leader", "")
    mark = "\t(leader)"
    lines = [f"{node}\t{addr}{mark if node == leader else ''}" for node, addr in sorted(data["members"].items())]
    return _print(args, data, "\n".join(lines))


def cmd_join(args: argparse.Namespace) -> int:
    data = _call(args, "POST", "/api/v3/cluster/join",
                 {"node_id": args.node_id, "addr": args.addr, "public_key": args.public_key})
    return _print(args, data, f"{args.node_id} joined as {data.get('role', 'voter')}; "
                              f"members: {', '.join(sorted(data['members']))}")


def cmd_key(args: argparse.Namespace) -> int:
    from dwcp_agent.acp.auth import public_key_hex

    key = public_key_hex(args.state_dir)
    print(json.dumps({"public_key": key}) if args.json else key)
    return 0


def cmd_leave(args: argparse.Namespace) -> int:
    data = _call(args, "POST", "/api/v3/cluster/leave", {"node_id": args.node_id})
    return _print(args, data, f"{args.node_id} left; members: {', '.join(sorted(data['members']))}")


def cmd_switch(args: argparse.Namespace) -> int:
    data = _call(args, "POST", "/api/v3/cluster/protocol", {"target": args.protocol, "forced": args.force})
    return _print(args, data, f"protocol: {data['protocol']} (epoch {data['epoch']})")


def cmd_reinstate(args: argparse.Namespace) -> int:
    data = _call(args, "POST", "/api/v3/cluster/reinstate", {"peer": args.peer})
    return _print(args, data, f"{args.peer} reinstated")


def cmd_owner(args: argparse.Namespace) -> int:
    data = _call(args, "GET", f"/api/v3/vms/{args.vm}/owner")
    return _print(args, data, data["owner"] if data["owner"] is not None else "(no owner)")


def cmd_claim(args: argparse.Namespace) -> int:
    data = _call(args, "POST", f"/api/v3/vms/{args.vm}/claim", {"host": args.host})
    return _print(args, data, data["owner"])


def _opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agent", default="http://127.0.0.1:8080", metavar="URL",
                   help="admin URL of the local agent (default http://127.0.0.1:8080)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")


def register(subparsers: Any) -> None:
    """Add the `cluster` and `vm` command groups to the top-level parser."""
    cluster = subparsers.add_parser(
        "cluster", help="consensus cluster: status, members, join, leave, protocol switch",
        description="Inspect and change the ACP consensus cluster through the local agent. Reads are "
                    "linearizable; changes are committed by the running protocol before the command returns.",
        epilog="Exit status: 0 success, 1 refused or no quorum, 2 bad usage.")
    csub = cluster.add_subparsers(dest="cluster_command", metavar="SUBCOMMAND", required=True)
    p = csub.add_parser("status", help="protocol, leader or primary, term or view, members, health",
                        description="Show the cluster as this agent sees it: health (ok, degraded without a "
                                    "leader/primary, down), protocol and epoch, Raft term or PBFT view, leader, "
                                    "members and quarantined peers.")
    _opts(p)
    p.set_defaults(func=cmd_status)
    p = csub.add_parser("members", help="list members and their ACP addresses",
                        description="List the members recorded in the replicated registry with their ACP "
                                    "addresses (host:port); the leader is marked.")
    _opts(p)
    p.set_defaults(func=cmd_members)
    p = csub.add_parser("join", help="add a member (single-server change, Raft)",
                        description="Add NODE_ID at ADDR with its signing key PUBLIC_KEY (pinned in the registry "
                                    "from then on). Start the new agent first with the current members in "
                                    "acp_peers and their keys in acp_peer_keys. It joins as a non-voting "
                                    "learner and becomes a voter once it has caught up from the leader's log "
                                    "or snapshot. Needs Raft (switch first when running PBFT).")
    p.add_argument("node_id", metavar="NODE_ID", help="id of the joining agent (its node_id)")
    p.add_argument("addr", metavar="HOST:PORT", help="ACP address of the joining agent (port 9877 by default)")
    p.add_argument("public_key", metavar="PUBLIC_KEY",
                   help="the joining agent's key: `dwcp-agent cluster key` run on it (64 hex digits)")
    _opts(p)
    p.set_defaults(func=cmd_join)
    p = csub.add_parser("key", help="print this node's ACP signing key (for acp_peer_keys and join)",
                        description="Print this node's Ed25519 public key as 64 hex digits, creating the key in "
                                    "STATE_DIR/acp/node.key if it does not exist yet. Other members pin it with "
                                    "acp_peer_keys (id=KEY), or an admin commits it with `cluster join`.")
    p.add_argument("--state-dir", default="/var/lib/dwcp-agent", help="the agent's state_dir")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    p.set_defaults(func=cmd_key)
    p = csub.add_parser("leave", help="remove a member (single-server change, Raft)",
                        description="Remove NODE_ID from the voting members. A leader that removes itself steps "
                                    "down once the change commits.")
    p.add_argument("node_id", metavar="NODE_ID", help="id of the member to remove")
    _opts(p)
    p.set_defaults(func=cmd_leave)
    p = csub.add_parser("switch", help="switch the consensus protocol (raft or pbft)",
                        description="Commit a protocol switch. The new protocol starts from the registry state "
                                    "at the switch; nothing committed is lost or applied twice. At most one "
                                    "switch per 5 minutes unless --force.")
    p.add_argument("protocol", choices=("raft", "pbft"), help="target protocol")
    p.add_argument("--force", action="store_true", help="ignore the 5-minute switch interval")
    _opts(p)
    p.set_defaults(func=cmd_switch)
    p = csub.add_parser("reinstate", help="clear a quarantined peer on every replica",
                        description="Operator decision after investigating a Byzantine detection: the peer's "
                                    "score is cleared and its messages are accepted again on every replica.")
    p.add_argument("peer", metavar="NODE_ID", help="the quarantined peer")
    _opts(p)
    p.set_defaults(func=cmd_reinstate)

    vm = subparsers.add_parser("vm", help="VM ownership in the replicated registry",
                               description="Read or record which host owns a VM. The registry is the only source "
                                           "of truth: migrations end by committing an ownership transfer.",
                               epilog="Exit status: 0 success, 1 refused or no quorum, 2 bad usage.")
    vsub = vm.add_subparsers(dest="vm_command", metavar="SUBCOMMAND", required=True)
    p = vsub.add_parser("owner", help="print the host that owns VM",
                        description="Print the host that owns VM (linearizable read), or '(no owner)'.")
    p.add_argument("vm", metavar="VM", help="VM id")
    _opts(p)
    p.set_defaults(func=cmd_owner)
    p = vsub.add_parser("claim", help="record HOST as owner of an unowned VM",
                        description="Record HOST as the owner of VM if nobody owns it yet (idempotent for the "
                                    "same host; refused when another host owns it).")
    p.add_argument("vm", metavar="VM", help="VM id")
    p.add_argument("host", metavar="HOST", help="owning host (its node_id)")
    _opts(p)
    p.set_defaults(func=cmd_claim)
