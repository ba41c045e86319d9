"""Network of a nemesis run: one network namespace per node, joined by a bridge in a hub namespace.

Nothing is created in the host's own namespace: the bridge, the addresses (10.77.0.0/24) and the
test's client sockets (threads enter the hub with `NetnsScope`) all live in namespaces named after
this process (`cons<pid><tag>...`), so concurrent runs cannot collide and `down()` removes all.

Faults use what this kernel has (no netem; the helpers are tools/netns.py's, shared with the WAN
bed): partitions are iptables DROP rules in the receiving node's namespace (both directions, or
one for a one-way cut), loss is `-m statistic` random DROP, delay is tools/nfq-delay on an
NFQUEUE rule.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Sequence

import netns

HUB_ADDR = "10.77.0.254"
QUEUE_NUM = 11


def node_addr(index: int) -> str:
    return f"10.77.0.{index + 1}"


class NemesisNet:
    """`n` node namespaces behind one bridge; see the module docstring."""

    def __init__(self, n: int, tag: str) -> None:
        self.prefix = f"cons{os.getpid() % 100000}{tag}"
        self.hub = f"{self.prefix}h"
        self.nodes = [f"{self.prefix}n{i}" for i in range(n)]
        self._created: list[str] = []
        self._delayers: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> NemesisNet:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        netns.add(self.hub)
        self._created.append(self.hub)
        self.run(self.hub, ["ip", "link", "add", "br0", "type", "bridge"])
        self.run(self.hub, ["ip", "addr", "add", f"{HUB_ADDR}/24", "dev", "br0"])
        self.run(self.hub, ["ip", "link", "set", "br0", "up"])
        self.run(self.hub, ["ip", "link", "set", "lo", "up"])
        for i, ns in enumerate(self.nodes):
            netns.add(ns)
            self._created.append(ns)
            netns.run(["ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{i}",
                  "netns", self.hub])
            self.run(self.hub, ["ip", "link", "set", f"p{i}", "master", "br0"])
            self.run(self.hub, ["ip", "link", "set", f"p{i}", "up"])
            self.run(ns, ["ip", "addr", "add", f"{node_addr(i)}/24", "dev", "eth0"])
            self.run(ns, ["ip", "link", "set", "eth0", "up"])
            self.run(ns, ["ip", "link", "set", "lo", "up"])

    def down(self) -> None:
        for proc in self._delayers:
            netns.stop(proc)
        self._delayers.clear()
        for ns in reversed(self._created):
            netns.delete(ns)
        self._created.clear()

    # ------------------------------------------------------------ running inside
    def cmd(self, ns: str, argv: Sequence[str]) -> list[str]:
        return netns.cmd(ns, argv)

    def run(self, ns: str, argv: Sequence[str]) -> None:
        netns.run(self.cmd(ns, argv))

    def enter_hub(self) -> netns.NetnsScope:
        """Context in which the calling thread's sockets reach the nodes (through the bridge)."""
        return netns.NetnsScope(self.hub)

    # ------------------------------------------------------------ faults
    def partition(self, groups: Iterable[Iterable[int]]) -> None:
        """Nodes in different groups cannot exchange packets (both directions)."""
        sets = [set(g) for g in groups]
        for a, group in enumerate(sets):
            for other in sets[:a] + sets[a + 1:]:
                for i in group:
                    for j in other:
                        self._drop(i, j)

    def one_way(self, senders: Iterable[int], receivers: Iterable[int]) -> None:
        """Packets from `senders` to `receivers` are dropped; the reverse direction still works."""
        for j in receivers:
            for i in senders:
                self._drop(j, i)

    def bridge(self, left: Iterable[int], middle: int, right: Iterable[int]) -> None:
        """`middle` talks to everyone; `left` and `right` cannot reach each other."""
        self.partition([set(left), set(right)])
        del middle

    def loss(self, probability: float) -> None:
        """Random loss on every node's ingress from the other nodes (the hub's clients unaffected)."""
        for ns in self.nodes:
            netns.drop_randomly(ns, ["!", "-s", HUB_ADDR], probability)

    def delay(self, seconds: float) -> None:
        """One-way delay on every node's ingress from the other nodes (nfq-delay)."""
        for ns in self.nodes:
            self._delayers.append(netns.start_delayer(ns, ["!", "-s", HUB_ADDR], QUEUE_NUM, seconds))

    def heal(self) -> None:
        """Remove every rule and delayer: the network is whole again."""
        for ns in self.nodes:
            netns.flush_input(ns)
        for proc in self._delayers:
            netns.stop(proc)
        self._delayers.clear()

    def _drop(self, at: int, source: int) -> None:
        self.run(self.nodes[at], ["iptables", "-w", "-A", "INPUT", "-s", node_addr(source), "-j", "DROP"])

