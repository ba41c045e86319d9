"""Images of every awkward size, both data kinds, 1/4/16 streams and every codec cross real
loopback sockets and arrive byte-identical, with the destination's digest matching the source's."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from datapath_support import Migrate, Receiver

from dwcp_agent.migration.digest import file_digest
from dwcp_agent.migration.images import generate
from dwcp_agent.migration.model import MigrationError

MiB = 1 << 20
CODECS = ("none", "lz4", "zstd", "snappy")


def _image(src_dir: Path, size: int, kind: str) -> Path:
    path = src_dir / f"{kind}-{size}.img"
    if kind == "random":
        path.write_bytes(os.urandom(size))
    else:
        generate(path, size, "vm-mix", seed=size)
    return path


def _assert_identical(source: Path, dest: Path, digest: bytes, chunk_size: int = MiB) -> None:
    assert dest.read_bytes() == source.read_bytes()
    fd = os.open(dest, os.O_RDONLY)
    try:
        assert file_digest(fd, dest.stat().st_size, chunk_size) == digest
    finally:
        os.close(fd)
    assert not dest.with_name(dest.name + ".dwcp-part").exists()
    assert not dest.with_name(dest.name + ".dwcp-journal").exists()


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, MiB + 1])
@pytest.mark.parametrize("kind", ["random", "vm-mix"])
def test_small_and_unaligned_images_arrive_identical(receiver: Receiver, migrate: Migrate, src_dir: Path,
                                                     size: int, kind: str, codec: str) -> None:
    source = _image(src_dir, size, kind)
    before = source.read_bytes()
    result = migrate(receiver, source, compression_algo=codec, stream_count=4)
    _assert_identical(source, receiver.dir / "out.img", result.digest)
    assert source.read_bytes() == before


@pytest.mark.parametrize(("streams", "codec", "kind"), [
    (1, "none", "random"), (4, "lz4", "vm-mix"), (16, "zstd", "vm-mix"), (16, "snappy", "random"),
    (4, "none", "vm-mix"), (1, "zstd", "random"),
])
def test_64_mib_image_over_n_streams(receiver: Receiver, migrate: Migrate, src_dir: Path, streams: int,
                                     codec: str, kind: str) -> None:
    source = _image(src_dir, 64 * MiB, kind)
    result = migrate(receiver, source, compression_algo=codec, stream_count=streams)
    _assert_identical(source, receiver.dir / "out.img", result.digest)
    assert result.logical_bytes == 64 * MiB
    if kind == "vm-mix" and codec != "none":
        assert result.wire_bytes < 0.7 * result.logical_bytes
    if kind == "vm-mix":  # zero pages never cross the wire, whatever the codec
        assert result.wire_bytes < 0.9 * result.logical_bytes


@pytest.mark.parametrize("protocol, codec", [("v3", "auto"), ("v1", "none")])  # v1 none: the direct path
def test_small_chunks_and_tight_inflight_bound_still_complete(receiver: Receiver, migrate: Migrate,
                                                              src_dir: Path, protocol: str, codec: str) -> None:
    source = _image(src_dir, 8 * MiB + 123, "vm-mix")
    result = migrate(receiver, source, protocol=protocol, compression_algo=codec, chunk_size="64KiB",
                     max_inflight_bytes="1MiB", stream_count=4)
    _assert_identical(source, receiver.dir / "out.img", result.digest, 64 * 1024)


def test_existing_destination_is_replaced_only_on_commit(receiver: Receiver, migrate: Migrate,
                                                         src_dir: Path) -> None:
    old = receiver.dir / "out.img"
    old.write_bytes(b"previous image")
    source = _image(src_dir, 3 * MiB, "random")
    result = migrate(receiver, source)
    _assert_identical(source, old, result.digest)


def test_destination_outside_allowed_dirs_is_refused(receiver: Receiver, migrate: Migrate, src_dir: Path,
                                                     tmp_path: Path) -> None:
    source = _image(src_dir, 4096, "random")
    with pytest.raises(MigrationError, match="outside the allowed directories") as err:
        migrate(receiver, source, dest_name="../escape.img")
    assert err.value.error_type == "forbidden"
    assert not (tmp_path / "escape.img").exists()
    assert receiver.errors("migration", "forbidden") == 1


def test_repeat_migration_sends_only_changed_pages_against_destination_baseline(
        receiver: Receiver, migrate: Migrate, src_dir: Path) -> None:
    source = _image(src_dir, 32 * MiB, "random")
    first = migrate(receiver, source, compression_algo="none")
    data = bytearray(source.read_bytes())
    pages = len(data) // 4096
    for page in range(0, pages, 20):  # 5% of pages change
        data[page * 4096 + 100: page * 4096 + 164] = os.urandom(64)
    source.write_bytes(data)
    second = migrate(receiver, source, compression_algo="none")
    _assert_identical(source, receiver.dir / "out.img", second.digest)
    assert second.wire_bytes < 0.12 * first.wire_bytes, (second.wire_bytes, first.wire_bytes)


def test_v1_profile_ignores_the_baseline_and_still_verifies(receiver: Receiver, src_dir: Path,
                                                           tmp_path: Path) -> None:
    from datapath_support import PSK, make_config

    from dwcp_agent.migration.model import MigrationRequest
    from dwcp_agent.migration.sender import SendSession
    from dwcp_agent.telemetry.metrics import Metrics

    source = _image(src_dir, 8 * MiB, "random")
    (receiver.dir / "out.img").write_bytes(source.read_bytes())
    request = MigrationRequest("m-v1", "vm", source, "127.0.0.1", receiver.port, str(receiver.dir / "out.img"),
                               protocol="v1")
    result = SendSession(make_config(tmp_path, compression_algo="none"), Metrics(), PSK, request).run()
    assert result.wire_bytes >= 8 * MiB  # v1: no have-list, every byte travels
    _assert_identical(source, receiver.dir / "out.img", result.digest)


def test_tuned_streams_start_from_an_active_probe(receiver: Receiver, src_dir: Path, tmp_path: Path) -> None:
    from datapath_support import PSK, make_config

    from dwcp_agent.migration.model import MigrationRequest
    from dwcp_agent.migration.sender import SendSession
    from dwcp_agent.telemetry.metrics import Metrics

    source = _image(src_dir, 24 * MiB, "random")
    request = MigrationRequest("m-tuned", "vm", source, "127.0.0.1", receiver.port, str(receiver.dir / "out.img"))
    session = SendSession(make_config(tmp_path, stream_count=0), Metrics(), PSK, request)
    result = session.run()
    _assert_identical(source, receiver.dir / "out.img", result.digest)
    assert session.probed and session.link is not None
    snapshot = session.link.snapshot()
    assert snapshot.plan.streams >= 1
    assert receiver.errors("pba", "probe") == 0


@pytest.mark.parametrize("protocol", ["v1", "v3"])
def test_zero_pages_stay_holes_in_the_destination(receiver: Receiver, migrate: Migrate, src_dir: Path,
                                                  protocol: str) -> None:
    """Every other page is zero, so every chunk mixes both: the zero pages are never written."""
    pages = np.zeros((4096, 4096), np.uint8)
    pages[::2] = np.random.default_rng(5).integers(1, 256, (2048, 4096), dtype=np.uint8)
    source = src_dir / "half-zero.img"
    source.write_bytes(pages.tobytes())
    result = migrate(receiver, source, compression_algo="none", stream_count=4, protocol=protocol)
    dest = receiver.dir / "out.img"
    _assert_identical(source, dest, result.digest)
    allocated = dest.stat().st_blocks * 512
    assert allocated <= 0.55 * len(pages.tobytes()), f"{allocated} bytes allocated for a half-zero image"


def test_pba_measures_the_path_also_with_a_fixed_stream_count(receiver: Receiver, src_dir: Path,
                                                               tmp_path: Path) -> None:
    """A fixed stream_count keeps its count and chunk size, but PBA still probes and names the mode."""
    from datapath_support import PSK, make_config

    from dwcp_agent.migration.model import MigrationRequest
    from dwcp_agent.migration.sender import SendSession
    from dwcp_agent.telemetry.metrics import Metrics

    source = _image(src_dir, 16 * MiB, "random")
    request = MigrationRequest("m-fixed", "vm", source, "127.0.0.1", receiver.port, str(receiver.dir / "out.img"))
    metrics = Metrics()
    session = SendSession(make_config(tmp_path, stream_count=3, chunk_size="512KiB"), metrics, PSK, request)
    result = session.run()
    _assert_identical(source, receiver.dir / "out.img", result.digest, 512 * 1024)
    assert session.probed and session.link is not None
    assert (session.streams, session.chunk_size) == (3, 512 * 1024)
    assert session.link.probe_rtt_s > 0 and session.link.probe_bandwidth_bps > 0
    # Loopback: sub-millisecond RTT names the datacenter mode from the probe on, measured.
    assert request.mode == "datacenter" and request.mode_measured
    assert metrics.current_mode.labels("datacenter")._value.get() == 1
    selector = session.encoder.selector
    # The selector plans for the path (LinkController.path_bandwidth: the larger of PBA's prediction
    # and the streams' summed delivery rate), not the prediction alone, which it exceeds whenever
    # the delivery rates do: comparing with bandwidth() failed on a busy host.
    assert selector is not None and selector.link_bytes_per_s() == session.link.path_bandwidth()
    # A stream counts once connected: on a fast host the 32 chunks can all be acknowledged before
    # the last stream's handshake ends, so the fixed count bounds what was used rather than equals it.
    stats = session.progress.stream_stats()
    assert 1 <= stats["peak"] <= 3 and stats["final"] <= 3 and 0 < stats["mean"] <= 3
