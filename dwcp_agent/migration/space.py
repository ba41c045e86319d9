"""Disk space of an incoming image: check and reserve the bytes that will be written, not the logical size.

The destination keeps the source's holes, so a 128 GiB image holding 16 GiB of data needs 16 GiB.
The Start message names the data ranges; the destination reserves the bytes of those it does
not hold yet (`posix_fallocate` of a reservation file beside the partial, shrunk as chunks are
written), so holes and zero pages stay holes and a resumed partial reserves only what it lacks.
Holes announced into a file that may hold older bytes are punched (`FALLOC_FL_PUNCH_HOLE`).
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

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.held = 0


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
