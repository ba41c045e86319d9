"""Findings 5 and 6: what a peer that has proven nothing can make the data and ACP ports do.

Before: a 56-byte header made the data port allocate 64 MiB; the 10 s timeout was per read, so a
trickle held a connection for ever; a Hello decoded to ~19x its size; one thread per connection
with no cap, and one failed thread start killed the accept loop while /health said ok; a peer's
node_id went into log lines whole, one line per refusal.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
import xxhash
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dwcp_agent import wire
from dwcp_agent.acp.auth import KeyRing
from dwcp_agent.acp.runtime.transport import Transport
from dwcp_agent.migration.server import DataServer
from tests.security.security_support import CA_DIRNAME, PSK, attacker_context, closed_within, first_flight, open_raw

MiB = 1 << 20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_large_preauth_frame_is_refused_before_any_allocation(tmp_path: Path,
                                                              data_server: Callable[..., DataServer]) -> None:
    server = data_server()
    ctx = attacker_context(tmp_path / CA_DIRNAME)
    header = wire.pack_header(wire.FrameType.CONTROL, 0, 0, 0, 0, 0, 0, 60 * MiB, 60 * MiB, 0)
    before = _rss_bytes()
    socks = [open_raw(server.port, ctx) for _ in range(6)]
    for sock in socks:
        sock.sendall(header)
    time.sleep(0.5)
    grown = _rss_bytes() - before
    try:
        assert all(closed_within(sock, 2.0) for sock in socks), "a pre-auth 60 MiB frame kept its connection"
    finally:
        for sock in socks:
            sock.close()
    assert grown < 64 * MiB, f"RSS grew {grown >> 20} MiB for six 56-byte headers"


def test_handshake_frame_over_the_preauth_limit_is_refused_unread() -> None:
    a, b = socket.socketpair()
    a.settimeout(3)
    try:
        b.sendall(wire.pack_header(wire.FrameType.CONTROL, 0, 0, 0, 0, 0, 0, 64 * 1024, 64 * 1024, 0))
        with pytest.raises(wire.FrameError) as refused:
            wire.server_handshake(a, PSK, "receiver")
        assert refused.value.error_type == "bad_length"
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("field", ["versions", "capabilities", "trace"])
def test_hello_lists_and_maps_are_bounded_when_decoded(field: str) -> None:
    """Under 4 KiB on the wire, but a list of 1500 items: refused, not decoded into ~19x its size."""
    big: dict[str, object] = {"versions": [3] * 1500, "capabilities": ["x"] * 1500,
                              "trace": {str(i): "" for i in range(500)}}
    hello = wire.Hello([3], "peer", b"n" * wire.NONCE_BYTES, "control")
    payload = msgspec.msgpack.encode({**msgspec.structs.asdict(hello), field: big[field], "type": "hello"})
    assert len(payload) < 4096  # within the pre-auth frame limit
    header = wire.pack_header(wire.FrameType.CONTROL, 0, 0, 0, 0, 0, 0, len(payload), len(payload),
                              xxhash.xxh3_64_intdigest(payload))
    with pytest.raises(wire.FrameError):
        wire.decode_message(wire.unpack_header(header), payload)


@pytest.mark.slow
def test_a_trickle_cannot_hold_the_handshake(tmp_path: Path, data_server: Callable[..., DataServer]) -> None:
    """One byte every 0.5 s keeps every per-read timeout happy; the handshake deadline (10 s) still ends it."""
    server = data_server()
    ctx = attacker_context(tmp_path / CA_DIRNAME)
    flight = first_flight(ctx)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    closed_at = None
    start = time.monotonic()
    try:
        for i in range(min(len(flight), 30)):  # at most 15 s of trickling
            try:
                sock.sendall(flight[i:i + 1])
            except OSError:
                closed_at = time.monotonic() - start
                break
            if closed_within(sock, 0.5):
                closed_at = time.monotonic() - start
                break
    finally:
        sock.close()
    assert closed_at is not None and closed_at < 13, "a trickling peer held the handshake past its deadline"


def test_connections_are_capped_per_source_address(data_server: Callable[..., DataServer]) -> None:
    server = data_server(max_connections_per_source=4)
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(7)]
    try:
        time.sleep(0.3)
        closed = [closed_within(sock, 0.5) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    assert closed.count(True) == 3 and closed[:4] == [False] * 4


def test_accept_loop_survives_a_failed_thread_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    data_server: Callable[..., DataServer]) -> None:
    server = data_server()
    real_start = threading.Thread.start
    failed: list[str] = []

    def start_once_failing(self: threading.Thread) -> None:
        if not failed and self.name != "data-accept":
            failed.append(self.name)
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start_once_failing)
    ctx = attacker_context(tmp_path / CA_DIRNAME, "source")
    first = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    time.sleep(0.3)
    monkeypatch.setattr(threading.Thread, "start", real_start)
    assert failed, "the server started no thread for the first connection"
    second = open_raw(server.port, ctx)
    try:
        peer = wire.client_handshake(second, PSK, "source", "control")
        assert peer.node_id == "receiver"
    finally:
        first.close()
        second.close()
    assert server.accepting


def test_health_reports_a_stopped_accept_loop(data_server: Callable[..., DataServer]) -> None:
    server = data_server()
    assert server.accepting and server.health()["accepting"] is True
    server._sock.shutdown(socket.SHUT_RDWR)  # the listener dies under the loop (as with a fatal accept error)
    deadline = time.monotonic() + 3
    while server.accepting and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.accepting and server.health()["accepting"] is False


def test_peer_node_id_is_truncated_in_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                           data_server: Callable[..., DataServer]) -> None:
    server = data_server()
    ctx = attacker_context(tmp_path / CA_DIRNAME, "mallory")
    sock = open_raw(server.port, ctx)
    caplog.set_level(logging.WARNING)
    try:
        with pytest.raises(wire.WireError):
            wire.client_handshake(sock, PSK, "N" * 250, "control", versions=(7,))
    finally:
        sock.close()
    time.sleep(0.3)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "NNNN" in text  # the refusal was logged...
    assert "N" * 80 not in text  # ...with the peer's string cut short


def test_refusal_logs_are_rate_limited(caplog: pytest.LogCaptureFixture,
                                       data_server: Callable[..., DataServer]) -> None:
    server = data_server()
    caplog.set_level(logging.WARNING)
    for _ in range(40):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"\x16\x03\x01\x00\x05garbage-not-a-peer" + bytes(64))
            closed_within(sock, 2.0)
    time.sleep(0.3)
    refusals = [r for r in caplog.records if "refused connection" in r.getMessage()]
    assert 1 <= len(refusals) <= 15, f"{len(refusals)} refusal lines for 40 bad connections"


def test_acp_port_refuses_a_large_preauth_frame_at_once() -> None:
    async def scenario() -> bool:
        ring = KeyRing("a", Ed25519PrivateKey.generate())
        transport = Transport("a", b"k" * 32, ring, lambda p, e: None, connect_timeout=5.0)
        await transport.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", transport.port)
            writer.write(struct.pack(">I", 16 * MiB) + b"x" * 1024)
            await writer.drain()
            try:
                data = await asyncio.wait_for(reader.read(), 1.5)
                closed = data == b""
            except TimeoutError:
                closed = False
            except OSError:
                closed = True
            writer.close()
            return closed
        finally:
            await transport.stop()

    assert asyncio.run(scenario()), "the ACP port waited for a 16 MiB frame from an unauthenticated peer"

