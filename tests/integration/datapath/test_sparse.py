"""Sparse images end to end on loopback: holes skipped, kept, punched; space by data; moving holes."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from datapath_support import PSK, Receiver, make_config, run_migration

from dwcp_agent import wire
from dwcp_agent.migration import space
from dwcp_agent.migration.extents import ChunkRun
from dwcp_agent.migration.journal import Identity, Journal
from dwcp_agent.migration.model import MigrationRequest
from dwcp_agent.migration.receiver import ReceiveError, open_session
from dwcp_agent.migration.sender import SendSession
from dwcp_agent.telemetry.metrics import Metrics

MiB, GiB = 1 << 20, 1 << 30


def sparse_image(path: Path, size: int, regions: list[tuple[int, int]], seed: int = 1) -> Path:
    """A sparse file of `size` bytes with random data in the (offset, length) regions only."""
    with open(path, "wb") as f:
        f.truncate(size)
        for i, (offset, length) in enumerate(regions):
            f.seek(offset)
            f.write(hashlib.shake_256(f"{seed}-{i}".encode()).digest(length))
    return path


def _extents(fd: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of the data, asked of the filesystem directly (not through the code under test)."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end))
        pos = end
    return out


def same_content(a: Path, b: Path) -> bool:
    """Byte equality read through SEEK_DATA, so terabyte-sized sparse files compare in the time of
    their data: `a`'s data is compared with `b`, then `b`'s data where `a` has holes must be zeros."""
    size = a.stat().st_size
    if size != b.stat().st_size:
        return False
    step = 8 * MiB
    zeros = bytes(step)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        in_a = _extents(fa.fileno(), size)
        for start, end in in_a:
            for off in range(start, end, step):
                n = min(step, end - off)
                if os.pread(fa.fileno(), n, off) != os.pread(fb.fileno(), n, off):
                    return False
        for start, end in _extents(fb.fileno(), size):
            pos = start
            for a_start, a_end in in_a:
                if a_end <= pos or a_start >= end:
                    continue
                if a_start > pos and not _zeros(fb.fileno(), pos, a_start, zeros):
                    return False
                pos = max(pos, a_end)
            if pos < end and not _zeros(fb.fileno(), pos, end, zeros):
                return False
    return True


def _zeros(fd: int, start: int, end: int, zeros: bytes) -> bool:
    for off in range(start, end, len(zeros)):
        n = min(len(zeros), end - off)
        if os.pread(fd, n, off) != zeros[:n]:
            return False
    return True


def test_holes_are_not_sent_and_stay_holes(receiver: Receiver, src_dir: Path, migrate: Any) -> None:
    size = 256 * MiB
    source = sparse_image(src_dir / "vm.img", size, [(0, 2 * MiB), (100 * MiB, 3 * MiB), (size - MiB, MiB)])
    result = migrate(receiver, source, compression_algo="none")
    dest = receiver.dir / "out.img"
    assert same_content(source, dest)
    assert result.wire_bytes < 7 * MiB, f"{result.wire_bytes} wire bytes for 6 MiB of data in 256 MiB"
    assert dest.stat().st_blocks * 512 < 8 * MiB, "the destination must keep the holes"


def test_holes_punch_older_bytes_of_a_resumed_partial(receiver: Receiver, src_dir: Path, tmp_path: Path) -> None:
    size, chunk = 32 * MiB, MiB
    source = sparse_image(src_dir / "vm.img", size, [(0, MiB)])
    dest = receiver.dir / "out.img"
    # An earlier interrupted migration of the same VM left a partial full of data and a journal.
    partial = dest.with_name(dest.name + ".dwcp-part")
    partial.write_bytes(b"\xee" * size)
    journal = Journal(dest.with_name(dest.name + ".dwcp-journal"), Identity(size, chunk, "vm-test"))
    journal.add(5, 1234)
    journal.flush(os.open(partial, os.O_RDONLY))
    journal.close()
    run_migration(tmp_path, receiver, source, compression_algo="none")
    assert same_content(source, dest)
    assert dest.stat().st_blocks * 512 < 4 * MiB, "old bytes under the holes must be punched, not kept"


def test_a_128_gib_image_with_16_gib_of_data_fits_in_50_gib(receiver: Receiver) -> None:
    """The space decision of issue 16, with the destination's free space under the test's control
    (the ranges are reserved for real, so they are scaled down 1024 times: MiB for GiB)."""
    data = [(i * 8 * MiB, MiB) for i in range(16)]
    start = wire.Start("m-space", "vm", str(receiver.dir / "big.img"), 128 * MiB, MiB, 4, "v3",
                       16 * MiB, data)
    free = {"bytes": 50 * MiB}
    session = open_session(start, receiver.config.allowed_dest_dirs, Metrics(), free=lambda _fd: free["bytes"])
    try:
        partial = receiver.dir / "big.img.dwcp-part"
        assert partial.stat().st_size == 128 * MiB
        # beside the partial, or on tmpfs inside it (space.PartialReservation)
        reserve = receiver.dir / "big.img.dwcp-reserve"
        reserved = (reserve if reserve.exists() else partial).stat().st_blocks * 512
        assert 16 * MiB <= reserved < 17 * MiB, "reserve the data ranges' bytes, not the image"
    finally:
        session.close()
    # The same image with the logical size as its data (a pre-sparse source) is refused, and
    # the refusal leaves nothing behind.
    full = wire.Start("m-space2", "vm", str(receiver.dir / "full.img"), 128 * MiB, MiB, 4, "v3")
    with pytest.raises(ReceiveError) as refused:
        open_session(full, receiver.config.allowed_dest_dirs, Metrics(), free=lambda _fd: free["bytes"])
    assert refused.value.error_type == "no_space"
    assert not list(receiver.dir.glob("full.img*"))


class MovingHoles(SendSession):
    """A source that is written to, inside a hole, right after its first walk."""

    writes = 0

    def plan(self) -> list[ChunkRun]:
        runs = super().plan()
        if not MovingHoles.writes:
            MovingHoles.writes += 1
            with open(self.request.source, "r+b") as f:
                f.seek(20 * MiB + 4096)
                f.write(b"written during the migration" * 100)
        return runs


def test_holes_that_move_during_the_migration_are_resent(receiver: Receiver, src_dir: Path,
                                                          tmp_path: Path) -> None:
    source = sparse_image(src_dir / "vm.img", 64 * MiB, [(0, 2 * MiB)])
    request = MigrationRequest("m-moving", "vm-test", source, "127.0.0.1", receiver.port,
                               str(receiver.dir / "out.img"))
    metrics = Metrics()
    MovingHoles.writes = 0
    result = MovingHoles(make_config(tmp_path, compression_algo="none"), metrics, PSK, request).run()
    assert result.attempts == 2, "the attempt that announced the moved hole must not commit"
    assert metrics.registry.get_sample_value(
        "dwcp_v3_errors_total", {"component": "migration", "error_type": "source_changed"}) == 1
    assert same_content(source, receiver.dir / "out.img")


def test_a_large_sparse_baseline_is_offered_within_the_budget(receiver: Receiver, src_dir: Path,
                                                             migrate: Any) -> None:
    """A repeat migration of a 64 GiB image holding 32 MiB: the destination's earlier copy goes as a
    sparse have-list (rows for data pages only, holes free), so only the changed MiB travels.
    A dense have-list would be 16 M pages (256 MiB), over the budget, and everything would go."""
    size = 64 * GiB
    regions = [(i * 16 * GiB + 5 * MiB, 8 * MiB) for i in range(4)]
    sparse_image(receiver.dir / "out.img", size, regions)  # the earlier image, at the destination
    source = sparse_image(src_dir / "vm.img", size, regions)
    with open(source, "r+b") as f:
        f.seek(16 * GiB + 6 * MiB)
        f.write(os.urandom(MiB))
    result = migrate(receiver, source, compression_algo="none")
    assert same_content(source, receiver.dir / "out.img")
    assert result.wire_bytes < 4 * MiB, f"{result.wire_bytes} wire bytes: the baseline was not used"


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A directory of its own on tmpfs (/dev/shm), where the reservation is made inside the partial."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm: this test needs a tmpfs")
    with tempfile.TemporaryDirectory(prefix=f"dwcp-sparse-{os.getpid()}-", dir="/dev/shm") as tmp:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            if not space.in_memory(fd):
                pytest.skip("/dev/shm is not a tmpfs here")
        finally:
            os.close(fd)
        yield Path(tmp)


def test_on_tmpfs_zero_pages_of_data_ranges_stay_holes(shm_dir: Path, src_dir: Path, tmp_path: Path) -> None:
    """On tmpfs the data ranges are preallocated in the partial (space.PartialReservation); the
    zero pages the receiver skips must not keep their preallocated memory in the committed image."""
    page = 4096
    data = bytearray(hashlib.shake_256(b"half-zero").digest(8 * MiB))
    for p in range(0, len(data), 2 * page):  # every other page of the first 8 MiB is zeros
        data[p:p + page] = bytes(page)
    source = src_dir / "vm.img"
    with open(source, "wb") as f:
        f.truncate(64 * MiB)
        f.write(data)
        f.write(bytes(4 * MiB))  # written zeros: a data extent of the source, nothing to keep
        f.seek(40 * MiB)
        f.write(hashlib.shake_256(b"tail").digest(MiB))
    receiver = Receiver(tmp_path, dest_dirs=[str(shm_dir)])
    receiver.dir = shm_dir
    try:
        run_migration(tmp_path, receiver, source, compression_algo="lz4")
        dest = receiver.dir / "out.img"
        assert same_content(source, dest) and dest.read_bytes() == source.read_bytes()
        assert not (receiver.dir / "out.img.dwcp-reserve").exists()
        kept = dest.stat().st_blocks * 512
        assert kept <= 5 * MiB + 64 * 1024, f"{kept} bytes kept for 5 MiB of non-zero pages"
    finally:
        receiver.stop()
