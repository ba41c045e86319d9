"""Seeded deterministic simulation of the data path: the migration cores under faulty schedules.

One seed fixes everything: chunk boundaries, frames dropped, duplicated, delayed (so reordered)
or corrupted on a connection, connections killed and reopened, and (images) the destination
crashing and restarting from its durable journal. The production cores (migration/core) run
unchanged; connections, disks and the clock are this module. Invariants, on every schedule:
- the output (stream) or the final file (image) equals the source, and the run completes once
  the faults stop;
- the digest is verified by both ends (rolling digest for streams, object digest for images);
- nothing is written outside the partial file, and the final path only appears by rename;
- no commit happens with a chunk missing or wrong, no byte is delivered out of order, and the
  reorder buffer stays within its bound.
A failing schedule reports its seed; `run_schedule(DataSimConfig(kind, seed=...))` replays it.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

import numpy as np
import xxhash

from dwcp_agent.migration.core import (
    CloseStream,
    Commit,
    Deliver,
    Fail,
    Finished,
    FrameFault,
    ImageAssembler,
    ImageSender,
    JournalAdd,
    JournalReset,
    OutChunk,
    Reencode,
    Release,
    Rename,
    Reply,
    RollingDigest,
    SendAck,
    StreamAssembler,
    StreamSender,
    VerifyDigest,
    is_retryable,
)
from dwcp_agent.migration.core.stream import FLAG_END
from dwcp_agent.migration.digest import chunk_count, object_digest
from dwcp_agent.wire import FrameHeader, FrameType

__all__ = ["DataSimConfig", "DataSimReport", "run_schedule"]

VERSION = 3
PARTIAL = "image.dwcp-part"
FINAL = "image"


@dataclass
class DataSimConfig:
    """One schedule. Rates are per frame (network faults) or per step (kills, restarts)."""

    kind: str = "stream"          # "stream" | "image"
    seed: int = 0
    streams: int = 0              # 0: 1 to 4, chosen by the seed
    chunk_size: int = 64
    max_len: int = 2500
    fault_steps: int = 150        # faults happen only in these first steps
    max_steps: int = 3000
    drop: float = 0.02
    duplicate: float = 0.02
    corrupt: float = 0.01
    max_delay: int = 4            # steps; different delays reorder frames on a connection
    delay_rate: float = 0.1
    kill_rate: float = 0.02
    restart_rate: float = 0.01    # images: the destination crashes and restarts
    reconnect_rate: float = 0.3
    frames_per_step: int = 1
    window_chunks: int = 4
    max_idle_ticks: int = 200
    max_stall_ticks: int = 12


@dataclass
class DataSimReport:
    seed: int
    kind: str
    violations: list[str] = field(default_factory=list)
    completed: bool = False
    steps: int = 0
    frames: int = 0
    faults: int = 0               # frames refused by a destination check (sequence, checksum, ...)
    kills: int = 0
    restarts: int = 0
    attempts: int = 0


def _checksum(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


class _Network:
    """Connections between the two ends; each direction is a list of frames with delivery steps."""

    def __init__(self, cfg: DataSimConfig, rng: random.Random, report: DataSimReport) -> None:
        self.cfg = cfg
        self.rng = rng
        self.report = report
        self.live: set[int] = set()
        self.queues: dict[tuple[int, str], list[tuple[int, int, FrameHeader, bytes]]] = {}
        self.now = 0
        self.next_id = 0
        self._serial = 0

    def open(self) -> int:
        stream = self.next_id
        self.next_id += 1
        self.live.add(stream)
        self.queues[(stream, "dst")] = []
        self.queues[(stream, "src")] = []
        return stream

    def close(self, stream: int) -> None:
        self.live.discard(stream)
        self.queues.pop((stream, "dst"), None)
        self.queues.pop((stream, "src"), None)

    def send(self, stream: int, to: str, h: FrameHeader, payload: bytes, faults: bool) -> None:
        queue = self.queues.get((stream, to))
        if queue is None:
            return
        self.report.frames += 1
        copies = 1
        if faults:
            r = self.rng.random()
            if r < self.cfg.drop:
                return
            if r < self.cfg.drop + self.cfg.duplicate:
                copies = 2
            if payload and self.rng.random() < self.cfg.corrupt:
                i = self.rng.randrange(len(payload))
                payload = payload[:i] + bytes([payload[i] ^ 0x5A]) + payload[i + 1:]
        for _ in range(copies):
            delay = self.rng.randint(1, self.cfg.max_delay) if faults and self.rng.random() < self.cfg.delay_rate else 0
            self._serial += 1
            queue.append((self.now + delay, self._serial, h, payload))

    def due(self, to: str) -> list[tuple[int, FrameHeader, bytes]]:
        """Frames arriving now, per connection in arrival order (delays reorder them)."""
        out = []
        for (stream, side), queue in list(self.queues.items()):
            if side != to or not queue:
                continue
            queue.sort(key=lambda f: (f[0], f[1]))
            while queue and queue[0][0] <= self.now:
                _, _, h, payload = queue.pop(0)
                out.append((stream, h, payload))
        self.rng.shuffle(out)  # connections are independent: interleave them at random
        return out


def _data_header(session: int, stream: int, chunk: OutChunk) -> FrameHeader:
    return FrameHeader(VERSION, FrameType.DATA, chunk.flags, chunk.codec, session, stream, chunk.seq, chunk.offset,
                       chunk.raw_len, chunk.payload_len, chunk.checksum)


def _ack_header(session: int, ack: SendAck) -> FrameHeader:
    return FrameHeader(VERSION, FrameType.ACK, FLAG_END if ack.end else 0, 0, session, ack.stream, ack.seq,
                       ack.offset, 0, 0, 0)


# ---------------------------------------------------------------------------------------------
# Byte streams

def _run_stream(cfg: DataSimConfig, rng: random.Random, report: DataSimReport) -> None:
    data = rng.randbytes(rng.randint(0, cfg.max_len))
    session = rng.randrange(1, 1 << 62)
    net = _Network(cfg, rng, report)
    window = cfg.chunk_size * cfg.window_chunks
    src = StreamSender(window, cfg.max_idle_ticks, cfg.max_stall_ticks)
    dst = StreamAssembler(session, VERSION, window + cfg.chunk_size, cfg.chunk_size, cfg.max_idle_ticks)
    expected_digest = RollingDigest()
    read = 0
    output = bytearray()
    src_done: Finished | None = None
    dst_done: Finished | None = None
    violations = report.violations

    def close(stream: int) -> None:
        net.close(stream)
        src.stream_lost(stream)
        dst.stream_lost(stream)

    for step in range(cfg.max_steps):
        net.now = step
        faults = step < cfg.fault_steps
        if faults and net.live and rng.random() < cfg.kill_rate:
            close(rng.choice(sorted(net.live)))
            report.kills += 1
        if len(net.live) < cfg.streams and rng.random() < cfg.reconnect_rate and not (src.done and dst.done):
            stream = net.open()
            src.stream_up(stream)
            dst.stream_up(stream)
        # The source reads what the window allows, in chunks of any length (short pipe reads).
        while read < len(data) and src.room() >= cfg.chunk_size:
            n = min(rng.randint(1, cfg.chunk_size), len(data) - read)
            piece = data[read:read + n]
            src.chunk_read(n, _checksum(piece), 0, 0, n, piece)
            expected_digest.add(n, _checksum(piece))
            read += n
        if read == len(data) and not src.ended and not src.done:
            src.end_of_input()
        for stream in sorted(net.live):
            for _ in range(cfg.frames_per_step):
                chunk = src.next_frame(stream)
                if chunk is None:
                    break
                net.send(stream, "dst", _data_header(session, stream, chunk),
                         chunk.handle if isinstance(chunk.handle, bytes) else b"", faults)
        for stream, h, payload in net.due("dst"):
            if stream not in net.live:
                continue
            try:
                dst.check(stream, h)
            except FrameFault:
                report.faults += 1
                close(stream)
                continue
            if len(payload) != h.encoded_len or (not h.flags & FLAG_END and _checksum(payload) != h.checksum):
                report.faults += 1
                close(stream)  # the driver's checksum check: a corrupted payload closes its connection
                continue
            dst.arrived(stream, h, payload)
        for stream, h, _ in net.due("src"):
            if stream in net.live:
                src.acked(h.offset, end=bool(h.flags & FLAG_END))
        src.tick()
        dst.tick()
        if dst.buffered_bytes > dst.reorder_bytes:
            violations.append(f"step {step}: reorder buffer holds {dst.buffered_bytes} > {dst.reorder_bytes}")
        for action in dst.take_ready():
            if isinstance(action, Deliver):
                got = action.chunk
                if not got.end:
                    if got.offset != len(output):
                        violations.append(f"step {step}: delivered offset {got.offset} at {len(output)}")
                    output += got.handle if isinstance(got.handle, bytes) else b""
                    if bytes(output) != data[:len(output)]:
                        violations.append(f"step {step}: output diverges from the source before {len(output)}")
                dst.written(got)
            elif isinstance(action, SendAck):
                net.send(action.stream, "src", _ack_header(session, action), b"", faults)
            elif isinstance(action, CloseStream):
                close(action.stream)
            elif isinstance(action, Finished):
                dst_done = action
            elif isinstance(action, Fail):
                violations.append(f"step {step}: destination failed: {action.kind}: {action.reason}")
        for action in dst.take_ready():  # acknowledgements from `written`
            if isinstance(action, SendAck):
                net.send(action.stream, "src", _ack_header(session, action), b"", faults)
        for action in src.take_ready():
            if isinstance(action, CloseStream):
                close(action.stream)
            elif isinstance(action, Finished):
                src_done = action
                if dst_done is None:
                    violations.append(f"step {step}: source finished before the destination verified")
            elif isinstance(action, Fail):
                violations.append(f"step {step}: source failed: {action.kind}: {action.reason}")
        if violations or (src_done is not None and dst_done is not None):
            break
    report.steps = step + 1
    if violations:
        return
    if src_done is None or dst_done is None:
        violations.append(f"not complete after {cfg.max_steps} steps (delivered {len(output)} of {len(data)})")
        return
    report.completed = True
    if bytes(output) != data:
        violations.append("output differs from the source")
    if not src_done.digest == dst_done.digest == expected_digest.value():
        violations.append("rolling digests differ")


# ---------------------------------------------------------------------------------------------
# Images

class _Disk:
    """The destination's files: page-cache contents, what survives a crash, and every write."""

    def __init__(self) -> None:
        self.files: dict[str, bytearray] = {}
        self.durable: dict[str, bytes] = {}
        self.journal: dict[int, int] = {}          # durable records
        self.pending: dict[int, int] = {}          # records not yet flushed
        self.writes: list[str] = []

    def write(self, path: str, offset: int, data: bytes) -> None:
        self.writes.append(path)
        f = self.files[path]
        f[offset:offset + len(data)] = data

    def flush(self) -> None:
        """Data first, then the journal records: a record never names bytes not on disk."""
        self.durable = {p: bytes(b) for p, b in self.files.items()}
        self.journal.update(self.pending)
        self.pending.clear()

    def crash(self, rng: random.Random) -> None:
        """Unflushed writes survive or not, byte range by byte range; pending records are lost."""
        for path, content in self.files.items():
            old = self.durable.get(path, bytes(len(content)))
            if rng.random() < 0.5:
                self.files[path] = bytearray(old)
        for path in list(self.files):
            if path not in self.durable:
                del self.files[path]
        self.pending.clear()


class _ImageDestination:
    """What migration/receiver.py does around the ImageAssembler, on the simulated disk."""

    def __init__(self, disk: _Disk, size: int, chunk_size: int, rng: random.Random) -> None:
        self.disk = disk
        self.size, self.chunk_size = size, chunk_size
        fresh = PARTIAL not in disk.files
        if fresh:
            disk.journal.clear()
            disk.files[PARTIAL] = bytearray(size)
            disk.writes.append(PARTIAL)
        self.session = rng.randrange(1, 1 << 62)
        self.core = ImageAssembler(self.session, VERSION, size, chunk_size, dict(disk.journal), fresh)

    def digest(self) -> bytes:
        n = chunk_count(self.size, self.chunk_size)
        sums = np.array([self.core.have[i] for i in range(n)], dtype=np.uint64)
        part = self.disk.files[PARTIAL]
        for i in self.core.resumed:  # re-read: bytes on disk must still match the journal
            sums[i] = _checksum(bytes(part[i * self.chunk_size:(i + 1) * self.chunk_size]))
        return object_digest(sums)


def _run_image(cfg: DataSimConfig, rng: random.Random, report: DataSimReport) -> None:
    chunk_size = cfg.chunk_size
    source = rng.randbytes(rng.randint(0, cfg.max_len))
    size = len(source)
    n_chunks = chunk_count(size, chunk_size)
    sums = np.array([_checksum(source[i * chunk_size:(i + 1) * chunk_size]) for i in range(n_chunks)],
                    dtype=np.uint64)
    want_digest = object_digest(sums)
    disk = _Disk()
    violations = report.violations
    net = _Network(cfg, rng, report)
    dest: _ImageDestination | None = None
    src: ImageSender | None = None
    commit_at = -1                 # step the commit request reaches the destination
    reply_at: tuple[int, Reply] | None = None
    backoff_until = 0
    finished = False
    attempt_failures = 0

    def chunk_bytes(index: int) -> bytes:
        return source[index * chunk_size:(index + 1) * chunk_size]

    def end_attempt(crash: bool) -> None:
        nonlocal src, dest, commit_at, reply_at, backoff_until
        for stream in list(net.live):
            net.close(stream)
        if dest is not None:
            if crash:
                disk.crash(rng)
                report.restarts += 1
            else:
                disk.flush()  # a closed session makes its journal durable
        src = dest = None
        commit_at, reply_at = -1, None
        backoff_until = net.now + rng.randint(1, 5)

    for step in range(cfg.max_steps):
        net.now = step
        faults = step < cfg.fault_steps
        if src is None:
            if step < backoff_until:
                continue
            report.attempts += 1
            dest = _ImageDestination(disk, size, chunk_size, rng)
            src = ImageSender(size, chunk_size, dict(disk.journal), max_stall_ticks=cfg.max_stall_ticks)
        assert dest is not None
        if faults and rng.random() < cfg.restart_rate:
            end_attempt(crash=True)
            continue
        if faults and net.live and rng.random() < cfg.kill_rate:
            stream = rng.choice(sorted(net.live))
            net.close(stream)
            src.stream_lost(stream)
            dest.core.stream_lost(stream)
            report.kills += 1
        if len(net.live) < cfg.streams and rng.random() < cfg.reconnect_rate:
            stream = net.open()
            src.stream_up(stream)
            dest.core.stream_up(stream)
        if rng.random() < 0.2:
            disk.flush()  # the journal's group commit
        while src.outstanding < cfg.window_chunks and isinstance(index := src.next_job(), int):
            data = chunk_bytes(index)
            known = src.known(index)
            if known is not None and known == _checksum(data):
                src.chunk_skipped(index, known)
            else:
                src.chunk_encoded(index, _checksum(data), 0, 0, len(data), data)
        for stream in sorted(net.live):
            for _ in range(cfg.frames_per_step):
                chunk = src.next_frame(stream)
                if chunk is None:
                    break
                net.send(stream, "dst", _data_header(dest.session, stream, chunk), chunk.handle
                         if isinstance(chunk.handle, bytes) else b"", faults)
        for stream, h, payload in net.due("dst"):
            if stream not in net.live:
                continue
            try:
                index = dest.core.check(stream, h)
            except FrameFault:
                report.faults += 1
                net.close(stream)
                src.stream_lost(stream)
                dest.core.stream_lost(stream)
                continue
            if len(payload) != h.encoded_len or _checksum(payload) != h.checksum:
                report.faults += 1
                net.close(stream)
                src.stream_lost(stream)
                dest.core.stream_lost(stream)
                continue
            disk.write(PARTIAL, index * chunk_size, payload)
            dest.core.written(stream, h)
        for action in dest.core.take_ready():
            if isinstance(action, JournalAdd):
                disk.pending[action.index] = action.checksum
            elif isinstance(action, SendAck):
                net.send(action.stream, "src", _ack_header(dest.session, action), b"", faults)
        for stream, h, _ in net.due("src"):
            if stream in net.live:
                src.acked(stream, h.sequence)
        src.tick()
        if commit_at == step:
            dest.core.commit_requested(src.commit_sent or b"")
            for action in dest.core.take_ready():
                if isinstance(action, VerifyDigest):
                    dest.core.digest_computed(action.expected, dest.digest())
            for action in dest.core.take_ready():
                if isinstance(action, JournalReset):
                    disk.journal.clear()
                    disk.pending.clear()
                elif isinstance(action, Rename):
                    missing = [i for i in range(n_chunks) if i not in dest.core.have]
                    if missing:
                        violations.append(f"step {step}: commit with chunks {missing[:5]} missing")
                    if bytes(disk.files[PARTIAL]) != source:
                        violations.append(f"step {step}: commit of a partial file that differs from the source")
                    disk.files[FINAL] = disk.files.pop(PARTIAL)
                    disk.durable = {}
                    disk.journal.clear()
                elif isinstance(action, Reply):
                    reply_at = (step + rng.randint(0, 2), action)
        if reply_at is not None and reply_at[0] <= step:
            reply = reply_at[1]
            reply_at = None
            if reply.verdict == "committed":
                src.committed(src.commit_sent or b"")
            else:
                src.fail(reply.kind, reply.reason)
        for action in src.take_ready():
            if isinstance(action, Reencode):
                index = action.chunk.index
                data = chunk_bytes(index)
                src.chunk_encoded(index, _checksum(data), 0, 0, len(data), data, chunk=action.chunk)
            elif isinstance(action, CloseStream):
                net.close(action.stream)
                src.stream_lost(action.stream)
                dest.core.stream_lost(action.stream)
            elif isinstance(action, Commit):
                commit_at = step + rng.randint(1, 3)
                if action.digest != want_digest:
                    violations.append(f"step {step}: source commits digest of other bytes")
            elif isinstance(action, Finished):
                finished = True
            elif isinstance(action, Fail):
                attempt_failures += 1
                if not is_retryable(action.kind):
                    violations.append(f"step {step}: attempt failed for good: {action.kind}: {action.reason}")
                end_attempt(crash=False)
                break
            elif not isinstance(action, Release):
                violations.append(f"unexpected source action {action!r}")
        if violations or finished:
            break
    report.steps = step + 1
    if violations:
        return
    if not finished:
        violations.append(f"not committed after {cfg.max_steps} steps ({report.attempts} attempts)")
        return
    report.completed = True
    if PARTIAL in disk.files or bytes(disk.files.get(FINAL, b"")) != source:
        violations.append("final file differs from the source (or the partial remains)")
    outside = {p for p in disk.writes if p != PARTIAL}
    if outside:
        violations.append(f"writes outside the partial file: {sorted(outside)}")


def run_schedule(cfg: DataSimConfig) -> DataSimReport:
    """Run one seeded schedule and check the invariants."""
    rng = random.Random(cfg.seed)
    report = DataSimReport(cfg.seed, cfg.kind)
    if not cfg.streams:
        cfg = dataclasses.replace(cfg, streams=rng.randint(1, 4))
    if cfg.kind == "stream":
        _run_stream(cfg, rng, report)
    elif cfg.kind == "image":
        _run_image(cfg, rng, report)
    else:
        raise ValueError(f"unknown object kind {cfg.kind!r}")
    return report

