"""Disk space of an incoming image: check and reserve the bytes that will be written, not the logical size.

The destination keeps the source's holes, so a 128 GiB image holding 16 GiB of data needs 16 GiB.
The Start message names the data ranges; the destination reserves the bytes of those it does
not hold yet (`posix_fallocate` of a reservation file beside the partial, shrunk as chunks are
written), so holes and zero pages stay holes and a resumed partial reserves only what it lacks.
Holes announced into a file that may hold older bytes are punched (`FALLOC_FL_PUNCH_HOLE`).

On tmpfs the reservation is made in the partial itself instead (`PartialReservation`): there
fallocate allocates a memory page per 4 KiB and truncate frees it, so a reservation file beside
the partial costs an allocation and a free per byte received on top of the partial's own
(measured: a quarter of the destination's CPU on raw data). Preallocated pages are what the
writes then fill; the zero pages the receiver skips are punched as it skips them, so they stay
holes. A session that ends without a commit punches what it never wrote: tmpfs reports
preallocated pages never written as holes (SEEK_HOLE).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Callable, Iterable

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_ZEROS = bytes(1 << 20)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libc.fstatfs.restype = ctypes.c_int
TMPFS_MAGIC = 0x01021994
_STATFS_BYTES = 256  # struct statfs is 120 bytes on 64-bit Linux; f_type is its first field (a long)


class NoSpace(Exception):
    """The filesystem cannot hold the bytes this image will write."""

    def __init__(self, needed: int, free: int) -> None:
        super().__init__(f"need {needed} bytes, {free} free")
        self.needed = needed
        self.free = free


def free_bytes(fd: int) -> int:
    """Bytes an unprivileged writer may still allocate on the filesystem of `fd`."""
    st = os.fstatvfs(fd)
    return st.f_bavail * st.f_frsize


def missing_bytes(fd: int, ranges: list[tuple[int, int]]) -> int:
    """Bytes of `ranges` (non-overlapping) that `fd` holds no data for yet."""
    from dwcp_agent.migration.extents import data_extents

    extents = data_extents(fd, os.fstat(fd).st_size)
    extent = next(extents, None)
    missing = 0
    for offset, length in sorted(ranges):
        end = offset + length
        covered = 0
        while extent is not None and extent[0] < end:
            covered += max(0, min(end, extent[1]) - max(offset, extent[0]))
            if extent[1] > end:  # it continues into the next range
                break
            extent = next(extents, None)
        missing += length - covered
    return missing


def without_chunks(ranges: list[tuple[int, int]], chunks: Iterable[int],
                   chunk_size: int) -> list[tuple[int, int]]:
    """`ranges` less the given whole chunks: those a resumed partial holds verified (its journal),
    where a hole is a zero page left unwritten, not a byte still to come."""
    held: list[tuple[int, int]] = []  # byte runs of consecutive chunks, ascending
    for index in sorted(chunks):
        start = index * chunk_size
        if held and held[-1][1] == start:
            held[-1] = (held[-1][0], start + chunk_size)
        else:
            held.append((start, start + chunk_size))
    out: list[tuple[int, int]] = []
    i = 0
    for offset, length in sorted(ranges):
        pos, end = offset, offset + length
        while i < len(held) and held[i][1] <= pos:
            i += 1
        j = i
        while pos < end and j < len(held) and held[j][0] < end:
            if held[j][0] > pos:
                out.append((pos, held[j][0] - pos))
            pos = max(pos, held[j][1])
            j += 1
        if pos < end:
            out.append((pos, end - pos))
    return out


def fits(needed: int, free: int) -> bool:
    """The space decision: the bytes still to be written fit in what is free."""
    return needed <= free


def check(fd: int, ranges: list[tuple[int, int]], free: Callable[[int], int] = free_bytes) -> int:
    """The bytes the data ranges still need in `fd` (a resumed partial counts what it holds), or
    NoSpace when the filesystem has less free."""
    needed = missing_bytes(fd, ranges)
    available = free(fd)
    if not fits(needed, available):
        raise NoSpace(needed, available)
    return needed


class Reservation:
    """`needed` bytes held for an incoming image in a file of their own beside the partial,
    allocated with posix_fallocate at Start and given back as the image's chunks are written.

    The reservation is not taken in the partial itself: its zero pages are never written and
    stay holes, and punching them out of a preallocated range costs a journal transaction each.
    """

    def __init__(self, fd: int, needed: int) -> None:
        self.fd = fd
        self.held = 0
        try:
            if needed > 0:
                os.posix_fallocate(fd, 0, needed)
            self.held = needed
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(needed, free_bytes(fd)) from exc
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise

    def shrink_to(self, remaining: int) -> None:
        """Keep only `remaining` bytes reserved (the rest has been written into the partial)."""
        remaining = max(0, remaining)
        if remaining < self.held and self.fd >= 0:
            os.ftruncate(self.fd, remaining)
            self.held = remaining

    def settle(self) -> None:
        """At commit: nothing to do here, the file goes when the session closes."""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.held = 0


class PartialReservation:
    """`needed` bytes held for an incoming image inside its partial on tmpfs: the data ranges
    preallocated (FALLOC_FL_KEEP_SIZE) at Start, filled in place by the writes; zero pages the
    receiver skips are punched as it skips them, and a session that ends without a commit
    punches every page never written (`close`).

    `close` must run after the last write whose chunk is journalled (the session's final flush):
    a page written concurrently is not part of the kept image, so punching it loses nothing."""

    def __init__(self, fd: int, ranges: list[tuple[int, int]], needed: int) -> None:
        self.fd = fd  # the partial's: owned by the session, not closed here
        self.held = 0
        try:
            for offset, length in ranges if needed > 0 else ():
                _fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            release_unwritten(fd)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(needed, free_bytes(fd)) from exc
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            return
        self.held = needed

    def shrink_to(self, remaining: int) -> None:
        """Written chunks took their preallocated pages: nothing to give back until `close`."""
        self.held = max(0, min(self.held, remaining))

    def settle(self) -> None:
        """At commit: nothing left to give back. Every chunk was written whole, or its zero pages
        were punched as they were skipped, or it was a hole run (punched); a walk of the file
        would cost syscalls per zero run (15k for 256 MiB of vm-mix) for nothing."""
        self.fd = -1
        self.held = 0

    def close(self) -> None:
        if self.fd >= 0:
            release_unwritten(self.fd)
            self.fd = -1
            self.held = 0


def in_memory(fd: int) -> bool:
    """The file lives on tmpfs, where fallocate allocates memory pages one by one."""
    buf = ctypes.create_string_buffer(_STATFS_BYTES)
    if _libc.fstatfs(fd, buf) != 0:
        return False
    return ctypes.c_long.from_buffer(buf).value == TMPFS_MAGIC


def release_unwritten(fd: int) -> None:
    """Punch every hole of a tmpfs file, which frees preallocated pages never written (tmpfs
    reports those as holes) and leaves written bytes alone."""
    from dwcp_agent.migration.extents import data_extents

    size = os.fstat(fd).st_size
    pos = 0
    for start, end in data_extents(fd, size):
        punch_hole(fd, pos, start - pos)
        pos = end
    punch_hole(fd, pos, size - pos)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    while length > 0 and _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:  # tmpfs gives up a long fallocate on a pending signal
            raise OSError(err, os.strerror(err))


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset + length) read as zeros and release its blocks (zeros written where
    the filesystem cannot punch)."""
    if length <= 0:
        return
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise OSError(err, os.strerror(err))
    done = 0
    while done < length:
        n = min(len(_ZEROS), length - done)
        done += os.pwrite(fd, _ZEROS[:n], offset + done)
