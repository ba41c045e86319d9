"""The source's hole walk, the hole set, the space decision and the hole digest rule."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from dwcp_agent.hde.chunk import checksum
from dwcp_agent.migration import space
from dwcp_agent.migration.digest import chunk_count, hole_checksums, object_digest, reread_checksums
from dwcp_agent.migration.extents import ChunkRun, chunk_runs, data_extents, data_ranges, holes_moved
from dwcp_agent.migration.holes import HoleSet

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def _sparse(path: Path, size: int, writes: list[tuple[int, bytes]]) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, size)
    for offset, data in writes:
        os.pwrite(fd, data, offset)
    return fd


def test_chunk_runs_follow_the_filesystem_holes(tmp_path: Path) -> None:
    chunk = 1 * MiB
    fd = _sparse(tmp_path / "img", 64 * MiB + 4 * KiB, [(3 * MiB + 100, b"x" * 10), (40 * MiB, b"y" * (2 * MiB + 1)),
                                                         (64 * MiB, b"z")])
    try:
        runs = chunk_runs(fd, 64 * MiB + 4 * KiB, chunk)
    finally:
        os.close(fd)
    assert runs == [ChunkRun(0, 3, False), ChunkRun(3, 1, True), ChunkRun(4, 36, False), ChunkRun(40, 3, True),
                    ChunkRun(43, 21, False), ChunkRun(64, 1, True)]
    assert sum(r.count for r in runs) == chunk_count(64 * MiB + 4 * KiB, chunk)
    ranges = data_ranges(runs, 64 * MiB + 4 * KiB, chunk)
    assert ranges == [(3 * MiB, MiB), (40 * MiB, 3 * MiB), (64 * MiB, 4 * KiB)]
    merged = data_ranges(runs, 64 * MiB + 4 * KiB, chunk, max_ranges=2)
    assert len(merged) <= 2 and sum(n for _, n in merged) >= sum(n for _, n in ranges)


def test_a_fully_allocated_image_is_one_data_run_and_one_hole_still_shows(tmp_path: Path) -> None:
    """Every block allocated: one data run without the SEEK_HOLE walk. A single missing page
    (st_blocks short of the size) takes the walk and finds it."""
    size = 8 * MiB + 4 * KiB
    fd = _sparse(tmp_path / "dense", size, [(0, os.urandom(size))])
    try:
        assert chunk_runs(fd, size, MiB) == [ChunkRun(0, 9, True)]
        space.punch_hole(fd, 5 * MiB, MiB)
        assert chunk_runs(fd, size, MiB) == [ChunkRun(0, 5, True), ChunkRun(5, 1, False), ChunkRun(6, 3, True)]
    finally:
        os.close(fd)


def test_a_one_tebibyte_hole_walk_reads_nothing(tmp_path: Path) -> None:
    fd = _sparse(tmp_path / "big", 1 << 40, [(512 * GiB, b"d" * 4096)])
    try:
        runs = chunk_runs(fd, 1 << 40, MiB)
    finally:
        os.close(fd)
    assert [r for r in runs if r.data] == [ChunkRun(512 * 1024, 1, True)]
    assert len(runs) == 3


def test_holes_that_gained_data_are_found(tmp_path: Path) -> None:
    fd = _sparse(tmp_path / "img", 16 * MiB, [(0, b"a" * MiB)])
    try:
        holes = [r for r in chunk_runs(fd, 16 * MiB, MiB) if not r.data]
        assert holes_moved(fd, 16 * MiB, MiB, holes) == []
        os.pwrite(fd, b"new", 9 * MiB)
        assert holes_moved(fd, 16 * MiB, MiB, holes) == holes
    finally:
        os.close(fd)


def test_hole_set_merges_out_of_order_runs() -> None:
    holes = HoleSet()
    for first, count in [(10, 5), (0, 3), (3, 2), (14, 4), (30, 1)]:
        holes.add(first, count)
    merged = holes.merged()
    assert merged == [(0, 5), (10, 8), (30, 1)]
    assert [i for i in range(32) if HoleSet.contains(merged, i)] == [*range(5), *range(10, 18), 30]


def test_a_hole_and_written_zeros_give_the_same_digest(tmp_path: Path) -> None:
    size, chunk = 5 * MiB + 8 * KiB, MiB
    fd = _sparse(tmp_path / "zeros", size, [])
    os.pwrite(fd, bytes(size), 0)  # written zeros, allocated
    try:
        written = object_digest(reread_checksums(fd, size, chunk, range(chunk_count(size, chunk))))
    finally:
        os.close(fd)
    sums = np.zeros(chunk_count(size, chunk), dtype=np.uint64)
    hole_checksums(sums, 0, chunk_count(size, chunk), size, chunk)
    assert object_digest(sums) == written
    assert int(sums[-1]) == checksum(bytes(8 * KiB))


def test_space_is_decided_by_the_bytes_to_write_not_the_logical_size(tmp_path: Path) -> None:
    # Issue 16's refusal: 128 GiB image, 16 GiB of data, 50 GiB free.
    assert space.fits(16 * GiB, 50 * GiB)
    assert not space.fits(128 * GiB, 50 * GiB)
    # A resumed partial needs only the data ranges it does not hold yet.
    fd = _sparse(tmp_path / "part", 64 * MiB, [(0, b"a" * 3 * MiB), (40 * MiB, b"b" * MiB)])
    try:
        ranges = [(0, 4 * MiB), (40 * MiB, 2 * MiB), (60 * MiB, 4 * MiB)]
        assert space.missing_bytes(fd, ranges) == MiB + MiB + 4 * MiB
        assert space.check(fd, ranges, free=lambda _fd: 6 * MiB) == 6 * MiB
        try:
            space.check(fd, ranges, free=lambda _fd: 5 * MiB)
            raise AssertionError("5 MiB free must refuse 6 MiB")
        except space.NoSpace as exc:
            assert exc.needed == 6 * MiB and exc.free == 5 * MiB
    finally:
        os.close(fd)


def test_a_reservation_holds_space_and_gives_it_back_as_chunks_land(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "reserve", os.O_RDWR | os.O_CREAT, 0o600)
    reservation = space.Reservation(fd, 8 * MiB)
    try:
        assert os.fstat(fd).st_blocks * 512 >= 8 * MiB
        reservation.shrink_to(3 * MiB)
        assert 3 * MiB <= os.fstat(fd).st_blocks * 512 < 4 * MiB
        reservation.shrink_to(5 * MiB)  # never grows back
        assert reservation.held == 3 * MiB
    finally:
        reservation.close()


def _on_tmpfs(path: Path) -> bool:
    if not path.is_dir():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        return space.in_memory(fd)
    finally:
        os.close(fd)


def test_on_tmpfs_the_reservation_is_the_partials_own_pages_and_unwritten_ones_become_holes() -> None:
    """PartialReservation: the data ranges are preallocated in the partial, written pages keep
    their bytes, pages never written (zero pages the receiver skips) are punched at close."""
    if not _on_tmpfs(Path("/dev/shm")):
        pytest.skip("needs a tmpfs at /dev/shm (where fallocate allocates memory pages)")
    with tempfile.TemporaryDirectory(prefix=f"dwcp-perf-{os.getpid()}-", dir="/dev/shm") as tmp:
        fd = _sparse(Path(tmp) / "part", 32 * MiB, [])
        try:
            reservation = space.PartialReservation(fd, [(0, 4 * MiB), (16 * MiB, 4 * MiB)], 8 * MiB)
            assert reservation.held == 8 * MiB
            assert os.fstat(fd).st_blocks * 512 >= 8 * MiB, "the ranges' bytes are held"
            assert list(data_extents(fd, 32 * MiB)) == [], "preallocated, never written: holes"
            os.pwrite(fd, b"a" * MiB, MiB)
            os.pwrite(fd, b"b" * 4096, 17 * MiB)
            reservation.shrink_to(2 * MiB)
            assert os.fstat(fd).st_blocks * 512 >= 8 * MiB, "nothing given back before close"
            reservation.close()
            assert os.fstat(fd).st_blocks * 512 == MiB + 4096, "only the written pages stay"
            assert os.pread(fd, MiB, MiB) == b"a" * MiB and os.pread(fd, 4096, 17 * MiB) == b"b" * 4096
            assert os.pread(fd, MiB, 2 * MiB) == bytes(MiB)
            assert list(data_extents(fd, 32 * MiB)) == [(MiB, 2 * MiB), (17 * MiB, 17 * MiB + 4096)]
        finally:
            os.close(fd)


def test_a_punched_hole_reads_as_zeros_and_frees_its_blocks(tmp_path: Path) -> None:
    fd = _sparse(tmp_path / "part", 16 * MiB, [(4 * MiB, b"q" * MiB)])
    try:
        before = os.fstat(fd).st_blocks
        space.punch_hole(fd, 4 * MiB, MiB)
        assert os.pread(fd, MiB, 4 * MiB) == bytes(MiB)
        assert os.fstat(fd).st_blocks < before
    finally:
        os.close(fd)


def test_chunks_a_resumed_journal_holds_are_not_reserved_again() -> None:
    ranges = [(0, 4 * MiB), (8 * MiB, 4 * MiB), (20 * MiB, MiB + 4 * KiB)]
    assert space.without_chunks(ranges, [], MiB) == ranges
    # chunks 1, 2 (inside the first range), 7..8 (straddling the second's start), 20 and 21
    # (the last range's whole first MiB and the start of its short tail)
    assert space.without_chunks(ranges, [21, 2, 1, 8, 7, 20], MiB) == [
        (0, MiB), (3 * MiB, MiB), (9 * MiB, 3 * MiB)]
    assert space.without_chunks(ranges, range(64), MiB) == []
