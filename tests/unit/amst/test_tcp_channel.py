"""TcpChannel frames over a real socket pair: scatter-gather payloads arrive whole and in order."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from dwcp_agent import wire
from dwcp_agent.amst.channel import MAX_IOV, TcpChannel


def _receive_all(sock: socket.socket, n: int, out: bytearray) -> None:
    while len(out) < n:
        data = sock.recv(1 << 20)
        if not data:
            return
        out += data


def test_a_payload_of_more_parts_than_one_sendmsg_takes_arrives_intact() -> None:
    """Alternating literal pages give a frame hundreds of parts; the channel must batch them."""
    parts = [memoryview(os.urandom(1 + i % 4096)) for i in range(3 * MAX_IOV + 7)]
    header = b"H" * 56
    expected = header + b"".join(parts)
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # force partial sends mid-part
    got = bytearray()
    reader = threading.Thread(target=_receive_all, args=(b, len(expected), got), daemon=True)
    reader.start()
    try:
        TcpChannel(a).send_frame(header, *parts, b"")
        reader.join(timeout=30)
    finally:
        a.close()
        b.close()
    assert bytes(got) == expected


def test_recv_ack_raises_what_the_attempt_expects() -> None:
    """Attempt._read_acks ends a stream on WireError or OSError: a timeout, a bad header and a
    closed peer must each be one of those, and a good ACK (split across reads) its parsed header."""
    a, b = socket.socketpair()
    with a:
        channel = TcpChannel(b)
        header = bytearray(wire.HEADER_SIZE)
        b.settimeout(0.1)
        with pytest.raises(TimeoutError):
            channel.recv_ack(header)
        b.settimeout(10)
        ack = wire.pack_header(wire.FrameType.ACK, 0, 0, 9, 1, 5, 5 << 20, 0, 0, 0, wire.PROTOCOL_VERSION)
        a.sendall(ack[:20])
        threading.Timer(0.05, a.sendall, args=(ack[20:],)).start()
        assert channel.recv_ack(header).sequence == 5
        a.sendall(b"\0" * wire.HEADER_SIZE)  # no magic
        with pytest.raises(wire.FrameError):
            channel.recv_ack(header)
        a.close()
        with pytest.raises(wire.PeerClosed):
            channel.recv_ack(header)
        channel.close()
