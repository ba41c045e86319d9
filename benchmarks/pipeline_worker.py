"""One side of bench_pipeline, run as a script against whichever tree PYTHONPATH names.

Only APIs present before and after the migration-core refactor are used (SendSession,
DataServer, make_encoder, wire), so the same script measures both versions in the same run.

    python pipeline_worker.py source|sink|dest|feeder JSON_ARGS

Roles pin themselves to the CPU in the arguments first. `sink` and `dest` print the port they
listen on, then serve; `source` and `feeder` print one JSON line with their measurement.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

PSK = b"bench-pipeline-key-0123456789abcdef"


def _pin(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})


def _cpu_seconds() -> float:
    """User + system CPU of this process, all threads: on a loaded machine the measure that
    does not count the time other processes held the core."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _config(work: Path, codec: str, chunk: int) -> Any:
    from dwcp_agent import config as dwcp_config

    overrides: dict[str, Any] = dict(
        psk=PSK.decode(), data_port=0, listen_host="127.0.0.1", state_dir=str(work / "state"),
        dest_dirs=[str(work / "dst")], source_dirs=[str(work)], io_timeout_s=60.0, connect_timeout_s=5.0,
        retry_limit=0, stream_count=1, chunk_size=chunk, compression_algo=codec, encode_threads=1)
    # Like for like with trees from before channel encryption: the pipeline is measured in
    # plaintext (bench_crypto measures what encryption costs).
    if "insecure_datacenter_plaintext" in getattr(dwcp_config, "FIELDS", {}):
        overrides["insecure_datacenter_plaintext"] = True
    return dwcp_config.load_config(environ={}, overrides=overrides)


# ---------------------------------------------------------------------------------------------
# Source side: the real SendSession on one core, into a destination that acknowledges and discards

def sink(args: dict[str, Any]) -> None:
    """A destination that answers the protocol and throws the bytes away (on the other core)."""
    from dwcp_agent import wire
    from dwcp_agent.pba.active import serve_probe

    _pin(args["cpu"])
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    session = secrets.randbits(62) or 1

    def control(conn: socket.socket) -> None:
        first = wire.recv_message(conn, (wire.Start, wire.ActiveProbe))
        if isinstance(first, wire.ActiveProbe):
            serve_probe(conn)
            first = wire.recv_message(conn, wire.Start)
        wire.send_message(conn, wire.Ready(session))
        commit = wire.recv_message(conn, wire.Commit)
        wire.send_message(conn, wire.Committed(commit.digest, "/dev/null"))

    def data(conn: socket.socket, peer: wire.PeerInfo) -> None:
        header = bytearray(wire.HEADER_SIZE)
        junk = memoryview(bytearray(64 << 20))
        try:
            while True:
                h = wire.recv_header(conn, header)
                left = h.encoded_len
                while left:
                    got = conn.recv_into(junk[: min(left, len(junk))])
                    if not got:
                        return
                    left -= got
                conn.sendall(wire.pack_header(wire.FrameType.ACK, 0, 0, h.session, h.stream, h.sequence,
                                              h.offset, 0, 0, 0, h.version))
        except (wire.WireError, OSError):
            return

    def serve(conn: socket.socket) -> None:
        peer = wire.server_handshake(conn, PSK, "sink")
        conn.settimeout(None)
        if peer.role == "control":
            control(conn)
        else:
            data(conn, peer)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def source(args: dict[str, Any]) -> None:
    from dwcp_agent.migration.buffers import BufferPool
    from dwcp_agent.migration.model import MigrationRequest
    from dwcp_agent.migration.sender import SendSession
    from dwcp_agent.telemetry.metrics import Metrics

    _pin(args["cpu"])
    work = Path(args["work"])
    config = _config(work, args["codec"], args["chunk"])
    image = Path(args["image"])
    # The agent lends chunk buffers from one pool kept across migrations (migration/buffers.py):
    # warmed here, so no tree pays for fresh pages in the measured run (trees differ in when
    # they take them: at SendSession() or once the destination accepted).
    pool = BufferPool()
    warm = pool.take(args["chunk"], max(1, config.max_inflight_bytes // args["chunk"]) + 16)
    for buf in warm:  # touch every page: calloc'd buffers are not faulted in yet
        buf[::4096] = bytes(len(range(0, len(buf), 4096)))
    pool.give(warm)
    best, cpu = 0.0, float("inf")
    for _ in range(args["repeats"]):
        request = MigrationRequest("m-" + secrets.token_hex(4), "vm-bench", image, "127.0.0.1", args["port"],
                                   "/dev/null")
        session = SendSession(config, Metrics(), PSK, request, pool=pool)
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        result = session.run()
        elapsed = time.perf_counter() - start
        best = max(best, result.logical_bytes / elapsed)
        cpu = min(cpu, _cpu_seconds() - cpu_start)
    print(json.dumps({"bytes_per_second": best, "wire_bytes": result.wire_bytes, "cpu_seconds": cpu}), flush=True)


# ---------------------------------------------------------------------------------------------
# Destination side: the real DataServer on one core, fed pre-recorded frames from the other

def dest(args: dict[str, Any]) -> None:
    from dwcp_agent.migration.server import DataServer
    from dwcp_agent.telemetry.metrics import Metrics

    _pin(args["cpu"])
    work = Path(args["work"])
    (work / "dst").mkdir(parents=True, exist_ok=True)
    server = DataServer(_config(work, args["codec"], args["chunk"]), Metrics(), PSK)
    server.start()
    print(server.port, flush=True)
    threading.Event().wait()


def _record(image: Path, codec: str, chunk: int, work: Path) -> tuple[list[tuple[Any, bytes]], bytes]:
    """Encode the image once, as the v3 sender would (offsets given; no peer acknowledgements)."""
    import numpy as np

    from dwcp_agent.hde.chunk import make_encoder
    from dwcp_agent.migration.digest import object_digest
    from dwcp_agent.telemetry.metrics import Metrics

    encoder = make_encoder(_config(work, codec, chunk), Metrics(), threads=1)
    data = image.read_bytes()
    frames, sums = [], []
    for offset in range(0, len(data), chunk):
        encoded = encoder.encode(memoryview(data)[offset:offset + chunk], offset)
        frames.append((encoded, bytes(encoded.payload)))
        sums.append(encoded.checksum)
    return frames, object_digest(np.array(sums, dtype=np.uint64))


def feeder(args: dict[str, Any]) -> None:
    from dwcp_agent import wire

    _pin(args["cpu"])
    work = Path(args["work"])
    image = Path(args["image"])
    chunk = args["chunk"]
    frames, digest = _record(image, args["codec"], chunk, work)
    size = image.stat().st_size
    best = 0.0
    for attempt in range(args["repeats"]):

        def connect(role: str, session: int = 0, stream: int = 0) -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", args["port"]))
            wire.client_handshake(sock, PSK, "feeder", role, session, stream)
            sock.settimeout(None)
            return sock

        control = connect("control")
        wire.send_message(control, wire.Start(f"m-bench-{attempt}", "vm-bench", str(work / "dst" / f"out{attempt}.img"),
                                              size, chunk, 1, "v3"))
        ready = wire.recv_message(control, wire.Ready)
        data = connect("data", ready.session, 0)
        acked = threading.Event()

        def acks(sock: socket.socket = data, last: int = len(frames) - 1, done: threading.Event = acked) -> None:
            header = bytearray(wire.HEADER_SIZE)
            while True:
                h = wire.recv_header(sock, header)
                if h.sequence >= last:
                    done.set()
                    return

        reader = threading.Thread(target=acks, daemon=True)
        reader.start()
        start = time.perf_counter()
        for seq, (enc, payload) in enumerate(frames):
            header = wire.pack_header(wire.FrameType.DATA, enc.flags, enc.codec, ready.session, 0, seq, seq * chunk,
                                      enc.raw_len, len(payload), enc.checksum)
            data.sendall(header)
            data.sendall(payload)
        if frames:
            acked.wait(300)
        wire.send_message(control, wire.Commit(digest))
        committed = wire.recv_message(control, wire.Committed)
        elapsed = time.perf_counter() - start
        assert committed.digest == digest
        best = max(best, size / elapsed)
        data.close()
        control.close()
        # The image stays until bench_pipeline has read the destination's CPU time and stopped it:
        # unlinking a file the server still holds open makes its last close free the blocks and
        # drop the page cache (about a sixth of the destination's CPU), no part of the pipeline.
    print(json.dumps({"bytes_per_second": best}), flush=True)


if __name__ == "__main__":
    role, raw = sys.argv[1], json.loads(sys.argv[2])
    {"sink": sink, "source": source, "dest": dest, "feeder": feeder}[role](raw)
