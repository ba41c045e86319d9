"""Images of every awkward size, both data kinds, 1/4/16 streams and every codec cross real
loopback sockets and arrive byte-identical, with the destination's digest matching the source's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from datapath_support import Migrate, Receiver

from dwcp_agent.migration.digest import file_digest
from dwcp_agent.migration.images import generate
from dwcp_agent.migration.sender import MigrationError

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


def test_small_chunks_and_tight_inflight_bound_still_complete(receiver: Receiver, migrate: Migrate,
                                                              src_dir: Path) -> None:
    source = _image(src_dir, 8 * MiB + 123, "vm-mix")
    result = migrate(receiver, source, chunk_size="64KiB", max_inflight_bytes="1MiB", stream_count=4)
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
