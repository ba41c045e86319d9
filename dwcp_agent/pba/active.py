"""Short active probe at session start: a few RTT pings and one bounded burst.

Passive TCP_INFO needs traffic; before the first chunk flows the tuner still needs an RTT and a
rough bandwidth to size the first streams and buffers. Both ends run this on a stream they agree
to hand over for a moment (the control connection right after the handshake). Frames are a
16-byte header `!4sIQ` (kind, seq, value): PING echoed as is; BRST announces `value` payload
bytes, answered by BACK once all arrived; DONE ends the probe. Sync (socket) and asyncio
(StreamReader/StreamWriter) flavours share the framing.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from dwcp_agent.pba.probe import read_tcp_info

__all__ = ["ProbeError", "ProbeResult", "run_probe", "run_probe_async", "serve_probe", "serve_probe_async"]

_HDR = struct.Struct("!4sIQ")
PING, BURST, BURST_ACK, DONE = b"PING", b"BRST", b"BACK", b"DONE"
MAX_BURST = 64 * 1024 * 1024
_BLOCK = bytes(64 * 1024)


class ProbeError(ConnectionError):
    """The peer broke the probe protocol or the stream closed mid-probe."""


@dataclass(frozen=True)
class ProbeResult:
    """RTT (min and median of the pings, seconds) and the burst's bandwidth estimate (bytes/s)."""

    rtt_min_s: float
    rtt_median_s: float
    burst_bytes: int
    burst_s: float
    bandwidth_bps: float


def _burst_bandwidth(nbytes: int, elapsed: float, rtt: float, delivery_rate: float) -> float:
    """Bytes over (elapsed - one RTT for the last byte and its answer), floored by TCP's own rate."""
    span = max(elapsed - rtt, elapsed / 4, 1e-6)
    return max(nbytes / span, delivery_rate)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ProbeError("stream closed during the probe")
        got += k
    return bytes(buf)


def run_probe(sock: socket.socket, pings: int = 5, burst_bytes: int = 2 * 1024 * 1024,
              clock: Callable[[], float] = time.monotonic) -> ProbeResult:
    """Measure RTT and a burst's bandwidth over a connected blocking socket; the peer runs serve_probe."""
    burst_bytes = min(burst_bytes, MAX_BURST)
    rtts = []
    for seq in range(max(1, pings)):
        t0 = clock()
        sock.sendall(_HDR.pack(PING, seq, 0))
        kind, got_seq, _ = _HDR.unpack(_recv_exact(sock, _HDR.size))
        if kind != PING or got_seq != seq:
            raise ProbeError(f"unexpected probe reply {kind!r} seq {got_seq}")
        rtts.append(clock() - t0)
    t0 = clock()
    sock.sendall(_HDR.pack(BURST, 0, burst_bytes))
    left = burst_bytes
    while left:
        n = min(left, len(_BLOCK))
        sock.sendall(_BLOCK[:n])
        left -= n
    kind, _, value = _HDR.unpack(_recv_exact(sock, _HDR.size))
    elapsed = clock() - t0
    if kind != BURST_ACK or value != burst_bytes:
        raise ProbeError(f"unexpected burst reply {kind!r} {value}")
    rate = read_tcp_info(sock, 0.0).delivery_rate if sock.family in (socket.AF_INET, socket.AF_INET6) else 0.0
    sock.sendall(_HDR.pack(DONE, 0, 0))
    return ProbeResult(min(rtts), statistics.median(rtts), burst_bytes, elapsed,
                       _burst_bandwidth(burst_bytes, elapsed, min(rtts), rate))


def serve_probe(sock: socket.socket) -> None:
    """Answer one probe on a blocking socket until DONE."""
    sink = bytearray(len(_BLOCK))
    while True:
        kind, seq, value = _HDR.unpack(_recv_exact(sock, _HDR.size))
        if kind == PING:
            sock.sendall(_HDR.pack(PING, seq, value))
        elif kind == BURST:
            if value > MAX_BURST:
                raise ProbeError(f"burst of {value} bytes is above the {MAX_BURST} limit")
            left = value
            while left:
                k = sock.recv_into(sink, min(left, len(sink)))
                if not k:
                    raise ProbeError("stream closed during the burst")
                left -= k
            sock.sendall(_HDR.pack(BURST_ACK, seq, value))
        elif kind == DONE:
            return
        else:
            raise ProbeError(f"unknown probe frame {kind!r}")


async def run_probe_async(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pings: int = 5,
                          burst_bytes: int = 2 * 1024 * 1024,
                          clock: Callable[[], float] = time.monotonic) -> ProbeResult:
    """The asyncio flavour of run_probe; the peer runs serve_probe or serve_probe_async."""
    burst_bytes = min(burst_bytes, MAX_BURST)
    rtts = []
    try:
        for seq in range(max(1, pings)):
            t0 = clock()
            writer.write(_HDR.pack(PING, seq, 0))
            await writer.drain()
            kind, got_seq, _ = _HDR.unpack(await reader.readexactly(_HDR.size))
            if kind != PING or got_seq != seq:
                raise ProbeError(f"unexpected probe reply {kind!r} seq {got_seq}")
            rtts.append(clock() - t0)
        t0 = clock()
        writer.write(_HDR.pack(BURST, 0, burst_bytes))
        left = burst_bytes
        while left:
            n = min(left, len(_BLOCK))
            writer.write(_BLOCK[:n])
            await writer.drain()
            left -= n
        kind, _, value = _HDR.unpack(await reader.readexactly(_HDR.size))
        elapsed = clock() - t0
    except asyncio.IncompleteReadError as exc:
        raise ProbeError("stream closed during the probe") from exc
    if kind != BURST_ACK or value != burst_bytes:
        raise ProbeError(f"unexpected burst reply {kind!r} {value}")
    sock = writer.get_extra_info("socket")
    rate = 0.0
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        rate = read_tcp_info(sock, 0.0).delivery_rate
    writer.write(_HDR.pack(DONE, 0, 0))
    await writer.drain()
    return ProbeResult(min(rtts), statistics.median(rtts), burst_bytes, elapsed,
                       _burst_bandwidth(burst_bytes, elapsed, min(rtts), rate))


async def serve_probe_async(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer one probe on asyncio streams until DONE."""
    try:
        while True:
            kind, seq, value = _HDR.unpack(await reader.readexactly(_HDR.size))
            if kind == PING:
                writer.write(_HDR.pack(PING, seq, value))
            elif kind == BURST:
                if value > MAX_BURST:
                    raise ProbeError(f"burst of {value} bytes is above the {MAX_BURST} limit")
                left = value
                while left:
                    chunk = await reader.read(min(left, len(_BLOCK)))
                    if not chunk:
                        raise ProbeError("stream closed during the burst")
                    left -= len(chunk)
                writer.write(_HDR.pack(BURST_ACK, seq, value))
            elif kind == DONE:
                return
            else:
                raise ProbeError(f"unknown probe frame {kind!r}")
            await writer.drain()
    except asyncio.IncompleteReadError as exc:
        raise ProbeError("stream closed during the probe") from exc
