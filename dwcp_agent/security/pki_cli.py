"""`dwcp-agent pki init|issue|rotate|trust|retire`: the cluster CA and node certificates, made offline.

An operator runs `pki init` once (the CA key stays on that machine), `pki issue` per node (copy
node.pem, node.key and ca.pem into the node's tls_dir), and `pki rotate` to renew: agents load
changed files for their next connection, so no restart is needed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from dwcp_agent.security import pki

__all__ = ["register"]
Command = Callable[[argparse.Namespace], int]


def _out(args: argparse.Namespace) -> pki.NodeFiles:
    return pki.NodeFiles.in_dir(Path(args.out))


def cmd_init(args: argparse.Namespace) -> int:
    cert = pki.init_ca(Path(args.ca_dir), args.name)
    print(f"cluster CA written to {cert} (key {Path(args.ca_dir) / pki.CA_KEY}, keep it off the nodes)")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    cert = pki.issue_node(Path(args.ca_dir), args.node_id, _out(args), args.days)
    print(f"node certificate for {args.node_id} in {args.out} (node.pem, node.key, ca.pem), "
          f"valid until {cert.not_valid_after_utc:%Y-%m-%d}")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    if args.ca:
        pki.rotate_ca(Path(args.ca_dir))
        print(f"new CA in {args.ca_dir}: `pki trust` it on every node, then `pki rotate` each node, "
              "then `pki retire` the old CA")
        return 0
    if not args.node_id or not args.out:
        print("dwcp-agent pki rotate: --node-id and --out are required (or --ca)", file=sys.stderr)
        return 2
    cert = pki.issue_node(Path(args.ca_dir), args.node_id, _out(args), args.days)
    print(f"rotated {args.node_id}: new key and certificate in {args.out}, valid until "
          f"{cert.not_valid_after_utc:%Y-%m-%d}; running agents use it for new connections")
    return 0


def cmd_trust(args: argparse.Namespace) -> int:
    added = pki.trust_cas(Path(args.ca_dir), Path(args.bundle))
    print(f"added {added} CA certificate(s) to {args.bundle}")
    return 0


def cmd_retire(args: argparse.Namespace) -> int:
    dropped = pki.retire_old_cas(Path(args.ca_dir), Path(args.bundle))
    print(f"dropped {dropped} old CA certificate(s) from {args.bundle}")
    return 0


def _run(func: Command) -> Command:
    """PKI errors (missing CA, bad key) are reported in one line with exit status 1."""
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except pki.PkiError as exc:
            print(f"dwcp-agent pki: {exc}", file=sys.stderr)
            return 1
    return wrapped


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("pki", help="cluster CA and node certificates for the encrypted channels",
                       description="Make the cluster CA and node certificates (TLS 1.3, mutual) that protect the "
                                   "data and consensus ports. See docs/security-channels.md.")
    pki_sub = p.add_subparsers(dest="pki_command", metavar="ACTION", required=True)

    q = pki_sub.add_parser("init", help="make a cluster CA (ca.pem, ca.key)")
    q.add_argument("--ca-dir", required=True, help="directory for ca.pem and ca.key")
    q.add_argument("--name", default="dwcp cluster CA", help="CA common name")
    q.set_defaults(func=_run(cmd_init))

    for name, func, text in (("issue", cmd_issue, "issue a node certificate"),
                             ("rotate", cmd_rotate, "renew a node certificate (or, with --ca, the CA)")):
        q = pki_sub.add_parser(name, help=text)
        q.add_argument("--ca-dir", required=True, help="directory made by `pki init`")
        q.add_argument("--node-id", required=name == "issue", help="the node's node_id (its identity)")
        q.add_argument("--out", required=name == "issue", help="the node's tls_dir (node.pem, node.key, ca.pem)")
        q.add_argument("--days", type=int, default=pki.NODE_DAYS, help=f"validity (default {pki.NODE_DAYS})")
        if name == "rotate":
            q.add_argument("--ca", action="store_true", help="start a CA rotation instead")
        q.set_defaults(func=_run(func))

    q = pki_sub.add_parser("trust", help="add the CA certificates of a CA directory to a node's trust bundle")
    q.add_argument("--ca-dir", required=True, help="directory made by `pki init`")
    q.add_argument("--bundle", required=True, help="a node's ca.pem")
    q.set_defaults(func=_run(cmd_trust))

    q = pki_sub.add_parser("retire", help="drop CAs other than the current one from a trust bundle")
    q.add_argument("--ca-dir", required=True, help="directory made by `pki init`")
    q.add_argument("--bundle", required=True, help="a node's ca.pem")
    q.set_defaults(func=_run(cmd_retire))
