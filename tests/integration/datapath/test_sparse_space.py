"""Issue 16 acceptance: a 128 GiB image holding 16 GiB of data is accepted by a destination with
50 GiB free, on a real filesystem of that size, without writing 16 GiB.

The destination is an ext4 filesystem of ~50 GiB free on a loop device whose backing file is
sparse (a few MiB allocated). The destination agent's real data server gets, over an
authenticated loopback control connection, the Start a source sends for the issue's image: 128
GiB logical, sixteen 1 GiB data ranges one every 8 GiB (the source's SEEK_DATA walk is tested on
real files in test_sparse.py). Accepting means the statvfs check passed and the 16 GiB were
reserved for real: `posix_fallocate` on ext4 allocates the blocks (unwritten extents, so only
bitmaps are written) and the filesystem's free space drops by 16 GiB. Then the source cancels
(Abort), and nothing is left behind and the space comes back. Moving the 16 GiB would prove
nothing more about the space decision and take minutes; the data path is tested elsewhere.

If the check counted the logical size (128 GiB > 50 GiB) the Start would be refused: the same
filesystem refuses the same image sent without a hole map (data_bytes -1, a pre-sparse source).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from datapath_support import PSK, Receiver

from dwcp_agent import wire
from dwcp_agent.hde.chunk import checksum
from dwcp_agent.migration.journal import Identity, Journal
from dwcp_agent.migration.receiver import open_session
from dwcp_agent.telemetry.metrics import Metrics

MiB, GiB = 1 << 20, 1 << 30
SIZE, REGION, STRIDE = 128 * GiB, GiB, 8 * GiB  # the image: 1 GiB of data every 8 GiB


@pytest.fixture
def fifty_gib_free(tmp_path: Path) -> Iterator[Path]:
    """An ext4 filesystem with ~50 GiB free on a sparse loop file, mounted at tmp_path/dst."""
    if os.geteuid() != 0:
        pytest.skip("mounting a loop filesystem needs root")
    backing, mnt = tmp_path / "fifty.ext4", tmp_path / "dst"
    mnt.mkdir()
    with open(backing, "wb") as f:
        f.truncate(50 * GiB + 160 * MiB)  # ext4's metadata takes the 160 MiB
    mkfs = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-N", "1024", "-J", "size=64",
                           "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", str(backing)],
                          capture_output=True, text=True)
    if mkfs.returncode != 0:
        pytest.skip(f"mkfs.ext4 is not usable here: {mkfs.stderr.strip()}")
    mount = subprocess.run(["mount", "-o", "loop,noinit_itable", str(backing), str(mnt)], capture_output=True,
                           text=True)
    if mount.returncode != 0:
        pytest.skip(f"no loop device to mount a test filesystem: {mount.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)  # the loop device goes once unused
        backing.unlink(missing_ok=True)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _control(receiver: Receiver) -> socket.socket:
    sock = receiver.peer_channels("sparse-source").wrap_client(
        socket.create_connection(("127.0.0.1", receiver.port), timeout=10))
    wire.client_handshake(sock, PSK, "sparse-source", "control")
    return sock


def test_128_gib_image_with_16_gib_of_data_is_accepted_with_50_gib_free(fifty_gib_free: Path,
                                                                       tmp_path: Path) -> None:
    free_before = _free(fifty_gib_free)
    assert 49 * GiB < free_before < 51 * GiB, f"the test filesystem has {free_before / GiB:.2f} GiB free"
    receiver = Receiver(tmp_path)
    try:
        # The image without a hole map needs its logical size: refused, nothing left behind.
        with _control(receiver) as control:
            wire.send_message(control, wire.Start("m-logical", "vm-big", str(fifty_gib_free / "logical.img"),
                                                  SIZE, 4 * MiB, 4, "v3"))
            with pytest.raises(wire.WireError) as refused:
                wire.recv_message(control, wire.Ready)
        assert refused.value.error_type == "no_space", refused.value
        assert receiver.wait_errors("migration", "no_space") >= 1

        ranges = [(i * STRIDE, REGION) for i in range(SIZE // STRIDE)]
        data_bytes = sum(n for _, n in ranges)
        assert data_bytes == 16 * GiB
        dest = fifty_gib_free / "big.img"
        with _control(receiver) as control:
            wire.send_message(control, wire.Start("m-sparse", "vm-big", str(dest), SIZE, 4 * MiB, 4, "v3",
                                                  data_bytes, ranges))
            ready = wire.recv_message(control, wire.Ready)
            assert ready.session
            partial = fifty_gib_free / "big.img.dwcp-part"
            reserve = fifty_gib_free / "big.img.dwcp-reserve"
            assert partial.stat().st_size == SIZE
            assert partial.stat().st_blocks * 512 < MiB, "the partial keeps the holes"
            reserved = reserve.stat().st_blocks * 512
            assert data_bytes <= reserved < data_bytes + 64 * MiB, f"{reserved} bytes reserved"
            taken = free_before - _free(fifty_gib_free)
            assert data_bytes <= taken < data_bytes + 256 * MiB, f"the filesystem lost {taken} bytes"
            print(f"free {free_before / GiB:.2f} GiB; reserved {reserved / GiB:.2f} GiB for a "
                  f"{SIZE // GiB} GiB image with {data_bytes // GiB} GiB of data")
            wire.send_message(control, wire.Abort("cancelled by the test"))
            deadline = time.monotonic() + 20
            while list(fifty_gib_free.glob("big.img*")) and time.monotonic() < deadline:
                time.sleep(0.02)
        assert not list(fifty_gib_free.glob("big.img*")), "a cancelled migration leaves nothing behind"
        assert not list(fifty_gib_free.glob("logical.img*"))
        assert free_before - _free(fifty_gib_free) < 16 * MiB, "the reservation is given back"
    finally:
        receiver.stop()


def test_a_resumed_partial_reserves_only_what_it_lacks(receiver: Receiver) -> None:
    """An interrupted migration left chunks 0-7 verified in the partial (their zero pages are
    holes there, never written) and nothing of chunks 8-15: the next Start reserves 8 chunks,
    not the holes of the chunks the journal already holds."""
    size, chunk = 16 * MiB, MiB
    dest = receiver.dir / "vm.img"
    partial = dest.with_name(dest.name + ".dwcp-part")
    with open(partial, "wb") as f:
        f.truncate(size)
        for i in range(8):  # half of each held chunk is data, half a zero page run left as a hole
            f.seek(i * chunk)
            f.write(os.urandom(chunk // 2))
    journal = Journal(dest.with_name(dest.name + ".dwcp-journal"), Identity(size, chunk, "vm"))
    fd = os.open(partial, os.O_RDONLY)
    for i in range(8):
        journal.add(i, checksum(os.pread(fd, chunk, i * chunk)))
    journal.flush(fd)
    os.close(fd)
    journal.close()
    start = wire.Start("m-resume", "vm", str(dest), size, chunk, 1, "v3", size, [(0, size)])
    session = open_session(start, receiver.config.allowed_dest_dirs, Metrics())
    try:
        assert not session.fresh, "the partial was resumed"
        reserved = (receiver.dir / "vm.img.dwcp-reserve").stat().st_blocks * 512
        assert 8 * chunk <= reserved < 8 * chunk + MiB, f"{reserved} bytes reserved for 8 missing chunks"
    finally:
        session.close()
