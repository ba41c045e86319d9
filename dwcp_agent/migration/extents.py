"""Where a source image holds data: the SEEK_DATA / SEEK_HOLE walk, rounded out to whole chunks.

Raw VM disks are mostly holes. The filesystem already knows where they are, so the source asks
it (as `qemu-img convert` and `cp --sparse` do) instead of reading and scanning zeros. A chunk
that overlaps any data byte is a data chunk; the rest go as hole runs that are never read,
hashed or sent. Block devices, and filesystems without SEEK_DATA, are all data.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

# A Start carries at most this many data ranges; finer maps are coalesced (over-reserving a little).
MAX_RANGES = 4096


@dataclass(frozen=True)
class ChunkRun:
    """`count` consecutive chunks from chunk `start`, all data or all hole."""

    start: int
    count: int
    data: bool


def file_size(fd: int) -> int:
    """Logical size of a regular file or block device (st_size is 0 for block devices)."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """Byte ranges [start, end) holding data, in order (whole file when holes cannot be asked for)."""
    if size == 0:
        return
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        yield 0, size
        return
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no hole support: all data
                yield pos, size
                return
            raise
        if start >= size:
            return
        try:
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            end = size
        yield start, end
        pos = end


def fully_allocated(fd: int, size: int) -> bool:
    """Every byte of the file has a block: no hole to find. The SEEK_HOLE walk costs the kernel a
    page-cache lookup per page on tmpfs (15-20 ms per GiB, before the first byte goes out)."""
    st = os.fstat(fd)
    return stat.S_ISREG(st.st_mode) and st.st_blocks * 512 >= size


def chunk_runs(fd: int, size: int, chunk_size: int) -> list[ChunkRun]:
    """The image as alternating data and hole runs of whole chunks, covering every chunk once."""
    chunks = (size + chunk_size - 1) // chunk_size
    if chunks and fully_allocated(fd, size):
        return [ChunkRun(0, chunks, True)]
    runs: list[ChunkRun] = []
    covered = 0  # chunks [0, covered) are in `runs`
    for start, end in data_extents(fd, size):
        first, last = start // chunk_size, (end - 1) // chunk_size + 1
        if last <= covered:
            continue
        first = max(first, covered)
        if first > covered:
            runs.append(ChunkRun(covered, first - covered, False))
        if runs and runs[-1].data and runs[-1].start + runs[-1].count == first:
            prev = runs.pop()
            runs.append(ChunkRun(prev.start, last - prev.start, True))
        else:
            runs.append(ChunkRun(first, last - first, True))
        covered = last
    if covered < chunks:
        runs.append(ChunkRun(covered, chunks - covered, False))
    return runs


def data_ranges(runs: list[ChunkRun], size: int, chunk_size: int,
                max_ranges: int = MAX_RANGES) -> list[tuple[int, int]]:
    """Byte (offset, length) of the data runs, for the Start message; beyond `max_ranges` the
    closest ranges are merged, so the destination may reserve a little more, never less."""
    ranges = [(r.start * chunk_size, min(size, (r.start + r.count) * chunk_size) - r.start * chunk_size)
              for r in runs if r.data]
    while len(ranges) > max_ranges:
        merged: list[tuple[int, int]] = []
        for i in range(0, len(ranges) - 1, 2):
            (a, _), (b, lb) = ranges[i], ranges[i + 1]
            merged.append((a, b + lb - a))
        if len(ranges) % 2:
            merged.append(ranges[-1])
        ranges = merged
    return ranges


def holes_moved(fd: int, size: int, chunk_size: int, holes: list[ChunkRun]) -> list[ChunkRun]:
    """Of the hole runs announced, those that now hold data (the source was written meanwhile)."""
    moved: list[ChunkRun] = []
    for run in holes:
        begin, end = run.start * chunk_size, min(size, (run.start + run.count) * chunk_size)
        try:
            found = os.lseek(fd, begin, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                continue
            raise
        if found < end:
            moved.append(run)
    return moved
