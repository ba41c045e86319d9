"""The source's native ACK reader (native/stream.pyx AckReader, behind TcpChannel.recv_ack).

ACKs arrive one per chunk, in whatever pieces TCP delivers: the reader must hand them out whole
and in order however they were split or batched, refuse a sealed ACK that was altered, replayed
or reordered (the tag check, as the Python path did), and end on a timeout or a closed peer.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from dwcp_agent import wire
from dwcp_agent._native import stream
from dwcp_agent.amst.channel import TcpChannel
from dwcp_agent.security.sealed import TAG_BYTES, ReferenceFrameKey

KEY = bytes(range(16))
SESSION, STREAM = 0xABCDEF, 2


def _ack(seq: int) -> bytes:
    return wire.pack_header(wire.FrameType.ACK, 0, 0, SESSION, STREAM, seq, seq << 20, 0, 0, 0,
                            wire.PROTOCOL_VERSION)


def _sealed_acks(count: int) -> list[bytes]:
    """ACKs 0..count-1 sealed as the destination seals them (sealed.py: no associated data)."""
    key, out = ReferenceFrameKey(KEY), []
    for seq in range(count):
        sealed = bytearray(wire.HEADER_SIZE + TAG_BYTES)
        key.seal_into(b"", _ack(seq), sealed)
        out.append(bytes(sealed))
    return out


def _send_in_pieces(sock: socket.socket, data: bytes, sizes: tuple[int, ...]) -> threading.Thread:
    """Send `data` cut into pieces of the given sizes in turn, pausing between some, so the reader
    sees ACKs split across reads as well as several in one read."""
    def send() -> None:
        at, i = 0, 0
        while at < len(data):
            n = sizes[i % len(sizes)]
            sock.sendall(data[at: at + n])
            at, i = at + n, i + 1
            if i % 7 == 0:
                time.sleep(0.002)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("sealed", [True, False])
def test_acks_split_and_batched_by_tcp_come_out_whole_and_in_order(sealed: bool) -> None:
    count = 300
    data = b"".join(_sealed_acks(count)) if sealed else b"".join(_ack(i) for i in range(count))
    a, b = socket.socketpair()
    with a, b:
        reader = stream.AckReader(b.fileno(), stream.FrameCipher(KEY) if sealed else None, batch=8)
        sender = _send_in_pieces(a, data, (1, 71, 5000, 13, 72 * 3, 40))
        header = bytearray(wire.HEADER_SIZE)
        got = []
        for _ in range(count):
            assert reader.next_ack(header, 10.0) == 0
            got.append(wire.unpack_header(header).sequence)
        sender.join(10)
    assert got == list(range(count))


@pytest.mark.parametrize("fault", ["altered", "replayed", "reordered"])
def test_an_altered_replayed_or_reordered_sealed_ack_fails_its_tag(fault: str) -> None:
    acks = _sealed_acks(4)
    if fault == "altered":
        bad = bytearray(acks[2])
        bad[20] ^= 0x01  # the sequence field, encrypted
        wire_acks = [acks[0], acks[1], bytes(bad)]
    elif fault == "replayed":
        wire_acks = [acks[0], acks[1], acks[1]]
    else:
        wire_acks = [acks[0], acks[1], acks[3], acks[2]]
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"".join(wire_acks))
        reader = stream.AckReader(b.fileno(), stream.FrameCipher(KEY))
        header = bytearray(wire.HEADER_SIZE)
        assert [reader.next_ack(header, 5.0) for _ in range(2)] == [0, 0]
        assert wire.unpack_header(header).sequence == 1
        assert reader.next_ack(header, 5.0) == stream.TAG


def test_the_reader_times_out_and_sees_a_closed_peer_even_mid_ack() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(0.1)  # non-blocking underneath, as the source's data sockets are
        reader = stream.AckReader(b.fileno(), None)
        header = bytearray(wire.HEADER_SIZE)
        started = time.monotonic()
        assert reader.next_ack(header, 0.1) == stream.TIMED_OUT
        assert time.monotonic() - started >= 0.09
        a.sendall(_ack(0) + _ack(1)[:10])
        a.shutdown(socket.SHUT_WR)
        assert reader.next_ack(header, 5.0) == 0
        assert reader.next_ack(header, 5.0) == stream.CLOSED


def test_tcp_channel_recv_ack_raises_what_the_attempt_expects() -> None:
    """Attempt._read_acks ends a stream on WireError or OSError: a timeout, a closed peer and a
    bad header must each be one of those, and a good ACK its parsed header."""
    a, b = socket.socketpair()
    with a:
        channel = TcpChannel(b)
        header = bytearray(wire.HEADER_SIZE)
        b.settimeout(0.1)
        with pytest.raises(TimeoutError):
            channel.recv_ack(header)
        b.settimeout(None)
        a.sendall(_ack(5))
        assert channel.recv_ack(header).sequence == 5
        a.sendall(b"\0" * wire.HEADER_SIZE)  # no magic
        with pytest.raises(wire.FrameError):
            channel.recv_ack(header)
        a.close()
        with pytest.raises(wire.PeerClosed):
            channel.recv_ack(header)
        channel.close()
