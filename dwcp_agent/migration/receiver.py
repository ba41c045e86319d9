"""Destination side of a migration: accept streams, verify every chunk, journal, commit by rename.

One `ReceiveSession` per incoming migration. Its control connection carries Start/Ready and
Commit/Committed; each data connection carries DATA frames one way and ACK frames back. A chunk
is written at its offset in `<dest>.dwcp-part` only after its checksum matches; the final path is
touched once, by an atomic rename after the whole-object digest of the re-read file matches.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import numpy as np

from dwcp_agent import wire
from dwcp_agent.amst.channel import FrameSource, TcpChannel
from dwcp_agent.hde.baseline import FilePages, have_list_blob
from dwcp_agent.hde.chunk import (
    BASELINE_BYTES_PER_PAGE,
    DEFAULT_INDEX_BUDGET,
    FLAG_ALL_ZERO,
    FLAG_PAGE_MAP,
    ChunkDecoder,
    check_all_zero,
    checksum,
)
from dwcp_agent.hde.codecs import CodecError, CodecId
from dwcp_agent.hde.layout import FLAG_HOLE, max_encoded_len
from dwcp_agent.hde.page_map_writer import PageMapWriter
from dwcp_agent.kernels import stream as native_stream
from dwcp_agent.migration import space
from dwcp_agent.migration.buffers import BufferPool
from dwcp_agent.migration.core import (
    FrameFault,
    ImageAssembler,
    JournalAdd,
    JournalReset,
    Rename,
    Reply,
    VerifyDigest,
)
from dwcp_agent.migration.core.image import check_image_frame
from dwcp_agent.migration.digest import chunk_count, hole_checksums, object_digest, reread_checksums
from dwcp_agent.migration.extents import MAX_RANGES
from dwcp_agent.migration.holes import HoleSet
from dwcp_agent.migration.journal import Identity, Journal, JournalBusy, pack_have
from dwcp_agent.migration.safe_files import JOURNAL_SUFFIX, PARTIAL_SUFFIX, DestinationDir, UnsafePath
from dwcp_agent.telemetry.metrics import Metrics

log = logging.getLogger("dwcp_agent.migration")

__all__ = ["JOURNAL_SUFFIX", "PARTIAL_SUFFIX", "ReceiveError", "ReceiveSession", "open_session"]
FLUSH_INTERVAL_S = 0.05
FreeBytes = Callable[[int], int]


class ReceiveError(Exception):
    """The destination cannot take this migration; `error_type` labels the metric."""

    def __init__(self, message: str, error_type: str) -> None:
        super().__init__(message)
        self.error_type = error_type


def data_plan(start: wire.Start) -> tuple[int, list[tuple[int, int]]]:
    """Bytes and (offset, length) ranges the source will write; the whole image when it sent no map."""
    if start.data_bytes < 0:
        return start.size, [(0, start.size)]
    ranges = [(int(o), int(n)) for o, n in start.data_ranges]
    if len(ranges) > MAX_RANGES or any(o < 0 or n < 0 or o + n > start.size for o, n in ranges) \
            or sum(n for _, n in ranges) != start.data_bytes:
        raise ReceiveError("data ranges do not fit the image or do not add up to data_bytes", "bad_request")
    return start.data_bytes, ranges


class ReceiveSession:
    """One incoming migration: partial file, journal, data streams, commit."""

    def __init__(self, start: wire.Start, directory: DestinationDir, metrics: Metrics, mode: str = "datacenter",
                 pool: BufferPool | None = None, free: FreeBytes = space.free_bytes,
                 index_budget_bytes: int = DEFAULT_INDEX_BUDGET) -> None:
        self.start = start
        self.index_budget_bytes = index_budget_bytes
        self.pool = pool or BufferPool()
        self.directory = directory
        self.dest = dest = directory.path
        self.metrics = metrics
        self.mode = mode
        self.session_id = secrets.randbits(63) or 1
        self.partial = dest.with_name(directory.partial_name)
        self.chunks = chunk_count(start.size, start.chunk_size)
        self.bytes_received = 0
        self._streams: set[FrameSource] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._control: socket.socket | None = None
        self._control_lock = threading.Lock()
        self.failure: ReceiveError | None = None
        self.journal = Journal(dest.with_name(directory.journal_name),
                               Identity(start.size, start.chunk_size, start.vm_id), directory)
        try:
            self._fd, self.fresh = self._open_partial(free)
        except BaseException:  # a refused Start leaves nothing behind
            self.journal.close()
            if self.journal.created:
                directory.unlink(directory.journal_name)
            raise
        # The protocol decisions (frame checks, what is held and written, commit) are the core's.
        self.core = ImageAssembler(self.session_id, wire.PROTOCOL_VERSION, start.size, start.chunk_size,
                                   self.journal.have, self.fresh)
        self.holes = self.core.holes
        self._core_lock = threading.Lock()
        self.partial_pages = FilePages(self._fd)
        self.baseline, self.baseline_have = self._open_baseline()
        self._flusher = threading.Thread(target=self._flush_loop, name=f"journal-{self.session_id:x}",
                                         daemon=True)
        self._flusher.start()

    def _open_partial(self, free: FreeBytes) -> tuple[int, bool]:
        """Open (or create, O_EXCL) the partial file, check the space the data ranges still need,
        and reserve it; a refusal removes what this call created."""
        data_bytes, ranges = data_plan(self.start)
        d = self.directory
        try:
            fd, created = d.open_file(d.partial_name)
        except UnsafePath as exc:
            raise ReceiveError(str(exc), exc.error_type) from exc
        except OSError as exc:
            raise ReceiveError(f"cannot create {self.partial}: {exc.strerror}", "unwritable") from exc
        resumed = self.journal.resumed and not created
        reserve_fd = -1
        in_place = space.in_memory(fd)  # tmpfs: reserve inside the partial (space.PartialReservation)
        try:
            try:
                if in_place:
                    if resumed:
                        space.release_unwritten(fd)  # a reservation left by a crash is void
                else:
                    reserve_fd, _ = d.open_file(d.reserve_name)
                    os.ftruncate(reserve_fd, 0)  # a reservation left by a crash is void
                # A resumed partial needs what it lacks outside the chunks its journal holds.
                wanted = space.without_chunks(ranges, self.journal.have, self.start.chunk_size) if resumed else ranges
                needed = space.check(fd, wanted, free) if resumed else data_bytes
                if not resumed:
                    if not space.fits(needed, free(fd)):
                        raise space.NoSpace(needed, free(fd))
                    if self.journal.have:
                        self.journal.reset()
                    os.ftruncate(fd, 0)
                os.ftruncate(fd, self.start.size)
                self.reservation: space.Reservation | space.PartialReservation = (
                    space.PartialReservation(fd, wanted, needed) if in_place else space.Reservation(reserve_fd, needed))
                self._reserved = needed
            except space.NoSpace as exc:
                raise ReceiveError(f"not enough space in {self.partial.parent}: {exc}", "no_space") from exc
            except UnsafePath as exc:
                raise ReceiveError(str(exc), exc.error_type) from exc
            except OSError as exc:
                raise ReceiveError(f"cannot create {self.partial}: {exc.strerror}", "unwritable") from exc
        except ReceiveError:
            os.close(fd)
            if reserve_fd >= 0:
                os.close(reserve_fd)
                d.unlink(d.reserve_name)
            if created:
                d.unlink(d.partial_name)
            raise
        return fd, not resumed

    def _open_baseline(self) -> tuple[FilePages | None, bytes]:
        """The destination's current file (an earlier image of this VM) as HDE baseline, v3 only.

        It stays unchanged until commit (we write beside it and rename), so pages the source
        references in it are stable for the whole migration."""
        if self.start.protocol != "v3":
            return None, b""
        fd = self.directory.open_baseline()  # only a regular file, never through a symlink
        if fd is None:
            return None, b""
        budget = self.index_budget_bytes // 2 // BASELINE_BYTES_PER_PAGE  # rows: non-zero pages
        allocated_pages = os.fstat(fd).st_blocks * 512 // 4096
        try:  # far more allocated pages than the budget has rows: not worth reading to find out
            blob = None if allocated_pages > 8 * budget else have_list_blob(f"/proc/self/fd/{fd}", budget)
        except OSError as exc:
            os.close(fd)
            log.warning("no baseline: cannot read %s: %s", self.dest, exc.strerror,
                        extra={"migration_id": self.start.migration_id})
            return None, b""
        if blob is None:
            os.close(fd)
            log.info("no baseline: %s holds more non-zero pages than index_budget_bytes allows", self.dest,
                     extra={"migration_id": self.start.migration_id})
            return None, b""
        if len(blob) > wire.MAX_CONTROL_PAYLOAD // 2:
            os.close(fd)
            log.warning("no baseline: have-list of %d bytes is too large for one control message", len(blob),
                        extra={"migration_id": self.start.migration_id})
            return None, b""
        return FilePages(fd), blob  # its descriptor is closed with the session

    # -- control connection ---------------------------------------------------------------

    def ready(self) -> wire.Ready:
        return wire.Ready(self.session_id, pack_have(self.journal.known()), self.baseline_have)

    def run_control(self, sock: socket.socket) -> None:
        """Serve Commit/Abort until the source is done or goes away; keep the journal for resume."""
        self._control = sock
        sock.settimeout(None)
        try:
            while not self._closed.is_set():
                msg = wire.recv_message(sock)
                if isinstance(msg, wire.Commit):
                    self._commit(msg.digest)
                    return
                if isinstance(msg, wire.Abort):
                    log.info("migration aborted by source", extra={
                        "migration_id": self.start.migration_id, "migration_status": "cancelled"})
                    self._discard()
                    return
        except (wire.WireError, OSError) as exc:
            if not self._closed.is_set():
                log.warning("source control connection lost; journal kept for resume", extra={
                    "migration_id": self.start.migration_id, "error": str(exc)})
        finally:
            self.close()

    def _send_control(self, msg: object) -> None:
        if self._control is None:
            return
        with self._control_lock, contextlib.suppress(OSError):
            wire.send_message(self._control, msg)

    def _commit(self, digest: bytes) -> None:
        self._stop_streams()
        try:
            self._commit_checked(digest)
        except OSError as exc:  # reported to the source as Failed, never as a closed connection
            self.fail(ReceiveError(f"commit of {self.dest} failed: {exc.strerror or exc}", "io"))

    def _commit_checked(self, digest: bytes) -> None:
        """The core decides (failure, missing chunks, digest); this carries its actions out."""
        self.journal.flush(self._fd)
        with self._core_lock:
            self.core.commit_requested(digest)
            actions = self.core.take_ready()
        while actions:
            action = actions.pop(0)
            if isinstance(action, VerifyDigest):
                actual = self._digest()
                with self._core_lock:
                    self.core.digest_computed(action.expected, actual)
                    actions += self.core.take_ready()
            elif isinstance(action, JournalReset):
                self.metrics.error("migration", "digest_mismatch")
                self.journal.reset()
            elif isinstance(action, Rename):
                self.reservation.settle()  # in the partial: its never-written pages become holes again
                os.fsync(self._fd)
                self.directory.commit(self.directory.partial_name)
                self.journal.remove()
                log.info("image committed", extra={"migration_id": self.start.migration_id,
                                                   "migration_status": "committed", "path": str(self.dest)})
            elif isinstance(action, Reply) and action.verdict == "committed":
                self._send_control(wire.Committed(digest, str(self.dest)))
            elif isinstance(action, Reply):
                self._send_control(wire.Failed(action.reason, action.kind))

    def _digest(self) -> bytes:
        """Object digest from the verified chunk checksums. Chunks written by this session were
        hashed from the very buffer written; chunks resumed from an earlier session are re-read,
        so bytes that changed on disk since (or never made it) cannot pass."""
        size, chunk_size = self.start.size, self.start.chunk_size
        sums = np.zeros(self.chunks, dtype=np.uint64)
        for i, c in self.journal.have.items():
            if i < self.chunks:
                sums[i] = c
        holes = self.holes.merged()
        for first, count in holes:
            hole_checksums(sums, first, count, size, chunk_size)
        resumed = sorted(i for i in self.core.resumed if not HoleSet.contains(holes, i))
        on_disk = reread_checksums(self._fd, size, chunk_size, resumed)
        for i in resumed:
            if on_disk[i] != sums[i]:
                self.metrics.error("migration", "resumed_chunk_mismatch")
                sums[i] = on_disk[i]
        return object_digest(sums)

    def _discard(self) -> None:
        self._stop_streams()
        self.directory.unlink(self.directory.partial_name)
        self.journal.remove()

    def fail(self, error: ReceiveError) -> None:
        """A fatal destination error (disk full, unwritable): tell the source, stop the streams."""
        if self.failure is None:
            self.failure = error
            with self._core_lock:
                self.core.fail(error.error_type, str(error))
                self.core.take_ready()
            self.metrics.error("migration", error.error_type)
            log.error("destination failed: %s", error, extra={
                "migration_id": self.start.migration_id, "migration_status": "failed",
                "error_type": error.error_type})
            self._send_control(wire.Failed(str(error), error.error_type))
            self._stop_streams()

    # -- data streams -----------------------------------------------------------------------

    def run_stream(self, source: FrameSource, stream_id: int, version: int) -> None:
        """Receive DATA frames until the stream ends; a bad frame closes this stream only."""
        with self._lock:
            if self._closed.is_set():
                source.close()
                return
            self._streams.add(source)
        self.metrics.active_streams.inc()
        self.metrics.amst_active_streams.inc()
        try:
            self._receive_frames(source, stream_id, version)
        except wire.PeerClosed:
            pass
        except wire.WireError as exc:
            if not self._closed.is_set():
                self.metrics.error("amst", exc.error_type)
                log.warning("stream %d refused a frame: %s", stream_id, exc, extra={
                    "migration_id": self.start.migration_id, "error_type": exc.error_type})
        except CodecError as exc:
            self.metrics.error("hde", "decode")
            log.warning("stream %d: chunk does not decode: %s", stream_id, exc,
                        extra={"migration_id": self.start.migration_id, "error_type": "decode"})
        except OSError as exc:
            if not self._closed.is_set() and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO,
                                                            errno.EROFS, errno.EFBIG, errno.EACCES):
                self.fail(ReceiveError(f"cannot write {self.partial}: {exc.strerror}",
                                       "no_space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "io"))
        finally:
            self.metrics.active_streams.dec()
            self.metrics.amst_active_streams.dec()
            with self._lock:
                self._streams.discard(source)
            source.close()

    def _receive_frames(self, source: FrameSource, stream_id: int, version: int) -> None:
        chunk_size = self.start.chunk_size
        payload_buf, raw_buf = self.pool.take(max_encoded_len(chunk_size))[0], self.pool.take(chunk_size)[0]
        try:
            self._receive_loop(source, stream_id, version, memoryview(payload_buf), memoryview(raw_buf))
        finally:
            self.pool.give([payload_buf, raw_buf])

    def _receive_loop(self, source: FrameSource, stream_id: int, version: int, payload: memoryview,
                      raw: memoryview) -> None:
        header_buf = bytearray(wire.HEADER_SIZE)
        fast = self._raw_receiver(source, stream_id, version, header_buf, payload)
        decoder = ChunkDecoder(read_page=self.partial_pages, read_baseline=self.baseline)
        page_maps = PageMapWriter(self.start.chunk_size, self.partial_pages, self.baseline)
        zero_sums: dict[int, int] = {}
        expected_seq = 0
        bytes_counter = self.metrics.bytes_transferred.labels("received", self.mode, source.transport)
        logical_counter = self.metrics.logical_bytes.labels("received")
        ack_last = False
        while True:
            if fast is None:
                h = source.recv_header(header_buf)
            else:
                # Raw chunks are received, verified and written natively; anything else comes back
                # here with its header read and its payload not, and takes the checks below.
                outcome = fast.next_frame(ack_last)
                ack_last = False
                if outcome == native_stream.WRITTEN:
                    self._chunk_written(fast.index, fast.checksum)
                    ack_last = True  # sent by the next call, after the journal has the chunk
                    self.bytes_received += fast.raw_len
                    bytes_counter.inc(wire.HEADER_SIZE + fast.raw_len)
                    logical_counter.inc(fast.raw_len)
                    continue
                if outcome == native_stream.CHECKSUM:
                    raise wire.FrameError(f"chunk {fast.index} checksum mismatch", "checksum")
                if outcome != native_stream.HEADER:
                    _raise_for(fast, outcome)
                h = wire.unpack_header(header_buf)
                expected_seq = fast.expected_seq
            self._receive_frame(source, fast, h, stream_id, version, expected_seq, payload, raw, decoder, page_maps,
                                zero_sums)
            expected_seq += 1
            bytes_counter.inc(wire.HEADER_SIZE + h.encoded_len)  # counted once written, even if the ACK fails
            logical_counter.inc(h.raw_len)
            if fast is not None:  # the native loop acknowledges it on its next call, as a raw chunk
                fast.handled(h.sequence, h.offset)
                ack_last = True
                continue
            source.send_ack(wire.pack_header(wire.FrameType.ACK, 0, 0, self.session_id, stream_id, h.sequence,
                                             h.offset, 0, 0, 0, version))

    def _raw_receiver(self, source: FrameSource, stream_id: int, version: int, header_buf: bytearray,
                      payload: memoryview) -> native_stream.RawFrameReceiver | None:
        """The native receive loop for a TCP stream in blocking mode, sealed or not (RDMA streams use
        the Python path)."""
        if not isinstance(source, TcpChannel):
            return None
        return source.frame_receiver(self._fd, header_buf, payload, self.session_id, stream_id, version,
                                     self.start.size, self.start.chunk_size)

    def _receive_frame(self, source: FrameSource, fast: native_stream.RawFrameReceiver | None,
                       h: wire.FrameHeader, stream_id: int, version: int,
                       expected_seq: int, payload: memoryview, raw: memoryview, decoder: ChunkDecoder,
                       page_maps: PageMapWriter, zero_sums: dict[int, int]) -> None:
        """Check, receive, decode, verify, write and journal one frame (the caller acknowledges it)."""
        index = self._check_header(h, stream_id, version, expected_seq)
        if h.flags == FLAG_HOLE:
            self._receive_hole(h, index)
            return
        if fast is None:
            body = source.recv_payload(payload[: h.encoded_len])
        else:  # read (and opened) by the native loop, without a Python call per recv
            outcome = fast.recv_payload(h.encoded_len)
            if outcome != native_stream.PAYLOAD:
                _raise_for(fast, outcome)
            body = payload[: h.encoded_len]
        # Zero pages need no write where the partial file still has its holes: a file created by
        # this session, in a chunk this session has not written yet (a resent chunk is written whole).
        holes = self.core.file_has_holes_at(index)
        # In a partial preallocated on tmpfs the skipped zero pages are punched, so they stay
        # holes and the commit needs no walk of the file (space.PartialReservation.settle).
        punch = isinstance(self.reservation, space.PartialReservation)
        data: memoryview | None = None
        zero_pages = None
        if h.flags == FLAG_ALL_ZERO and holes:  # nothing to decode or write
            check_all_zero(h.codec, h.encoded_len)
            actual = zero_sums.get(h.raw_len)
            if actual is None:
                actual = zero_sums[h.raw_len] = checksum(bytes(h.raw_len))
        elif h.codec == CodecId.NONE and h.flags == 0:
            if h.encoded_len != h.raw_len:
                raise wire.FrameError("uncompressed chunk length mismatch", "bad_length")
            data = body
            actual = checksum(data)
        else:
            data = raw[: h.raw_len]
            with self.metrics.operation("hde"):  # the decode alone, one operation a chunk
                # A page-map chunk is not built: its pages are pointed at where they lie (DELTA
                # pages excepted, which the decoder builds).
                mapped = h.flags == FLAG_PAGE_MAP and page_maps.decode(h.codec, body, h.raw_len, data)
                if not mapped:
                    zero_pages = decoder.decode(h.codec, h.flags, body, h.raw_len, data)
            if mapped:
                if not page_maps.matches(h.checksum):
                    raise wire.FrameError(f"chunk {index} checksum mismatch", "checksum")
                page_maps.write(self._fd, h.offset, holes, punch)
                self._chunk_written(index, h.checksum)
                self.bytes_received += h.raw_len
                return
            actual = checksum(data)
        if actual != h.checksum:
            raise wire.FrameError(f"chunk {index} checksum mismatch", "checksum")
        if data is not None and holes and zero_pages is not None:
            native_stream.write_except_zero_pages(self._fd, data, zero_pages, h.offset, punch)
        elif data is not None:  # a chunk with no page map, or where the file may hold older bytes
            _pwrite_all(self._fd, data, h.offset)
        elif punch:
            space.punch_hole(self._fd, h.offset, h.raw_len)
        self._chunk_written(index, h.checksum)
        self.bytes_received += h.raw_len

    def _chunk_written(self, index: int, checksum: int) -> None:
        with self._core_lock:
            self.core.chunk_written(index, checksum)
            actions = self.core.take_ready()
        for action in actions:
            if isinstance(action, JournalAdd):
                self.journal.add(action.index, action.checksum)

    def _receive_hole(self, h: wire.FrameHeader, index: int) -> None:
        """A run of hole chunks (checked by the core): nothing to read; punch it in case the file
        held older bytes."""
        count = chunk_count(h.raw_len, self.start.chunk_size)
        space.punch_hole(self._fd, h.offset, h.raw_len)
        with self._core_lock:
            self.core.hole_received(index, count)

    def _check_header(self, h: wire.FrameHeader, stream_id: int, version: int, expected_seq: int) -> int:
        try:
            return check_image_frame(h, self.session_id, stream_id, version, expected_seq, self.start.size,
                                     self.start.chunk_size)
        except FrameFault as exc:
            raise wire.FrameError(str(exc), exc.kind) from exc

    # -- lifecycle ------------------------------------------------------------------------

    def _flush_loop(self) -> None:
        while not self._closed.wait(FLUSH_INTERVAL_S):
            self._flush()
        self._flush()

    def _flush(self) -> None:
        try:
            self.journal.flush(self._fd)
            # Written chunks hold their bytes now: give that much of the reservation back.
            self.reservation.shrink_to(self._reserved - len(self.core.written_here) * self.start.chunk_size)
        except OSError as exc:
            if self._fd >= 0:
                self.fail(ReceiveError(f"cannot persist {self.partial}: {exc.strerror}", "io"))

    def _stop_streams(self) -> None:
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.abort()

    def close(self, timeout: float = 5.0) -> None:
        """Stop streams, make the journal durable, release the destination lock."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._stop_streams()
        if self._control is not None:
            with contextlib.suppress(OSError):
                self._control.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        self._flusher.join(max(0.0, deadline - time.monotonic()))
        if self.baseline is not None:
            os.close(self.baseline.fd)
        self.reservation.close()  # after the final flush: see space.PartialReservation
        os.close(self._fd)
        self._fd = -1
        self.directory.unlink(self.directory.reserve_name)  # a later Start reserves what is missing then
        self.journal.close()
        self.directory.close()


def _raise_for(fast: native_stream.RawFrameReceiver, outcome: int) -> NoReturn:
    """The error a native receive outcome (TAG, CLOSED, OS_ERROR) stands for."""
    if outcome == native_stream.TAG:
        raise wire.FrameError("frame authentication failed (altered, replayed or reordered)", "tag")
    if outcome == native_stream.CLOSED:
        raise wire.PeerClosed("peer closed the connection" + (" mid-frame" if fast.partial else ""))
    if outcome == native_stream.OS_ERROR:
        raise OSError(fast.error, os.strerror(fast.error))
    raise RuntimeError(f"unexpected native receive outcome {outcome}")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def open_session(start: wire.Start, allowed: list[Path], metrics: Metrics,
                 pool: BufferPool | None = None, free: FreeBytes = space.free_bytes,
                 index_budget_bytes: int = DEFAULT_INDEX_BUDGET) -> ReceiveSession:
    """Validate a Start and open its session, mapping every refusal to a ReceiveError."""
    if start.size < 0 or start.chunk_size <= 0 or start.chunk_size % 4096 or start.chunk_size > 64 << 20:
        raise ReceiveError(f"invalid geometry: size {start.size}, chunk size {start.chunk_size}", "bad_request")
    try:
        directory = DestinationDir(start.dest_path, allowed)
    except UnsafePath as exc:
        raise ReceiveError(str(exc), exc.error_type) from exc
    try:
        return ReceiveSession(start, directory, metrics, pool=pool, free=free, index_budget_bytes=index_budget_bytes)
    except BaseException as exc:
        directory.close()
        if isinstance(exc, JournalBusy):
            raise ReceiveError(str(exc), "busy") from exc
        if isinstance(exc, UnsafePath):
            raise ReceiveError(str(exc), exc.error_type) from exc
        if isinstance(exc, PermissionError):
            raise ReceiveError(f"cannot write beside {directory.path}: {exc.strerror}", "unwritable") from exc
        raise
