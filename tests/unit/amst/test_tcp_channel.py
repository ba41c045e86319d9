"""TcpChannel frames over a real socket pair: scatter-gather payloads arrive whole and in order."""

from __future__ import annotations

import os
import socket
import threading

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
