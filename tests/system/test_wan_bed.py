"""The WAN test bed shapes what it says it shapes, and leaves nothing behind."""

from __future__ import annotations

import socket
import statistics
import subprocess
import time
from collections.abc import Callable

import pytest
import wanbed

pytestmark = pytest.mark.system

Bed = Callable[[wanbed.Profile | str], wanbed.WanBed]


def tcp_rtts(bed: wanbed.WanBed, count: int = 10) -> list[float]:
    """Application-level round trips of 64-byte messages from a to an echo server in b."""
    with bed.enter("b"):
        listener = socket.create_server((wanbed.ADDR_B, 5302))
    import threading

    def echo() -> None:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(64):
                conn.sendall(data)

    server = threading.Thread(target=echo, daemon=True)
    server.start()
    with bed.enter("a"):
        sock = socket.create_connection((wanbed.ADDR_B, 5302), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    with sock:
        for _ in range(count):
            t0 = time.monotonic()
            sock.sendall(b"x" * 64)
            got = 0
            while got < 64:
                got += len(sock.recv(64 - got))
            rtts.append(time.monotonic() - t0)
    server.join(5)
    listener.close()
    return rtts


@pytest.mark.parametrize("profile", ["metro", "internet", "bad-internet"])
def test_round_trip_matches_the_profile(wan_bed: Bed, profile: str) -> None:
    bed = wan_bed(profile)
    rtt = statistics.median(tcp_rtts(bed, 7 if profile == "bad-internet" else 10))
    want = wanbed.PROFILES[profile].rtt_s
    assert want <= rtt < want * 2 + 0.005, (profile, rtt)  # the delay is a floor; load only adds


def test_rate_and_loss_are_applied_per_packet(wan_bed: Bed) -> None:
    bed = wan_bed(wanbed.Profile("lossy-slow", 0.0, 0.02, 50_000_000))
    drops = bed.run("b", ["iptables", "-w", "-L", "INPUT", "-v", "-x", "-n"]).stdout
    assert "statistic mode random probability 0.02" in drops
    qdisc = bed.run("a", ["tc", "qdisc", "show", "dev", bed.dev["a"]]).stdout
    assert "tbf" in qdisc and "50Mbit" in qdisc
    offload = bed.run("a", ["ethtool", "-k", bed.dev["a"]]).stdout
    assert "tcp-segmentation-offload: off" in offload
    assert "generic-segmentation-offload: off" in offload


def test_everything_is_removed_on_exit_also_after_a_failure(wan_supported: None) -> None:
    with pytest.raises(RuntimeError), wanbed.WanBed("internet") as bed:
        names = dict(bed.ns)
        delayers = [p.pid for p in bed._delayers]
        assert delayers
        raise RuntimeError("test failure inside the bed")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert names["a"] not in listed and names["b"] not in listed
    for pid in delayers:
        assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
