"""The byte-stream object over real TCP connections on loopback, from a pipe into a pipe.

Acceptance of issue #11: a 1 GiB stream over 1, 4 and 16 authenticated data connections, one
connection killed midway (with one connection, a new one is added after the kill), and every byte
arrives in order (a streaming hash of the output equals the input's). The reverse channel
carries the destination's replies back, in order.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import xxhash

from dwcp_agent import wire
from dwcp_agent.migration.bytestream import (
    ByteStreamDestination,
    ByteStreamError,
    ByteStreamSource,
    StreamConfig,
    window_for,
)

KEY = b"k" * 32
GIB = 1 << 30
F_SETPIPE_SZ = 1031
BLOCK = 1 << 20


class Listener:
    """Accepts data connections, authenticates them, hands them to the destination by stream id."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.dest: ByteStreamDestination | None = None
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            peer = wire.server_handshake(conn, KEY, "dst")
            assert self.dest is not None and peer.role == "data"
            self.accepted.append(conn)
            self.dest.add_stream(conn, peer.stream)

    def close(self) -> None:
        self.sock.close()


def connect(port: int, session: int, stream: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    wire.client_handshake(sock, KEY, "src", "data", session, stream)
    return sock


def pipe() -> tuple[int, int]:
    r, w = os.pipe()
    for fd in (r, w):
        fcntl.fcntl(fd, F_SETPIPE_SZ, 1 << 20)
    return r, w


@contextmanager
def endpoints(config: StreamConfig, output: int, session: int = 41) -> Iterator[
        tuple[ByteStreamSource, ByteStreamDestination, Listener]]:
    listener = Listener()
    src = ByteStreamSource(session, config)
    dst = ByteStreamDestination(session, output, config)
    listener.dest = dst
    try:
        yield src, dst, listener
    finally:
        src.close(linger_s=2)
        dst.close(linger_s=2)
        listener.close()


def blocks(total: int, seed: int) -> Iterator[memoryview]:
    """Deterministic input: 1 MiB blocks from a random pool, each stamped with its index, so a
    block out of place or missing changes the hash."""
    pool = np.random.default_rng(seed).integers(0, 256, 16 * BLOCK, dtype=np.uint8)
    block = bytearray(BLOCK)
    for i in range(0, total // BLOCK):
        start = (i * 7919 * 4096) % (15 * BLOCK)
        block[:] = pool[start:start + BLOCK].tobytes()
        block[:8] = i.to_bytes(8, "little")
        yield memoryview(block)


def stream_through(n_streams: int, total: int, config: StreamConfig, kill_after: int) -> None:
    in_r, in_w = pipe()
    out_r, out_w = pipe()
    sent_hash, got_hash = xxhash.xxh3_128(), xxhash.xxh3_128()
    got = [0]
    session = 1000 + n_streams

    def produce() -> None:
        try:
            for view in blocks(total, n_streams):
                sent_hash.update(view)
                while len(view):
                    view = view[os.write(in_w, view):]
        finally:
            os.close(in_w)

    def consume() -> None:
        buf = bytearray(BLOCK)
        while (n := os.readv(out_r, [buf])):
            got_hash.update(memoryview(buf)[:n])
            got[0] += n
        os.close(out_r)

    with endpoints(config, out_w, session) as (src, dst, listener):
        for i in range(n_streams):
            src.add_stream(connect(listener.port, session, i), i)
        workers = [threading.Thread(target=produce, daemon=True), threading.Thread(target=consume, daemon=True)]
        for t in workers:
            t.start()
        feeder = threading.Thread(target=src.feed_from, args=(in_r,), daemon=True)
        feeder.start()
        deadline = time.monotonic() + 60
        while dst.written_bytes < kill_after and time.monotonic() < deadline:
            time.sleep(0.01)
        requeued = 0
        while not requeued and time.monotonic() < deadline:  # a connection with chunks in flight
            with src.cond:  # (reentrant) no acknowledgement slips in between the choice and the kill
                busy = max(src.streams, key=src.sender.in_flight)
                if src.sender.in_flight(busy):
                    victim, requeued = src.kill_stream(busy)
            time.sleep(0.0005)
        assert requeued > 0, "no connection ever had a chunk in flight to kill"
        if n_streams == 1:  # a connection added at runtime takes over
            src.add_stream(connect(listener.port, session, n_streams), n_streams)
        result = src.wait(timeout=600)
        assert dst.wait(timeout=60).digest == result.digest
        os.close(out_w)
        for t in workers:
            t.join(timeout=60)
        feeder.join(timeout=10)
        os.close(in_r)
        assert victim not in src.streams
    assert result.length == total == got[0]
    assert got_hash.digest() == sent_hash.digest()


@pytest.mark.parametrize("n_streams", [1, 4, 16])
def test_one_gib_stream_arrives_in_order_with_a_stream_killed_midway(n_streams: int) -> None:
    config = StreamConfig(chunk_size=1 << 20, window_bytes=window_for(320e6, 0.1))
    stream_through(n_streams, GIB, config, kill_after=GIB // 2)


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_compressed_stream_with_hde_arrives_in_order(codec: str) -> None:
    config = StreamConfig(chunk_size=256 << 10, window_bytes=8 << 20, codec=codec, dedupe=True)
    stream_through(4, 64 << 20, config, kill_after=16 << 20)


def test_reverse_channel_carries_replies_in_order_while_a_stream_dies() -> None:
    out_r, out_w = pipe()
    config = StreamConfig(chunk_size=64 << 10, window_bytes=4 << 20, reverse_chunk=4096)
    with endpoints(config, out_w) as (src, dst, listener):
        for i in range(3):
            src.add_stream(connect(listener.port, 41, i), i)
        replies = [f"reply {i:05d};".encode() * (1 + i % 50) for i in range(2000)]
        for i, reply in enumerate(replies):
            dst.send_reverse(reply)
            if i == 1000:
                src.kill_stream(src.streams[0])
        dst.close_reverse()
        got = bytearray()
        while (part := src.recv_reverse(timeout=30)):
            got += part
        assert bytes(got) == b"".join(replies)
        src.close_input()
        assert src.wait(30).length == 0
        assert dst.wait(30).length == 0
    os.close(out_w)
    assert os.read(out_r, 10) == b""
    os.close(out_r)


def test_a_session_left_without_streams_fails_and_does_not_resume() -> None:
    out_r, out_w = pipe()
    config = StreamConfig(chunk_size=64 << 10, window_bytes=4 << 20, tick_s=0.02, max_idle_ticks=10)
    with endpoints(config, out_w) as (src, dst, listener):
        src.add_stream(connect(listener.port, 41, 0), 0)
        src.write(b"x" * 100_000)
        src.kill_stream(0)
        with pytest.raises(ByteStreamError) as err:
            src.wait(30)
        assert err.value.error_type == "streams"
        with pytest.raises(ByteStreamError):
            dst.wait(30)
        src.add_stream(connect(listener.port, 41, 1), 1)  # too late: the session is over
        assert src.streams == []
    os.close(out_w)
    os.close(out_r)


def test_a_bad_frame_closes_its_connection_only_and_is_counted() -> None:
    from dwcp_agent.telemetry.metrics import Metrics

    out_r, out_w = pipe()
    metrics = Metrics()
    config = StreamConfig(chunk_size=64 << 10, window_bytes=4 << 20)
    with endpoints(config, out_w) as (src, dst, listener):
        dst.metrics = metrics
        src.add_stream(connect(listener.port, 41, 0), 0)
        rogue, rogue_peer = socket.socketpair()
        dst.add_stream(rogue_peer, 7)
        rogue.sendall(wire.pack_header(wire.FrameType.DATA, 0, 0, 999, 7, 0, 0, 4, 4, 0) + b"evil")
        src.write(b"good bytes " * 1000)
        src.close_input()
        assert dst.wait(30).length == 11_000
        assert src.wait(30).length == 11_000
        deadline = time.monotonic() + 10
        while not dst.frame_faults and time.monotonic() < deadline:
            time.sleep(0.01)
        assert dst.frame_faults == {"bad_header": 1}
        assert metrics.registry.get_sample_value(
            "dwcp_v3_errors_total", {"component": "amst", "error_type": "bad_header"}) == 1
        assert 7 not in dst.streams
        rogue.close()
    os.close(out_w)
    assert os.read(out_r, 1 << 20) == b"good bytes " * 1000
    os.close(out_r)
