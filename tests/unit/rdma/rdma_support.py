"""RDMA test support: a source/destination channel pair over any provider, and a frame exchange."""

from __future__ import annotations

import os
import random
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

import xxhash

from dwcp_agent import wire
from dwcp_agent.amst.rdma import RdmaDataChannel, RdmaError, RdmaFrameSource, accept_destination, connect_source
from dwcp_agent.amst.select import max_frame
from dwcp_agent.amst.verbs import VerbsContext, VerbsProvider
from dwcp_agent.telemetry.metrics import Metrics

CHUNK = 16 * 1024


@dataclass
class Pair:
    src: RdmaDataChannel
    dst: RdmaFrameSource
    src_ctx: VerbsContext
    dst_ctx: VerbsContext
    metrics: Metrics
    failures: list[RdmaError] = field(default_factory=list)

    def close(self) -> None:
        self.src.close()
        self.dst.close()


def open_pair(provider: VerbsProvider, dst_provider: VerbsProvider | None = None, slots: int = 4,
              timeout: float = 3.0) -> Pair:
    """Set up one RDMA stream between two contexts over a socketpair (the 'control connection')."""
    metrics = Metrics()
    port = next(p for p in provider.discover()[0] if p.active)
    src_ctx = provider.open(port)
    dst_ctx = (dst_provider or provider).open(port)
    a, b = socket.socketpair()
    out: dict[str, Any] = {}

    def accept() -> None:
        try:
            out["dst"] = accept_destination(dst_ctx, b, max_frame(CHUNK), slots, metrics)
        except BaseException as exc:  # surfaced by the caller
            out["error"] = exc

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    failures: list[RdmaError] = []
    src = connect_source(src_ctx, a, max_frame(CHUNK), slots, metrics, timeout, failures.append)
    t.join()
    if "error" in out:
        raise out["error"]
    dst: RdmaFrameSource = out["dst"]
    dst.wait_timeout = timeout
    return Pair(src, dst, src_ctx, dst_ctx, metrics, failures)


def make_frame(seq: int, rng: random.Random) -> tuple[bytes, bytes]:
    payload = rng.randbytes(rng.randrange(0, CHUNK + 1))
    header = wire.pack_header(wire.FrameType.DATA, 0, 0, 1, 0, seq, seq * CHUNK, len(payload), len(payload),
                              xxhash.xxh3_64_intdigest(payload))
    return header, payload


@dataclass
class Exchange:
    """What a transfer produced on each side."""

    received: list[bytes] = field(default_factory=list)
    acked: list[int] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)


def receive(pair: Pair, count: int, result: Exchange, hold: threading.Event | None = None) -> None:
    """Destination loop: verify each frame's checksum in place, keep a copy, ACK (returning the credit)."""
    buf = memoryview(bytearray(max_frame(CHUNK)))
    header_buf = bytearray(wire.HEADER_SIZE)
    try:
        for expected in range(count):
            h = pair.dst.recv_header(header_buf)
            if h.sequence != expected:
                raise AssertionError(f"frame {h.sequence} delivered, expected {expected}")
            body = pair.dst.recv_payload(buf[: h.encoded_len])
            if hold is not None:
                hold.wait()
            data = bytes(body)
            if xxhash.xxh3_64_intdigest(data) != h.checksum:
                raise AssertionError(f"frame {h.sequence}: payload changed in its slot")
            result.received.append(data)
            pair.dst.send_ack(wire.pack_header(wire.FrameType.ACK, 0, 0, 1, 0, h.sequence, h.offset, 0, 0, 0))
    except BaseException as exc:
        result.errors.append(exc)
        pair.dst.abort()


def read_acks(pair: Pair, count: int, result: Exchange) -> None:
    header_buf = bytearray(wire.HEADER_SIZE)
    try:
        while not result.acked or result.acked[-1] < count - 1:
            result.acked.append(pair.src.recv_ack(header_buf).sequence)
    except BaseException as exc:
        result.errors.append(exc)


def transfer(pair: Pair, count: int, seed: int | None = None) -> tuple[list[bytes], Exchange]:
    """Send `count` random frames through the pair; returns (sent payloads, what happened)."""
    rng = random.Random(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    result = Exchange()
    threads = [threading.Thread(target=receive, args=(pair, count, result), daemon=True),
               threading.Thread(target=read_acks, args=(pair, count, result), daemon=True)]
    for t in threads:
        t.start()
    sent = []
    try:
        for seq in range(count):
            header, payload = make_frame(seq, rng)
            pair.src.send_frame(header, payload)
            sent.append(payload)
    except BaseException as exc:
        result.errors.append(exc)
        pair.src.abort()
        pair.dst.abort()
    for t in threads:
        t.join(timeout=30)
    return sent, result
