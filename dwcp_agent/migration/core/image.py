"""Offset-addressed, resumable images: the source's chunk scheduler and the destination's validator.

An image has a known size cut into fixed chunks; chunk `i` lives at `i * chunk_size`. Streams
carry frames with per-stream sequence numbers and the destination acknowledges them cumulatively
per stream after the chunk is written and journalled. A chunk lost with its stream is encoded
again (its payload may reference pages the destination has overwritten since) and goes on
another stream. When every chunk is acknowledged or already held by the destination (its journal,
offered in Ready), the source asks for a commit with the object digest; the destination commits
only with no chunk missing and the digest of what it wrote matching.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from dwcp_agent.hde.layout import FLAG_HOLE
from dwcp_agent.migration.core.actions import (
    Action,
    CloseStream,
    Commit,
    Fail,
    Finished,
    FrameFault,
    JournalAdd,
    JournalReset,
    OutChunk,
    Reencode,
    Release,
    Rename,
    Reply,
    SendAck,
    VerifyDigest,
)
from dwcp_agent.migration.core.checks import Header, check_frame
from dwcp_agent.migration.core.kinds import ErrorKind
from dwcp_agent.migration.digest import chunk_count, chunk_length, object_digest
from dwcp_agent.migration.holes import HoleSet

__all__ = ["HOLE_FRAME_BYTES", "HoleRun", "ImageAssembler", "ImageSender", "Run", "check_image_frame", "jobs"]

# One hole frame covers at most this many bytes (its length field is 32 bits).
HOLE_FRAME_BYTES = 1 << 30


class Run(Protocol):
    """`count` consecutive chunks from chunk `start`, all data or all hole (extents.ChunkRun)."""

    @property
    def start(self) -> int: ...
    @property
    def count(self) -> int: ...
    @property
    def data(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class HoleRun:
    """Chunks announced by one hole frame."""

    start: int
    count: int


def jobs(runs: Iterable[Run], chunk_size: int) -> Iterator[int | HoleRun]:
    """Data chunk indexes to read, and hole runs (each fitting one hole frame) to announce."""
    per_frame = max(1, HOLE_FRAME_BYTES // chunk_size)
    for run in runs:
        if run.data:
            yield from range(run.start, run.start + run.count)
            continue
        for first in range(run.start, run.start + run.count, per_frame):
            yield HoleRun(first, min(per_frame, run.start + run.count - first))


def check_image_frame(h: Header, session: int, stream: int, version: int, expected_seq: int, size: int,
                      chunk_size: int) -> int:
    """The header checks of an image's DATA frame (the rules the native receive loop mirrors);
    returns the (first) chunk index or raises FrameFault. A FLAG_HOLE frame announces whole
    chunks from its offset (the last one may be short) and carries no payload."""
    check_frame(h, session, stream, version, expected_seq)
    if h.offset % chunk_size or h.offset >= max(size, 1):
        raise FrameFault(f"offset {h.offset} is not a chunk of this image", ErrorKind.BAD_OFFSET)
    index = h.offset // chunk_size
    if h.flags == FLAG_HOLE:
        end = h.offset + h.raw_len
        if h.encoded_len or h.raw_len == 0 or end > size or (h.raw_len % chunk_size and end != size):
            raise FrameFault(f"hole at {h.offset} of {h.raw_len} bytes is not whole chunks of this image",
                             ErrorKind.BAD_LENGTH)
        return index
    expected_len = chunk_length(index, size, chunk_size)
    if h.raw_len != expected_len:
        raise FrameFault(f"chunk {index} announces {h.raw_len} bytes, expected {expected_len}", ErrorKind.BAD_LENGTH)
    return index


class ImageSender:
    """Source side of one attempt.

    Events: `next_job` (which chunk to read next, or which hole run to announce), `chunk_skipped`,
    `chunk_encoded`, `hole_ready`, `stream_up`, `stream_lost`, `next_frame`, `acked`, `tick`,
    `committed`, `fail`. Actions: Release, Reencode, Commit, Finished, Fail, CloseStream.

    Holes (from the source's SEEK_DATA plan, `runs`) go as FLAG_HOLE frames covering a run of
    chunks: no payload, settled for all their chunks by one acknowledgement, never re-encoded.
    """

    def __init__(self, size: int, chunk_size: int, have: Mapping[int, int] | None = None,
                 checksums: np.ndarray | None = None, max_stall_ticks: int = 600,
                 runs: Iterable[Run] | None = None) -> None:
        self.max_stall_ticks = max_stall_ticks
        self._stall: dict[int, int] = {}  # stream -> ticks its oldest frame waited for an ack
        self.size = size
        self.chunk_size = chunk_size
        self.chunks = chunk_count(size, chunk_size)
        self.have = dict(have or {})          # chunk index -> checksum the destination already holds
        self.checksums = checksums if checksums is not None else np.zeros(self.chunks, dtype=np.uint64)
        self.handed = 0                       # chunks handed out (read or announced as holes)
        self.settled = 0                      # chunks acknowledged or skipped
        self._jobs: Iterator[int | HoleRun] = jobs(runs, chunk_size) if runs is not None else iter(range(self.chunks))
        self.done = False
        self.commit_sent: bytes | None = None
        self._queue: collections.deque[OutChunk] = collections.deque()
        self._inflight: dict[int, collections.deque[OutChunk]] = {}  # stream -> chunks in seq order
        self._seq: dict[int, int] = {}
        self._ready: list[Action] = []
        self._maybe_commit()

    # -- reading ----------------------------------------------------------------------------

    def next_job(self) -> int | HoleRun | None:
        """The next chunk index to read and encode, or hole run to announce; None when all are out."""
        if self.done:
            return None
        job = next(self._jobs, None)
        if job is not None:
            self.handed += 1 if isinstance(job, int) else job.count
        return job

    def hole_ready(self, run: HoleRun) -> OutChunk:
        """A hole run waits for a stream (its chunks' checksums are the plan's zero checksums)."""
        offset = run.start * self.chunk_size
        length = min(self.size, (run.start + run.count) * self.chunk_size) - offset
        chunk = OutChunk(offset, length, 0, 0, FLAG_HOLE, 0, index=run.start, count=run.count)
        self._queue.append(chunk)
        return chunk

    def length(self, index: int) -> int:
        return chunk_length(index, self.size, self.chunk_size)

    def known(self, index: int) -> int | None:
        """The checksum the destination holds for this chunk (its journal), if any."""
        return self.have.get(index)

    def chunk_skipped(self, index: int, checksum: int) -> None:
        """The destination holds this chunk already (same checksum): nothing to send."""
        self.checksums[index] = checksum
        self.settled += 1
        self._maybe_commit()

    def chunk_encoded(self, index: int, checksum: int, codec: int = 0, flags: int = 0, payload_len: int = 0,
                      handle: object = None, chunk: OutChunk | None = None) -> OutChunk:
        """A chunk is encoded (first time, or again after a Reencode) and waits for a stream."""
        self.checksums[index] = checksum
        if chunk is None:
            chunk = OutChunk(index * self.chunk_size, self.length(index), checksum, index=index)
        chunk.checksum, chunk.codec, chunk.flags, chunk.payload_len, chunk.handle = (
            checksum, codec, flags, payload_len, handle)
        chunk.stream = chunk.seq = -1
        if self.done:
            self._ready.append(Release(chunk))
        else:
            self._queue.append(chunk)
        return chunk

    # -- streams ----------------------------------------------------------------------------

    def stream_up(self, stream: int) -> None:
        self._inflight[stream] = collections.deque()
        self._seq[stream] = 0

    def stream_lost(self, stream: int) -> None:
        self._seq.pop(stream, None)
        self._stall.pop(stream, None)
        for chunk in self._inflight.pop(stream, collections.deque()):
            if chunk.flags & FLAG_HOLE:  # nothing to encode: announce the run again
                chunk.stream = chunk.seq = -1
                self._queue.appendleft(chunk)
            else:
                self._ready.append(Reencode(chunk))

    def next_frame(self, stream: int) -> OutChunk | None:
        if self.done or stream not in self._seq or not self._queue:
            return None
        chunk = self._queue.popleft()
        if not self._inflight[stream]:
            self._stall[stream] = 0
        chunk.stream, chunk.seq = stream, self._seq[stream]
        self._seq[stream] += 1
        self._inflight[stream].append(chunk)
        return chunk

    def acked(self, stream: int, seq: int) -> None:
        """Cumulative: every frame up to `seq` on `stream` is written and journalled."""
        inflight = self._inflight.get(stream)
        if inflight is None:
            return
        if seq >= self._seq.get(stream, 0):
            self._fault(stream, f"acknowledgement of frame {seq} that was never sent")
            return
        while inflight and inflight[0].seq <= seq:
            self._stall[stream] = 0
            chunk = inflight.popleft()
            chunk.acked = True
            self.settled += chunk.count
            self._ready.append(Release(chunk))
        self._maybe_commit()

    def tick(self) -> None:
        """Abstract time: a stream whose frames wait `max_stall_ticks` for an acknowledgement is
        closed (a hung connection); its chunks are encoded again for the others."""
        for stream, inflight in list(self._inflight.items()):
            self._stall[stream] = self._stall.get(stream, 0) + 1 if inflight else 0
            if self._stall[stream] > self.max_stall_ticks:
                self._fault(stream, f"no acknowledgement for {self.max_stall_ticks} ticks")

    def committed(self, digest: bytes) -> None:
        """The destination renamed its partial: it reports this digest."""
        if self.commit_sent is None or self.done:
            return
        self.done = True
        if digest != self.commit_sent:
            self._ready.append(Fail(ErrorKind.DIGEST_MISMATCH, "destination reports a different digest"))
        else:
            self._ready.append(Finished(self.size, digest))

    def fail(self, kind: str, reason: str) -> None:
        if self.done:
            return
        self.done = True
        self._ready.append(Fail(kind, reason))
        for chunk in self._queue:
            self._ready.append(Release(chunk))
        self._queue.clear()
        for inflight in self._inflight.values():
            self._ready.extend(Release(c) for c in inflight)
            inflight.clear()

    def take_ready(self) -> list[Action]:
        ready, self._ready = self._ready, []
        return ready

    def in_flight(self, stream: int) -> int:
        """Frames sent on `stream` and not yet acknowledged."""
        return len(self._inflight.get(stream, ()))

    @property
    def outstanding(self) -> int:
        """Chunks handed out but not yet settled."""
        return self.handed - self.settled

    def _fault(self, stream: int, reason: str) -> None:
        self.stream_lost(stream)
        self._ready.append(CloseStream(stream, ErrorKind.SEQUENCE, reason))

    def _maybe_commit(self) -> None:
        if self.commit_sent is None and not self.done and self.settled == self.chunks:
            self.commit_sent = object_digest(self.checksums)
            self._ready.append(Commit(self.commit_sent))


class ImageAssembler:
    """Destination side of one session: frame checks, acknowledgements, journal, commit decision.

    Events: `stream_up`, `stream_lost`, `check` (raises FrameFault), `written`, `commit_requested`,
    `digest_computed`, `fail`. Actions: SendAck, JournalAdd, JournalReset, VerifyDigest, Rename,
    Reply.
    """

    def __init__(self, session: int, version: int, size: int, chunk_size: int, journal: Mapping[int, int],
                 fresh: bool) -> None:
        self.session = session
        self.version = version
        self.size = size
        self.chunk_size = chunk_size
        self.chunks = chunk_count(size, chunk_size)
        self.have = dict(journal)             # chunk index -> checksum, written and verified
        self.resumed = set(self.have)         # held from an earlier session: re-read at commit
        self.written_here: set[int] = set()
        self.fresh = fresh                    # the partial file was created by this session
        self.holes = HoleSet()                # chunk runs announced as holes in this session
        self.failure: tuple[str, str] | None = None
        self.finished = False
        self._expected: dict[int, int] = {}
        self._ready: list[Action] = []

    def stream_up(self, stream: int) -> None:
        self._expected[stream] = 0

    def stream_lost(self, stream: int) -> None:
        self._expected.pop(stream, None)

    def check(self, stream: int, h: Header) -> int:
        """Every header check before the payload is read; returns the chunk index."""
        if self.finished or self.failure is not None:
            raise FrameFault("the session is over", ErrorKind.UNEXPECTED_FRAME)
        if stream not in self._expected:
            raise FrameFault(f"stream {stream} is not open", ErrorKind.BAD_HEADER)
        index = check_image_frame(h, self.session, stream, self.version, self._expected[stream], self.size,
                                  self.chunk_size)
        self._expected[stream] += 1
        return index

    def file_has_holes_at(self, index: int) -> bool:
        """Zero pages of this chunk need no write: the file is new and this chunk never written."""
        return self.fresh and index not in self.written_here

    def written(self, stream: int, h: Header) -> None:
        """The chunk's checksum matched and its bytes are in the partial file: journal, acknowledge."""
        self.chunk_written(h.offset // self.chunk_size, h.checksum)
        self._ready.append(SendAck(stream, h.sequence, h.offset))

    def chunk_written(self, index: int, checksum: int) -> None:
        """A chunk is verified and written (the native receive loop acknowledges it itself)."""
        self.written_here.add(index)
        self.resumed.discard(index)
        self.have[index] = checksum
        self._ready.append(JournalAdd(index, checksum))

    def hole_received(self, index: int, count: int) -> None:
        """A run of hole chunks is punched: held, without a journal record (holes need none)."""
        self.holes.add(index, count)
        if self.resumed:  # empty unless resuming: a terabyte of holes costs no set walk
            self.resumed.difference_update(range(index, index + count))

    def covered(self) -> int:
        """Chunks held: journalled data chunks and announced holes."""
        held = np.zeros(self.chunks, dtype=bool)
        held[np.fromiter((i for i in self.have if i < self.chunks), dtype=np.int64)] = True
        for first, count in self.holes.merged():
            held[first:first + count] = True
        return int(held.sum())

    def commit_requested(self, digest: bytes) -> None:
        if self.failure is not None:
            self._ready.append(Reply("failed", *self.failure))
            return
        missing = self.chunks - self.covered()
        if missing:
            self._ready.append(Reply("failed", ErrorKind.INCOMPLETE, f"{missing} chunks are missing at commit"))
            return
        self._ready.append(VerifyDigest(digest))

    def digest_computed(self, expected: bytes, actual: bytes) -> None:
        """The digest of the partial file (resumed chunks re-read) against the source's."""
        if actual != expected:
            self.have.clear()
            self._ready.append(JournalReset())
            self._ready.append(Reply("failed", ErrorKind.DIGEST_MISMATCH, "object digest of the written image "
                                     "does not match the source; partial discarded"))
            return
        self.finished = True
        self._ready.append(Rename())
        self._ready.append(Reply("committed"))

    def fail(self, kind: str, reason: str) -> None:
        if self.failure is None:
            self.failure = (kind, reason)
            self._ready.append(Fail(kind, reason))

    def take_ready(self) -> list[Action]:
        ready, self._ready = self._ready, []
        return ready
