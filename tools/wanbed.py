"""WAN emulation test bed: two network namespaces joined by a veth pair, shaped by profile.

This kernel has no netem, so each direction is shaped with what it does have: `tbf` on the
sender's veth for the rate, `iptables -m statistic` on the receiver's ingress for random loss,
and `nfq-delay` (tools/nfq-delay, an NFQUEUE program) on the receiver's ingress for half the
RTT. TSO/GSO/GRO are off on the veths so loss and delay apply per wire-sized packet.

Shared by tests/system and benchmarks (put tools/ on sys.path). `WanBed` is a context manager;
everything it creates is removed on exit, also when setup fails half-way.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import netns
from netns import NFQ_DELAY, NFQ_DIR, TOOLS, NetnsScope

__all__ = ["ADDR_A", "ADDR_B", "NFQ_DELAY", "PROFILES", "BedAgent", "BedError", "BulkFlows", "NetnsScope",
           "Profile", "WanBed", "unsupported_reason"]

ADDR_A = "10.200.0.1"
ADDR_B = "10.200.0.2"
QUEUE_NUM = 7
# Per-namespace TCP buffer ceilings: large enough for one flow to cover 2 x BDP of every profile.
TCP_MEM = "4096 131072 134217728"
# A bed command failed; the message carries the command and its stderr.
BedError = netns.NetnsError


@dataclass(frozen=True)
class Profile:
    """One emulated path: round-trip delay, random loss per packet, and rate (0 = unshaped)."""

    name: str
    rtt_s: float
    loss: float
    rate_bps: int

    @property
    def bdp_bytes(self) -> int:
        """Bandwidth-delay product of the nominal path."""
        return int(self.rate_bps / 8 * self.rtt_s)


PROFILES: dict[str, Profile] = {
    "datacenter": Profile("datacenter", 0.0, 0.0, 0),
    "metro": Profile("metro", 0.005, 0.0, 10_000_000_000),
    "internet": Profile("internet", 0.050, 0.001, 1_000_000_000),
    "bad-internet": Profile("bad-internet", 0.150, 0.01, 100_000_000),
}


def unsupported_reason() -> str | None:
    """Why the test bed cannot run here, or None when it can (tests skip with this text)."""
    if os.geteuid() != 0:
        return "WAN test bed needs root (network namespaces, tc, iptables)"
    for tool in ("ip", "tc", "iptables", "ethtool"):
        if shutil.which(tool) is None:
            return f"WAN test bed needs '{tool}' on PATH"
    if not Path("/proc/self/ns/net").exists():
        return "WAN test bed needs network namespace support in the kernel"
    if not NFQ_DELAY.exists():
        if shutil.which("make") is None or shutil.which("gcc") is None:
            return "WAN test bed needs tools/nfq-delay built (make -C tools/nfq-delay)"
        done = subprocess.run(["make", "-s", "-C", str(NFQ_DIR)], capture_output=True, text=True)
        if done.returncode != 0:
            return f"cannot build tools/nfq-delay: {done.stderr.strip()[-300:]}"
    probe = f"dwcpchk{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _tbf_args(rate_bps: int, rtt_s: float) -> list[str]:
    """tbf rate/burst/limit: a 1 ms burst and a bottleneck queue of half a BDP (at least 10 ms).

    The burst is never below 64 KiB + a frame: the stack can still hand tbf a GSO-sized packet,
    and one larger than the burst would sit at the head of the queue forever.
    """
    rate_bytes = rate_bps // 8
    burst = max(66 * 1024, rate_bytes // 1000)
    limit = max(256 * 1024, int(rate_bytes * max(rtt_s, 0.010) / 2))
    return ["rate", f"{rate_bps}bit", "burst", str(burst), "limit", str(limit)]


class WanBed:
    """Namespaces `a` and `b` (addresses ADDR_A, ADDR_B) joined by one veth pair, shaped by `profile`."""

    def __init__(self, profile: Profile | str, suffix: str | None = None) -> None:
        self.profile = PROFILES[profile] if isinstance(profile, str) else profile
        self.suffix = suffix or secrets.token_hex(3)
        self.ns = {"a": f"dwcpa{self.suffix}", "b": f"dwcpb{self.suffix}"}
        self.dev = {"a": f"dwa{self.suffix}", "b": f"dwb{self.suffix}"}
        self.addr = {"a": ADDR_A, "b": ADDR_B}
        self._delayers: list[subprocess.Popen[bytes]] = []
        self._children: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []

    # --- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> WanBed:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()

    def up(self) -> None:
        """Create both namespaces, the veth pair and the shaping of `profile`."""
        for side in ("a", "b"):
            netns.add(self.ns[side])
            self._created.append(self.ns[side])
        netns.run(["ip", "link", "add", self.dev["a"], "netns", self.ns["a"], "type", "veth",
              "peer", "name", self.dev["b"], "netns", self.ns["b"]])
        for side in ("a", "b"):
            ns, dev = self.ns[side], self.dev[side]
            netns.run(["ip", "-n", ns, "addr", "add", f"{self.addr[side]}/24", "dev", dev])
            netns.run(["ip", "-n", ns, "link", "set", "lo", "up"])
            netns.run(["ip", "-n", ns, "link", "set", dev, "up"])
            self.run(side, ["ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off"], check=False)
            self.run(side, ["sysctl", "-q", "-w", f"net.ipv4.tcp_wmem={TCP_MEM}",
                            f"net.ipv4.tcp_rmem={TCP_MEM}"])
        self.shape(self.profile)

    def shape(self, profile: Profile) -> None:
        """Apply `profile` to a running bed (rate, loss and delay replaced in both directions)."""
        self._unshape()
        self.profile = profile
        for side in ("a", "b"):
            dev = self.dev[side]
            if profile.rate_bps:
                self.run(side, ["tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                                *_tbf_args(profile.rate_bps, profile.rtt_s)])
            if profile.loss:
                netns.drop_randomly(self.ns[side], ["-i", dev], profile.loss)
            if profile.rtt_s:
                self._delayers.append(netns.start_delayer(self.ns[side], ["-i", dev], QUEUE_NUM, profile.rtt_s / 2))

    def set_default_congestion(self, name: str) -> bool:
        """The congestion control a socket gets unless it asks (net.ipv4.tcp_congestion_control), in
        both namespaces: e.g. "cubic" for a bed that behaves like a stock host. False when this
        host does not let it be set (a container without the sysctl) and it is not already so."""
        for side in ("a", "b"):
            done = self.run(side, ["sysctl", "-q", "-w", f"net.ipv4.tcp_congestion_control={name}"], check=False)
            current = self.run(side, ["cat", "/proc/sys/net/ipv4/tcp_congestion_control"]).stdout.strip()
            if done.returncode != 0 and current != name:
                return False
        return True

    def set_rate(self, rate_bps: int) -> None:
        """Change only the tbf rate, in both directions (the prediction benchmark's rate trace)."""
        for side in ("a", "b"):
            # A new qdisc, not `replace`: changing a live tbf keeps its backlog, and a queued packet
            # larger than the new burst would never leave.
            self.run(side, ["tc", "qdisc", "del", "dev", self.dev[side], "root"], check=False)
            self.run(side, ["tc", "qdisc", "add", "dev", self.dev[side], "root", "tbf",
                            *_tbf_args(rate_bps, self.profile.rtt_s)])
        self.profile = Profile(self.profile.name, self.profile.rtt_s, self.profile.loss, rate_bps)

    def down(self) -> None:
        """Stop every process started here and delete both namespaces (the veths and rules go too)."""
        for proc in self._children + self._delayers:
            netns.stop(proc)
        self._children.clear()
        self._delayers.clear()
        for ns in self._created:
            netns.delete(ns)
        self._created.clear()

    def _unshape(self) -> None:
        for side in ("a", "b"):
            netns.flush_input(self.ns[side])
            self.run(side, ["tc", "qdisc", "del", "dev", self.dev[side], "root"], check=False)
        for proc in self._delayers:
            netns.stop(proc)
        self._delayers.clear()

    # --- running things inside ------------------------------------------------------------
    def cmd(self, side: str, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped to run inside namespace `side` ('a' or 'b')."""
        return netns.cmd(self.ns[side], argv)

    def run(self, side: str, argv: Sequence[str], check: bool = True, timeout: float = 120,
            **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside namespace `side` and wait; stdout/stderr captured as text."""
        done = subprocess.run(self.cmd(side, argv), capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and done.returncode != 0:
            raise BedError(f"{' '.join(argv)} in {self.ns[side]} failed ({done.returncode}): "
                           f"{done.stderr.strip()}")
        return done

    def popen(self, side: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside namespace `side`; it is stopped by `down()` if still running."""
        proc = subprocess.Popen(self.cmd(side, argv), **kwargs)
        self._children.append(proc)
        return proc

    def enter(self, side: str) -> NetnsScope:
        """Context in which the calling thread's sockets live in namespace `side` (setns)."""
        return NetnsScope(self.ns[side])


class BedAgent:
    """A `dwcp-agent serve` process inside one namespace of a bed (data 9876, admin 127.0.0.1:8080)."""

    DATA_PORT = 9876
    ADMIN_PORT = 8080

    def __init__(self, bed: WanBed, side: str, state_dir: Path, psk_file: Path,
                 env: dict[str, str] | None = None, python: str | None = None) -> None:
        import sys

        from dwcp_agent.security.pki import ensure_ca

        self.bed, self.side = bed, side
        self.state_dir = state_dir
        self.images = state_dir / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self.log_path = state_dir / "agent.log"
        self.python = python or sys.executable
        cmd = [self.python, "-m", "dwcp_agent", "serve", "--node-id", f"{side}-{bed.suffix}",
               "--state-dir", str(state_dir), "--data-port", str(self.DATA_PORT), "--listen-host",
               bed.addr[side], "--admin-port", str(self.ADMIN_PORT), "--admin-host", "127.0.0.1",
               "--psk-file", str(psk_file), "--set", f"dest_dirs={self.images}", "--set",
               f"source_dirs={self.images}",
               # the other side of the bed is this agent's one migration target (not loopback)
               "--set", f"migration_targets={bed.addr['b' if side == 'a' else 'a']}:{self.DATA_PORT}",
               "--set", f"tls_auto_issue_ca_dir={ensure_ca(psk_file.parent / 'cluster-ca')}"]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = bed.popen(side, cmd, stdout=self._log, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})}, cwd=str(TOOLS.parent))

    @property
    def address(self) -> str:
        return f"{self.bed.addr[self.side]}:{self.DATA_PORT}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll /health from inside the namespace until the agent reports ready."""
        import json
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BedError(f"agent in {self.bed.ns[self.side]} exited {self.proc.returncode}; "
                               f"see {self.log_path}")
            try:
                with self.bed.enter(self.side), urllib.request.urlopen(
                        f"http://127.0.0.1:{self.ADMIN_PORT}/health", timeout=1.0) as resp:
                    if json.loads(resp.read()).get("ready"):
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise BedError(f"agent in {self.bed.ns[self.side]} not ready after {timeout:.0f} s")

    def migrate(self, source: Path, dest: BedAgent, dest_path: Path, timeout: float = 600) -> dict[str, Any]:
        """Run `dwcp-agent migrate --json` in this agent's namespace; returns the final record."""
        import json

        token = ["--token-file", str(self.state_dir / "admin.token")]  # where the agent writes it
        done = self.bed.run(self.side, [self.python, "-m", "dwcp_agent", *token, "migrate", "--agent",
                                        f"http://127.0.0.1:{self.ADMIN_PORT}", "--source", str(source),
                                        "--to", dest.address, "--dest-path", str(dest_path), "--json"],
                            check=False, timeout=timeout, cwd=str(TOOLS.parent))
        if done.returncode != 0:
            raise BedError(f"migrate failed ({done.returncode}): {done.stderr.strip()[-500:]} "
                           f"{done.stdout.strip()[-500:]}")
        record: dict[str, Any] = json.loads(done.stdout)
        return record

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the agent process (all its threads) has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def scrape(self) -> str:
        """The agent's /metrics text (from inside its namespace)."""
        import urllib.request

        with self.bed.enter(self.side), urllib.request.urlopen(
                f"http://127.0.0.1:{self.ADMIN_PORT}/metrics", timeout=10) as resp:
            return str(resp.read().decode())

    def stop(self) -> None:
        netns.stop(self.proc)
        self._log.close()


class BulkFlows:
    """`streams` TCP connections pushing zeros from namespace a to a sink in b, for measuring.

    The sockets (`socks`) are the senders' own, so PBA can read TCP_INFO from them.
    """

    def __init__(self, bed: WanBed, streams: int = 4, congestion: str = "", port: int = 5301,
                 send_buffer: int = 0) -> None:
        import socket
        import threading

        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        with bed.enter("b"):
            self._listener = socket.create_server((bed.addr["b"], port), backlog=streams)
        self.socks: list[socket.socket] = []
        try:
            with bed.enter("a"):
                for _ in range(streams):
                    sock = socket.socket()
                    if congestion:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
                    if send_buffer:
                        sock.setsockopt(socket.SOL_SOCKET, 32, send_buffer)  # SO_SNDBUFFORCE
                    sock.connect((bed.addr["b"], port))
                    self.socks.append(sock)
            for _ in range(streams):
                conn, _ = self._listener.accept()
                self._spawn(self._sink, conn)
        except BaseException:
            self.close()
            raise
        for sock in self.socks:
            self._spawn(self._push, sock)

    def _spawn(self, target: Any, sock: Any) -> None:
        import threading

        thread = threading.Thread(target=target, args=(sock,), daemon=True)
        self._threads.append(thread)
        thread.start()

    def _push(self, sock: Any) -> None:
        payload = bytes(1 << 20)
        try:
            while not self._stop.is_set():
                sock.sendall(payload)
        except OSError:
            pass

    def _sink(self, conn: Any) -> None:
        buf = bytearray(1 << 20)
        try:
            with conn:
                while not self._stop.is_set() and conn.recv_into(buf):
                    pass
        except OSError:
            pass

    def __enter__(self) -> BulkFlows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop pushing and close every socket (the sinks see EOF)."""
        import socket

        self._stop.set()
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._listener.close()
        for thread in self._threads:
            thread.join(5)
