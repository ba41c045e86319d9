"""Raw chunks (v1, codec none) take the direct path: each stream thread reads, hashes, seals and
sends its own chunks, with no encoder thread. A chunk lost with its stream is read again from
the source, a frame altered on the wire is still refused, and the image arrives verified."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from datapath_support import CuttingProxy, Migrate, Receiver

from dwcp_agent.migration.model import SendResult

MiB = 1 << 20


def _random_image(src_dir: Path, size: int) -> Path:
    path = src_dir / "random.img"
    path.write_bytes(os.urandom(size))
    return path


def _threads_seen(run: Callable[[], SendResult]) -> tuple[SendResult, set[str]]:
    """Run a migration in a thread and collect the names of every thread alive meanwhile."""
    outcome: list[SendResult | BaseException] = []

    def target() -> None:
        try:
            outcome.append(run())
        except BaseException as exc:  # re-raised below, in the test's thread
            outcome.append(exc)

    names: set[str] = set()
    runner = threading.Thread(target=target, name="test-migration")
    runner.start()
    while runner.is_alive():
        names.update(t.name for t in threading.enumerate())
        runner.join(0.002)
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0], names


def _raw_through_proxy(receiver: Receiver, migrate: Migrate, source: Path, cut_connection: int, cut_after: int,
                       flip: bool = False) -> SendResult:
    """A raw v1 migration over 4 streams through a proxy that cuts (or, with `flip`, alters one
    byte of) data connection `cut_connection` after `cut_after` bytes; it must have acted."""
    proxy = CuttingProxy(receiver.port, cut_connection=cut_connection, cut_after=cut_after, flip=flip)
    try:
        result = migrate(receiver, source, port=proxy.port, protocol="v1", compression_algo="none",
                         stream_count=4, pacing_rate_bytes="8MiB")
    finally:
        proxy.stop()
    assert proxy.cut_done.is_set()
    return result


def test_raw_chunks_are_sent_by_stream_threads_without_encoder_threads(receiver: Receiver, migrate: Migrate,
                                                                       src_dir: Path) -> None:
    source = _random_image(src_dir, 16 * MiB)
    raw, raw_threads = _threads_seen(lambda: migrate(receiver, source, protocol="v1", compression_algo="none",
                                                     stream_count=2, pacing_rate_bytes="8MiB"))
    assert (receiver.dir / "out.img").read_bytes() == source.read_bytes()
    assert {"stream-0", "stream-1"} <= raw_threads
    assert not any(name.startswith("encode-") for name in raw_threads)
    assert raw.wire_bytes >= 16 * MiB
    # A codec keeps its encoder threads: the check above can tell the two paths apart.
    _, lz4_threads = _threads_seen(lambda: migrate(receiver, source, dest_name="lz4.img", protocol="v1",
                                                   compression_algo="lz4", stream_count=2,
                                                   pacing_rate_bytes="8MiB"))
    assert any(name.startswith("encode-") for name in lz4_threads)
    assert (receiver.dir / "lz4.img").read_bytes() == source.read_bytes()


def test_raw_stream_cut_mid_transfer_reads_its_chunks_again(receiver: Receiver, migrate: Migrate,
                                                            src_dir: Path) -> None:
    source = _random_image(src_dir, 24 * MiB)
    result = _raw_through_proxy(receiver, migrate, source, cut_connection=2, cut_after=2 * MiB)
    assert (receiver.dir / "out.img").read_bytes() == source.read_bytes()
    assert result.attempts == 1  # the chunks in flight on the cut stream were read again and resent


def test_raw_frame_altered_on_the_wire_is_refused_and_its_chunk_resent(receiver: Receiver, migrate: Migrate,
                                                                       src_dir: Path) -> None:
    source = _random_image(src_dir, 24 * MiB)
    result = _raw_through_proxy(receiver, migrate, source, cut_connection=1, cut_after=MiB + 12345, flip=True)
    assert receiver.wait_errors("amst", "tag") == 1  # sealed frame: its tag check refused it
    assert (receiver.dir / "out.img").read_bytes() == source.read_bytes()
    assert result.attempts == 1
