"""The receiver's page-map writer (hde/page_map_writer.py, native/pagemap.pyx) against the decoder.

For page maps of every page kind, the writer must leave in the file exactly the bytes
ChunkDecoder.decode builds, accept exactly the chunks the decoder accepts (the checksum
included), and refuse the rest with CodecError, or hand DELTA chunks back, without writing a
byte. Mutated payloads (the hde fuzz mutations) check the refusals; a failure prints the seed.
"""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import numpy as np
import pytest
from test_hde_fuzz import _mutate

from dwcp_agent.hde.baseline import FilePages
from dwcp_agent.hde.chunk import ChunkDecoder, checksum
from dwcp_agent.hde.codecs import CodecError, codec_by_name
from dwcp_agent.hde.layout import PAGE_MAP_HEADER, PageKind
from dwcp_agent.hde.page_map_writer import PageMapWriter

PAGE = 4096
FILE_PAGES = 64  # pages of the partial and baseline files references point into
ITERATIONS = int(os.environ.get("DWCP_FUZZ_ITERATIONS", "100000")) // 50 or 1
SEED = int(os.environ.get("DWCP_FUZZ_SEED", "20260101"))


def write_page_map_chunk(fd: int, codec_id: int, payload: memoryview, raw_len: int, offset: int, digest: int,
                         scratch: memoryview, partial: FilePages | None, baseline: FilePages | None, holes: bool,
                         punch: bool, writer: PageMapWriter | None = None) -> bool | None:
    """The receiver's three steps: True when written, False on a checksum mismatch, None for DELTA."""
    writer = writer or PageMapWriter(raw_len, partial, baseline)
    if not writer.decode(codec_id, payload, raw_len, scratch):
        return None
    if not writer.matches(digest):
        return False
    writer.write(fd, offset, holes, punch)
    return True


def _page_map(rnd: random.Random, raw_len: int, codec: str, kinds_allowed: tuple[PageKind, ...],
              partial: bytes, baseline: bytes) -> tuple[bytes, int]:
    """A page-map payload (header + codec(body)) of a chunk of `raw_len` bytes, and the xxh3-64
    of the chunk it describes."""
    n = (raw_len + PAGE - 1) // PAGE
    page0 = rnd.randrange(0, FILE_PAGES - n + 1)
    kinds, refs, literals, delta_lens, deltas = [], [], [], [], []
    chunk = bytearray(raw_len)
    for p in range(n):
        length = min(PAGE, raw_len - p * PAGE)
        kind = rnd.choice(kinds_allowed if length == PAGE else (PageKind.LITERAL, PageKind.ZERO))
        if kind == PageKind.DUP_IN and p == 0:
            kind = PageKind.LITERAL
        page = bytes(length)
        if kind == PageKind.LITERAL:
            page = rnd.choice([rnd.randbytes(length), bytes([rnd.randrange(4)]) * length])
            literals.append(page)
        elif kind == PageKind.DUP_IN:
            ref = rnd.randrange(p)
            refs.append(ref)
            page = bytes(chunk[ref * PAGE:(ref + 1) * PAGE])
        elif kind in (PageKind.DUP_X, PageKind.BASELINE):
            ref = rnd.randrange(FILE_PAGES)
            refs.append(ref)
            source = partial if kind == PageKind.DUP_X else baseline
            page = source[ref * PAGE:(ref + 1) * PAGE]
        elif kind == PageKind.SAME:
            page = baseline[(page0 + p) * PAGE:(page0 + p + 1) * PAGE]
        elif kind == PageKind.DELTA:  # an empty delta: the acknowledged page unchanged
            delta_lens.append(0)
            page = partial[(page0 + p) * PAGE:(page0 + p + 1) * PAGE]
        kinds.append(int(kind))
        chunk[p * PAGE:p * PAGE + length] = page
    body = (bytes(kinds) + b"".join(struct.pack("<Q", r) for r in refs)
            + b"".join(struct.pack("<H", d) for d in delta_lens) + b"".join(literals) + b"".join(deltas))
    payload = PAGE_MAP_HEADER.pack(len(body), page0) + codec_by_name(codec).compress(body)
    return payload, checksum(bytes(chunk))


def _files(tmp_path: Path, rnd: random.Random) -> tuple[bytes, bytes, FilePages, FilePages]:
    partial = rnd.randbytes(FILE_PAGES * PAGE)
    baseline = rnd.randbytes(FILE_PAGES * PAGE)
    (tmp_path / "partial").write_bytes(partial)
    (tmp_path / "baseline").write_bytes(baseline)
    return partial, baseline, FilePages(str(tmp_path / "partial")), FilePages(str(tmp_path / "baseline"))


def _target(tmp_path: Path, size: int, old: bytes | None) -> int:
    fd = os.open(tmp_path / "target", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    if old is not None:
        os.write(fd, old)
    os.ftruncate(fd, size)
    return fd


@pytest.mark.parametrize("codec", ["none", "lz4", "zstd"])
@pytest.mark.parametrize("raw_len", [PAGE, 5 * PAGE + 100, 16 * PAGE])
@pytest.mark.parametrize("holes", [True, False])
def test_writes_exactly_what_the_decoder_builds(tmp_path: Path, codec: str, raw_len: int, holes: bool) -> None:
    rnd = random.Random(raw_len * 7 + len(codec))
    partial, baseline, partial_pages, baseline_pages = _files(tmp_path, rnd)
    kinds = (PageKind.LITERAL, PageKind.ZERO, PageKind.DUP_IN, PageKind.DUP_X, PageKind.BASELINE, PageKind.SAME)
    offset = 3 * raw_len
    for _ in range(20):
        payload, digest = _page_map(rnd, raw_len, codec, kinds, partial, baseline)
        old = None if holes else b"\xa5" * (offset + raw_len)
        fd = _target(tmp_path, offset + raw_len, old)
        try:
            scratch = memoryview(bytearray(raw_len))
            assert write_page_map_chunk(fd, codec_by_name(codec).id, memoryview(payload), raw_len, offset, digest,
                                        scratch, partial_pages, baseline_pages, holes, False) is True
            built = bytearray(raw_len)
            ChunkDecoder(read_page=partial_pages, read_baseline=baseline_pages).decode(
                codec_by_name(codec).id, 4, payload, raw_len, memoryview(built))
            assert os.pread(fd, raw_len, offset) == bytes(built)
            assert checksum(bytes(built)) == digest
            if holes:  # zero pages were not written: they are still holes
                zero_pages = [p for p in range(len(built) // PAGE) if not any(built[p * PAGE:(p + 1) * PAGE])]
                assert os.fstat(fd).st_blocks * 512 <= raw_len - len(zero_pages) * PAGE + 8 * PAGE
        finally:
            os.close(fd)


def _into_filled_file(tmp_path: Path, seed: int, n_pages: int, kinds: tuple[PageKind, ...], fill: bytes,
                      checksum_flip: int = 0) -> tuple[bool | None, bytes]:
    """Write a page-map chunk of `kinds` over a file full of `fill`: the outcome, and the file after."""
    rnd = random.Random(seed)
    partial, baseline, partial_pages, baseline_pages = _files(tmp_path, rnd)
    payload, digest = _page_map(rnd, n_pages * PAGE, "none", kinds, partial, baseline)
    fd = _target(tmp_path, n_pages * PAGE, fill * n_pages * PAGE)
    try:
        outcome = write_page_map_chunk(fd, 0, memoryview(payload), n_pages * PAGE, 0, digest ^ checksum_flip,
                                       memoryview(bytearray(n_pages * PAGE)), partial_pages, baseline_pages, False,
                                       False)
        return outcome, os.pread(fd, n_pages * PAGE, 0)
    finally:
        os.close(fd)


def test_a_wrong_checksum_writes_nothing(tmp_path: Path) -> None:
    outcome, after = _into_filled_file(tmp_path, 3, 8, (PageKind.LITERAL, PageKind.DUP_IN), b"\x11", checksum_flip=1)
    assert outcome is False
    assert after == b"\x11" * 8 * PAGE


def test_delta_chunks_are_handed_back_untouched(tmp_path: Path) -> None:
    outcome, after = _into_filled_file(tmp_path, 4, 4, (PageKind.DELTA,), b"\x22")
    assert outcome is None
    assert after == b"\x22" * 4 * PAGE


def test_a_reference_to_a_missing_file_is_a_codec_error(tmp_path: Path) -> None:
    rnd = random.Random(5)
    partial, baseline, partial_pages, _ = _files(tmp_path, rnd)
    payload, digest = _page_map(rnd, 4 * PAGE, "none", (PageKind.BASELINE,), partial, baseline)
    fd = _target(tmp_path, 4 * PAGE, None)
    try:
        with pytest.raises(CodecError, match="file this receiver does not have"):
            write_page_map_chunk(fd, 0, memoryview(payload), 4 * PAGE, 0, digest, memoryview(bytearray(4 * PAGE)),
                                 partial_pages, None, True, False)
        assert os.fstat(fd).st_blocks == 0
    finally:
        os.close(fd)


def test_mutated_payloads_are_refused_or_verified_like_the_decoder(tmp_path: Path) -> None:
    """Whatever the payload, the writer and the decoder agree: both refuse it (CodecError), or
    the writer writes exactly the decoded chunk when its checksum matches and nothing otherwise."""
    rnd = random.Random(SEED)
    partial, baseline, partial_pages, baseline_pages = _files(tmp_path, rnd)
    kinds = tuple(PageKind)
    raw_len = 6 * PAGE
    writer = PageMapWriter(raw_len, partial_pages, baseline_pages)  # one stream's, reused after refusals
    for i in range(ITERATIONS):
        codec = rnd.choice(["none", "lz4", "zstd"])
        payload, digest = _page_map(rnd, raw_len, codec, kinds, partial, baseline)
        mutated = _mutate(rnd, payload) if rnd.random() < 0.9 else payload
        codec_id = codec_by_name(codec).id
        built = bytearray(raw_len)
        try:
            ChunkDecoder(read_page=partial_pages, read_baseline=baseline_pages).decode(
                codec_id, 4, mutated, raw_len, memoryview(built))
            expected: bytes | None = bytes(built)
        except CodecError:
            expected = None
        fd = _target(tmp_path, raw_len, b"\x33" * raw_len)
        try:
            try:
                written = write_page_map_chunk(fd, codec_id, memoryview(mutated), raw_len, 0, digest,
                                               memoryview(bytearray(raw_len)), partial_pages, baseline_pages,
                                               False, False, writer)
            except CodecError:
                written = "refused"
            on_disk = os.pread(fd, raw_len, 0)
        finally:
            os.close(fd)
        where = f"seed {SEED}, iteration {i}"
        if written is None:  # DELTA pages: the decoder's call
            assert on_disk == b"\x33" * raw_len, where
        elif expected is None:
            assert written == "refused", where
            assert on_disk == b"\x33" * raw_len, where
        else:
            assert written == (checksum(expected) == digest), where
            assert on_disk == (expected if written else b"\x33" * raw_len), where


def test_short_last_page_and_a_chunk_of_one_page_at_a_large_offset(tmp_path: Path) -> None:
    rnd = random.Random(6)
    partial, baseline, _, _ = _files(tmp_path, rnd)
    raw_len = PAGE + 17
    payload, digest = _page_map(rnd, raw_len, "none", (PageKind.LITERAL,), partial, baseline)
    offset = 1 << 32
    fd = _target(tmp_path, offset + raw_len, None)
    try:
        assert write_page_map_chunk(fd, 0, memoryview(payload), raw_len, offset, digest,
                                    memoryview(bytearray(raw_len)), None, None, True, False) is True
        built = bytearray(raw_len)
        ChunkDecoder().decode(0, 4, payload, raw_len, memoryview(built))
        assert os.pread(fd, raw_len, offset) == bytes(built)
        assert np.frombuffer(built, np.uint8).any()
    finally:
        os.close(fd)


def test_nothing_is_written_unless_the_checksum_matched(tmp_path: Path) -> None:
    """write refuses a chunk that was not verified, or whose checksum did not match, and a chunk
    written once cannot be written again without a new decode and verify."""
    rnd = random.Random(7)
    partial, baseline, partial_pages, baseline_pages = _files(tmp_path, rnd)
    payload, digest = _page_map(rnd, 4 * PAGE, "none", (PageKind.LITERAL, PageKind.DUP_X), partial, baseline)
    writer = PageMapWriter(4 * PAGE, partial_pages, baseline_pages)
    fd = _target(tmp_path, 4 * PAGE, b"\x44" * 4 * PAGE)
    try:
        scratch = memoryview(bytearray(4 * PAGE))
        assert writer.decode(0, memoryview(payload), 4 * PAGE, scratch)
        with pytest.raises(ValueError, match="only after its checksum matched"):
            writer.write(fd, 0, False, False)
        assert writer.decode(0, memoryview(payload), 4 * PAGE, scratch)
        assert not writer.matches(digest ^ 1)
        with pytest.raises(ValueError, match="only after its checksum matched"):
            writer.write(fd, 0, False, False)
        assert os.pread(fd, 4 * PAGE, 0) == b"\x44" * 4 * PAGE
        assert writer.decode(0, memoryview(payload), 4 * PAGE, scratch)
        assert writer.matches(digest)
        writer.write(fd, 0, False, False)
        assert checksum(os.pread(fd, 4 * PAGE, 0)) == digest
        with pytest.raises(ValueError, match="only after its checksum matched"):
            writer.write(fd, 0, False, False)
    finally:
        os.close(fd)


def test_a_chunk_longer_than_the_writer_was_made_for_is_refused(tmp_path: Path) -> None:
    rnd = random.Random(8)
    partial, baseline, _, _ = _files(tmp_path, rnd)
    payload, _ = _page_map(rnd, 8 * PAGE, "none", (PageKind.LITERAL,), partial, baseline)
    with pytest.raises(CodecError, match="does not match the chunk length"):
        PageMapWriter(4 * PAGE, None, None).decode(0, memoryview(payload), 8 * PAGE,
                                                   memoryview(bytearray(8 * PAGE)))


def test_an_unknown_codec_id_is_a_codec_error_and_the_writer_goes_on(tmp_path: Path) -> None:
    rnd = random.Random(9)
    partial, baseline, _, _ = _files(tmp_path, rnd)
    writer = PageMapWriter(4 * PAGE, None, None)
    for codec in ("lz4", "zstd", "lz4"):  # each codec id twice over the writer's life
        payload, digest = _page_map(rnd, 4 * PAGE, codec, (PageKind.LITERAL, PageKind.ZERO), partial, baseline)
        with pytest.raises(CodecError, match="unknown codec id 200"):
            writer.decode(200, memoryview(payload), 4 * PAGE, memoryview(bytearray(4 * PAGE)))
        assert writer.decode(codec_by_name(codec).id, memoryview(payload), 4 * PAGE, memoryview(bytearray(4 * PAGE)))
        assert writer.matches(digest)
