"""Disk space of an incoming image: check and reserve the bytes that will be written, not the logical size.

The destination keeps the source's holes, so a 128 GiB image holding 16 GiB of data needs 16 GiB.
The Start message names the data ranges; the destination reserves exactly those with
`posix_fallocate` (holes stay holes), and a resumed partial reserves only what it lacks.
Holes announced into a file that may hold older bytes are punched (`FALLOC_FL_PUNCH_HOLE`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Callable

import numpy as np

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


def allocated_bytes(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def missing_bytes(data_bytes: int, already_allocated: int) -> int:
    """What a (possibly resumed) partial file still has to allocate."""
    return max(0, data_bytes - already_allocated)


def fits(needed: int, free: int) -> bool:
    """The space decision: the bytes still to be written fit in what is free."""
    return needed <= free


def check(fd: int, data_bytes: int, resumed: bool, free: Callable[[int], int] = free_bytes) -> int:
    """The bytes still to allocate for this image in `fd`'s filesystem, or NoSpace. A resumed
    partial counts what it already holds; a fresh one starts from nothing."""
    needed = missing_bytes(data_bytes, allocated_bytes(fd) if resumed else 0)
    available = free(fd)
    if not fits(needed, available):
        raise NoSpace(needed, available)
    return needed


def allocate(fd: int, ranges: list[tuple[int, int]]) -> None:
    """Reserve the data ranges (holes stay holes); ranges already allocated cost nothing."""
    for offset, length in ranges:
        if length <= 0:
            continue
        try:
            os.posix_fallocate(fd, offset, length)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(length, free_bytes(fd)) from exc
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise


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


def release_zero_pages(fd: int, zero: np.ndarray, offset: int, length: int) -> None:
    """Give back the reserved blocks of a chunk's zero pages (`zero`: 1 per all-zero page), so
    zero pages inside data ranges end up as holes, as they would without the reservation."""
    pages = (length + 4095) // 4096
    mask = np.asarray(zero, dtype=np.uint8)[:pages]
    if not mask.any():
        return
    edges = np.flatnonzero(np.diff(np.concatenate(([0], (mask != 0).astype(np.int8), [0]))))
    for first, end in edges.reshape(-1, 2):
        start = int(first) * 4096
        punch_hole(fd, offset + start, min(int(end) * 4096, length) - start)
