"""Finding 7 (issue 13): the destination is steered by planted symlinks and hard links, a
dest_path equal to an allowed directory writes beside it, refusals leave files behind, commit
errors close the connection. Each test here failed on commit 73d0f58."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dwcp_agent import wire
from dwcp_agent.migration.digest import object_digest
from dwcp_agent.migration.model import MigrationError
from dwcp_agent.migration.receiver import ReceiveError, open_session
from dwcp_agent.telemetry.metrics import Metrics

sys.path.insert(0, str(Path(__file__).parents[1] / "integration" / "datapath"))
from datapath_support import Receiver, run_migration

MiB = 1 << 20


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(tmp_path)
    yield r
    r.stop()


def _image(tmp_path: Path, size: int = 4 * MiB) -> Path:
    (tmp_path / "src").mkdir(exist_ok=True)
    path = tmp_path / "src" / "vm.img"
    path.write_bytes(os.urandom(size))
    return path


@pytest.mark.parametrize("suffix", [".dwcp-part", ".dwcp-journal"])
def test_a_planted_symlink_beside_the_destination_is_not_followed(tmp_path: Path, receiver: Receiver,
                                                                  suffix: str) -> None:
    victim = tmp_path / "victim.conf"
    victim.write_bytes(b"precious contents outside dest_dirs\n")
    os.symlink(victim, receiver.dir / ("out.img" + suffix))
    with pytest.raises(MigrationError) as refused:
        run_migration(tmp_path, receiver, _image(tmp_path))
    assert refused.value.error_type == "forbidden"
    assert victim.read_bytes() == b"precious contents outside dest_dirs\n"


def test_a_planted_hard_link_is_not_written_through(tmp_path: Path, receiver: Receiver) -> None:
    victim = receiver.dir / "other-vm.img"
    victim.write_bytes(b"another VM's disk")
    os.link(victim, receiver.dir / "out.img.dwcp-part")
    with pytest.raises(MigrationError):
        run_migration(tmp_path, receiver, _image(tmp_path))
    assert victim.read_bytes() == b"another VM's disk"


def test_a_destination_equal_to_an_allowed_directory_is_refused(tmp_path: Path, receiver: Receiver) -> None:
    start = wire.Start("m-dir", "vm", str(receiver.dir), MiB, MiB, 1)
    with pytest.raises(ReceiveError) as refused:
        open_session(start, receiver.config.allowed_dest_dirs, Metrics())
    assert refused.value.error_type == "forbidden"
    assert not list(tmp_path.glob("*.dwcp-*")), "nothing may be written in the parent"


def test_a_refused_start_leaves_nothing_behind(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        start = wire.Start("m-full", "vm", str(mnt / "big.img"), 64 * MiB, MiB, 1)
        with pytest.raises(ReceiveError) as refused:
            open_session(start, [mnt], Metrics())
        assert refused.value.error_type == "no_space"
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_abandoned_partials_and_journals_expire(tmp_path: Path, receiver: Receiver) -> None:
    from dwcp_agent.migration.safe_files import sweep_abandoned

    for name in ("old.img.dwcp-part", "old.img.dwcp-journal", "new.img.dwcp-part"):
        (receiver.dir / name).write_bytes(b"x")
    week_ago = time.time() - 7 * 86400
    for name in ("old.img.dwcp-part", "old.img.dwcp-journal"):
        os.utime(receiver.dir / name, (week_ago, week_ago))
    removed = sweep_abandoned(receiver.config.allowed_dest_dirs, ttl_s=86400)
    assert sorted(Path(p).name for p in removed) == ["old.img.dwcp-journal", "old.img.dwcp-part"]
    assert sorted(p.name for p in receiver.dir.iterdir()) == ["new.img.dwcp-part"]
    # The data server sweeps on start with its configured TTL.
    os.utime(receiver.dir / "new.img.dwcp-part", (week_ago, week_ago))
    Receiver(tmp_path, partial_ttl_s=60).stop()
    assert list(receiver.dir.iterdir()) == []


def test_a_commit_error_is_reported_as_failed(tmp_path: Path, receiver: Receiver) -> None:
    start = wire.Start("m-commit", "vm", str(receiver.dir / "empty.img"), 0, MiB, 1)
    session = open_session(start, receiver.config.allowed_dest_dirs, Metrics())
    (receiver.dir / "empty.img").mkdir()  # the rename at commit cannot replace a directory...
    (receiver.dir / "empty.img" / "keep").write_bytes(b"")  # ...that is not empty
    ours, theirs = socket.socketpair()
    runner = threading.Thread(target=session.run_control, args=(theirs,), daemon=True)
    runner.start()
    try:
        ours.settimeout(10)
        wire.send_message(ours, wire.Commit(object_digest(np.zeros(0, dtype=np.uint64))))
        with pytest.raises(wire.WireError) as failed:
            wire.recv_message(ours, wire.Committed)
        assert failed.value.error_type == "io"
        assert "commit" in str(failed.value)
    finally:
        ours.close()
        runner.join(10)
        theirs.close()


def test_the_source_is_opened_once_without_following_a_symlink(tmp_path: Path) -> None:
    from dwcp_agent.config import load_config
    from dwcp_agent.migration.manager import MigrationManager, RequestError

    (tmp_path / "src").mkdir()
    outside = tmp_path / "secret.img"
    outside.write_bytes(b"s" * 4096)
    os.symlink(outside, tmp_path / "src" / "link.img")
    config = load_config(environ={}, overrides={"psk": "k" * 32, "state_dir": str(tmp_path / "state"),
                                                 "source_dirs": [str(tmp_path / "src")]})
    manager = MigrationManager(config, Metrics(), b"k" * 32)
    with pytest.raises(RequestError, match="symbolic link"):
        manager.parse_request({"source": str(tmp_path / "src" / "link.img"), "to": "127.0.0.1:9",
                               "dest_path": "/x/y.img"})
    real = tmp_path / "src" / "real.img"
    real.write_bytes(b"r" * 8192)
    request = manager.parse_request({"source": str(real), "to": "127.0.0.1:9", "dest_path": "/x/y.img"})
    assert request.image is not None
    real.unlink()  # swapping the path after validation changes nothing: the descriptor is kept
    real.symlink_to(outside)
    assert os.pread(request.image.fd, 8, 0) == b"r" * 8
    request.image.close()


def test_only_a_regular_file_serves_as_a_baseline(tmp_path: Path, receiver: Receiver) -> None:
    """A symlink at the destination (to a file outside dest_dirs) or a FIFO is never read as a
    baseline: before, the symlink's target was hashed and offered, and a FIFO blocked the Start."""
    outside = tmp_path / "outside.img"
    outside.write_bytes(os.urandom(64 * 4096))
    os.symlink(outside, receiver.dir / "linked.img")
    os.mkfifo(receiver.dir / "fifo.img")
    for name in ("linked.img", "fifo.img"):
        start = wire.Start(f"m-{name}", "vm", str(receiver.dir / name), 64 * 4096, MiB, 1, "v3")
        session = open_session(start, receiver.config.allowed_dest_dirs, Metrics())
        try:
            assert session.ready().baseline_have == b""
        finally:
            session.close()
