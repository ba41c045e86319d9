"""CPU seconds per GiB of one data stream, per side: plaintext, sealed natively, sealed the old way.

One TCP stream on 127.0.0.1 carries raw 4 MiB chunks from a sender thread to a receiver thread that
verifies them and writes them to /dev/null (the crypto and the loop, not the page cache), acking
each as the agents do. Each side's CPU time is its own thread's (`time.thread_time`), so other
load on the machine does not count, only what the stream itself costs:

- `plaintext`: TcpChannel.send_frame and the native receive loop, as agents in plaintext mode;
- `sealed_native`: send_sealed_frame and the native receive loop with its keys, as agents now;
- `sealed_python`: the Python path sealed streams took before (sealed.ReferenceFrameKey through
  `cryptography`, payload joined, sealed, sent; received, opened, hashed, written per frame).
"""

from __future__ import annotations

import os
import socket
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import xxhash

from dwcp_agent import wire
from dwcp_agent.amst.channel import SEAL_STAGING_BYTES, TcpChannel
from dwcp_agent.kernels import stream
from dwcp_agent.security.sealed import TAG_BYTES, ReferenceFrameKey

CHUNK = 4 << 20
GIB = 1 << 30
SESSION, STREAM, VERSION = 7, 0, wire.PROTOCOL_VERSION
KEY_OUT, KEY_BACK = bytes(range(16)), bytes(range(16, 32))
MODES = ("plaintext", "sealed_native", "sealed_python")
Sender = Callable[[socket.socket, bytes, bytes], None]


def _header(seq: int, data: bytes) -> bytes:
    return wire.pack_header(wire.FrameType.DATA, 0, 0, SESSION, STREAM, seq, seq * CHUNK, CHUNK, CHUNK,
                            xxhash.xxh3_64_intdigest(data), VERSION)


def _send_plain(chunks: int) -> Callable[[socket.socket, bytes], None]:
    def send(sock: socket.socket, data: bytes) -> None:
        channel = TcpChannel(sock)
        for seq in range(chunks):
            channel.send_frame(_header(seq, data), data)
    return send


def _send_native(chunks: int) -> Callable[[socket.socket, bytes], None]:
    def send(sock: socket.socket, data: bytes) -> None:
        key, staging = stream.FrameCipher(KEY_OUT), bytearray(SEAL_STAGING_BYTES)
        for seq in range(chunks):
            stream.send_sealed_frame(sock.fileno(), key, _header(seq, data), (data,), staging, -1.0)
    return send


def _send_python(chunks: int) -> Callable[[socket.socket, bytes], None]:
    def send(sock: socket.socket, data: bytes) -> None:
        key, staging = ReferenceFrameKey(KEY_OUT), bytearray(CHUNK + TAG_BYTES)
        for seq in range(chunks):
            header = _header(seq, data)
            sealed_header = bytearray(wire.HEADER_SIZE + TAG_BYTES)
            key.seal_into(b"", header, sealed_header)
            key.seal_into(header, b"".join([data]), staging)
            views = [memoryview(bytes(sealed_header)), memoryview(staging)]
            while views:
                sent = sock.sendmsg(views)
                while sent:
                    if sent >= len(views[0]):
                        sent -= len(views.pop(0))
                    else:
                        views[0], sent = views[0][sent:], 0
    return send


def _receive_native(sock: socket.socket, out_fd: int, chunks: int, sealed: bool) -> None:
    header, payload = bytearray(wire.HEADER_SIZE), bytearray(CHUNK + TAG_BYTES)
    keys = {"recv_key": stream.FrameCipher(KEY_OUT), "send_key": stream.FrameCipher(KEY_BACK)} if sealed else {}
    rx = stream.RawFrameReceiver(sock.fileno(), out_fd, header, payload, SESSION, STREAM, VERSION, chunks * CHUNK,
                                 CHUNK, **keys)
    for seq in range(chunks):
        outcome = rx.next_frame(ack_last=seq > 0)
        if outcome != stream.WRITTEN:
            raise RuntimeError(f"chunk {seq}: native receive outcome {outcome}")


def _receive_python(sock: socket.socket, out_fd: int, chunks: int) -> None:
    recv_key, ack_key = ReferenceFrameKey(KEY_OUT), ReferenceFrameKey(KEY_BACK)
    header_buf, sealed, out = bytearray(wire.HEADER_SIZE), bytearray(CHUNK + TAG_BYTES), bytearray(CHUNK)
    for _ in range(chunks):
        wire.recv_exact_into(sock, memoryview(sealed)[:wire.HEADER_SIZE + TAG_BYTES])
        recv_key.open_into(b"", memoryview(sealed)[:wire.HEADER_SIZE + TAG_BYTES], header_buf)
        h = wire.unpack_header(header_buf)
        header = bytes(header_buf)
        wire.recv_exact_into(sock, memoryview(sealed)[:h.encoded_len + TAG_BYTES])
        recv_key.open_into(header, memoryview(sealed)[:h.encoded_len + TAG_BYTES], out)
        if xxhash.xxh3_64_intdigest(out) != h.checksum:
            raise RuntimeError("checksum mismatch")
        os.pwrite(out_fd, out, h.offset)
        ack = wire.pack_header(wire.FrameType.ACK, 0, 0, SESSION, STREAM, h.sequence, h.offset, 0, 0, 0, VERSION)
        sealed_ack = bytearray(len(ack) + TAG_BYTES)
        ack_key.seal_into(b"", ack, sealed_ack)
        sock.sendall(sealed_ack)


def measure(mode: str, chunks: int, data: bytes) -> dict[str, float]:
    """One run: {'send_cpu_s_per_gib', 'recv_cpu_s_per_gib'} of `chunks` chunks in `mode`."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname(), timeout=60)
    conn, _ = server.accept()
    server.close()
    client.settimeout(None)
    out_fd = os.open("/dev/null", os.O_WRONLY)
    cpu: dict[str, float] = {}
    errors: list[BaseException] = []

    def side(name: str, work: Callable[[], None]) -> None:
        start = time.thread_time()
        try:
            work()
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
        cpu[name] = time.thread_time() - start

    sender = {"plaintext": _send_plain, "sealed_native": _send_native, "sealed_python": _send_python}[mode](chunks)
    if mode == "sealed_python":
        def receive() -> None:
            _receive_python(conn, out_fd, chunks)
    else:
        def receive() -> None:
            _receive_native(conn, out_fd, chunks, sealed=mode == "sealed_native")
    threads = [threading.Thread(target=side, args=("send", lambda: sender(client, data))),
               threading.Thread(target=side, args=("recv", receive))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
    finally:
        client.close()
        conn.close()
        os.close(out_fd)
    if errors or len(cpu) != 2:
        raise RuntimeError(f"{mode}: {errors or 'a side did not finish'}")
    gib = chunks * CHUNK / GIB
    return {"send_cpu_s_per_gib": cpu["send"] / gib, "recv_cpu_s_per_gib": cpu["recv"] / gib}


def run(quick: bool) -> dict[str, Any]:
    """Median over alternating runs of each mode, and each sealed mode's CPU relative to plaintext."""
    chunks = 64 if quick else 256
    repeats = 3 if quick else 5
    data = os.urandom(CHUNK)
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for mode in MODES:
        measure(mode, 4, data)  # warm-up
    for _ in range(repeats):
        for mode in MODES:
            runs[mode].append(measure(mode, chunks, data))
    result: dict[str, Any] = {"bytes_per_run": chunks * CHUNK, "repeats": repeats, "runs": runs}
    for mode in MODES:
        for side in ("send", "recv"):
            result[f"{mode}_{side}_cpu_s_per_gib"] = statistics.median(r[f"{side}_cpu_s_per_gib"] for r in runs[mode])
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [f"One stream's CPU seconds per GiB, own threads only ({result['bytes_per_run'] >> 20} MiB per run, "
             f"median of {result['repeats']}):", "",
             "| path | sender CPU s/GiB | receiver CPU s/GiB |", "|---|---|---|"]
    for mode in MODES:
        send, recv = result[f"{mode}_send_cpu_s_per_gib"], result[f"{mode}_recv_cpu_s_per_gib"]
        lines.append(f"| {mode} | {send:.3f} | {recv:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(run(quick=True)))
