"""Chunk encoder/decoder: every codec and page kind round-trips; references obey the ack rule."""

from __future__ import annotations

import numpy as np
import pytest
from hde_support import PAGE, MemoryPages, page_mix
from hypothesis import given, settings
from hypothesis import strategies as st

from dwcp_agent._native import pages
from dwcp_agent.config import Config
from dwcp_agent.hde.baseline import FilePages, HaveList, have_list
from dwcp_agent.hde.chunk import (
    FLAG_ALL_ZERO,
    FLAG_PAGE_MAP,
    INCOMPRESSIBLE_SAMPLES,
    ChunkDecoder,
    ChunkEncoder,
    EncodedChunk,
    _literal_runs,
    checksum,
    make_encoder,
)
from dwcp_agent.hde.codecs import NAMES, Codec, CodecError, codec_by_name
from dwcp_agent.hde.selector import spread_pages
from dwcp_agent.telemetry.metrics import Metrics

CODECS = list(NAMES)


def _decode(enc: EncodedChunk, read_page: MemoryPages | None = None,
            read_baseline: MemoryPages | FilePages | None = None) -> bytes:
    out = bytearray(enc.raw_len)
    ChunkDecoder(read_page=read_page, read_baseline=read_baseline).decode(
        enc.codec, enc.flags, enc.payload, enc.raw_len, memoryview(out))
    assert checksum(out) == enc.checksum
    return bytes(out)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, (1 << 20) + 1])
def test_page_mix_roundtrips_for_every_codec_and_size(codec: str, size: int) -> None:
    data = page_mix(size // PAGE + 1, seed=size)[:size]
    enc = ChunkEncoder(codec_by_name(codec)).encode(memoryview(data))
    assert _decode(enc) == data.tobytes()


def _edge_page(kind: int, rng_seed: int) -> np.ndarray:
    page = np.zeros(PAGE, np.uint8)
    if kind == 1:
        page[:] = 0xFF
    elif kind == 2:
        page[0] = 1
    elif kind == 3:
        page[-1] = 1
    elif kind == 4:
        page[:] = np.tile(np.repeat(np.array([0, 0x33], np.uint8), 32), PAGE // 64)
    elif kind == 5:
        page[:] = np.random.default_rng(rng_seed).integers(0, 256, PAGE, dtype=np.uint8)
    return page


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3)), min_size=1, max_size=12),
       st.integers(0, PAGE - 1), st.sampled_from([*CODECS, "auto"]))
def test_any_mix_of_edge_pages_roundtrips(spec: list[tuple[int, int]], tail: int, codec: str) -> None:
    data = np.concatenate([_edge_page(k, s) for k, s in spec] + [_edge_page(5, 99)[:tail]])
    encoder = ChunkEncoder(None if codec == "auto" else codec_by_name(codec))
    assert _decode(encoder.encode(memoryview(data), 0)) == data.tobytes()


def test_all_zero_chunk_has_no_payload() -> None:
    enc = ChunkEncoder(codec_by_name("lz4")).encode(memoryview(bytes(3 * PAGE)))
    assert enc.flags == FLAG_ALL_ZERO and enc.payload == b""
    assert _decode(enc) == bytes(3 * PAGE)


def test_incompressible_chunk_never_grows() -> None:
    data = np.random.default_rng(5).integers(0, 256, 64 * PAGE, dtype=np.uint8)
    for codec in CODECS:
        enc = ChunkEncoder(codec_by_name(codec)).encode(memoryview(data))
        assert enc.flags == 0 and len(enc.payload) == len(data)


class Link:
    """Sender and receiver of one migration, with acks applied only when the test says so."""

    def __init__(self, size: int, cache: int = 1 << 20, codec: str = "lz4") -> None:
        self.encoder = ChunkEncoder(codec_by_name(codec), delta_cache_bytes=cache)
        self.dest = MemoryPages(bytes(size))
        self.baseline: MemoryPages | None = None

    def send(self, data: np.ndarray, offset: int, ack: bool = True) -> EncodedChunk:
        enc = self.encoder.encode(memoryview(data), offset)
        out = _decode(enc, self.dest, self.baseline)
        assert out == data.tobytes()
        self.dest.write(offset, out)
        if ack:
            self.encoder.acked(offset, len(data), enc.checksum)
        return enc


def _kinds(enc: EncodedChunk) -> list[int]:
    n = (enc.raw_len + PAGE - 1) // PAGE
    assert enc.flags == FLAG_PAGE_MAP
    return list(enc.payload[12: 12 + n]) if enc.codec == 0 else []


def test_duplicate_of_an_acknowledged_chunk_goes_as_a_reference() -> None:
    rng = np.random.default_rng(6)
    a = rng.integers(0, 256, 4 * PAGE, dtype=np.uint8)
    link = Link(16 * PAGE, codec="none")
    link.send(a, 0)
    enc = link.send(a.copy(), 8 * PAGE)
    assert _kinds(enc) == [3, 3, 3, 3]
    assert len(enc.payload) < 100


def test_no_reference_to_a_chunk_the_receiver_has_not_acknowledged() -> None:
    """Out-of-order streams: the first copy may still be in flight when the second is encoded."""
    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, 4 * PAGE, dtype=np.uint8)
    link = Link(16 * PAGE, codec="none")
    first = link.encoder.encode(memoryview(a), 0)
    second = link.encoder.encode(memoryview(a.copy()), 8 * PAGE)
    assert second.flags == 0 and len(second.payload) == len(a)
    # The receiver gets them in the opposite order, and both decode without the other.
    for enc in (second, first):
        assert _decode(enc, link.dest) == a.tobytes()


def test_pages_resent_after_ack_go_as_xor_deltas() -> None:
    rng = np.random.default_rng(8)
    v1 = rng.integers(0, 256, 8 * PAGE, dtype=np.uint8)
    link = Link(8 * PAGE, codec="none")
    link.send(v1, 0)
    link.send(v1, 0)   # the cache keeps pages from their second send on (as xbzrle)
    v2 = v1.copy()
    v2[[5, PAGE + 100, 3 * PAGE - 1, 7 * PAGE]] ^= 0x55
    enc = link.send(v2, 0)
    # Changed pages are deltas; unchanged ones reference the acknowledged page itself.
    assert _kinds(enc) == [6, 6, 6, 3, 3, 3, 3, 6]
    assert len(enc.payload) < 200
    assert bytes(link.dest.data) == v2.tobytes()


def test_resend_before_ack_is_literal_and_a_stale_ack_is_ignored() -> None:
    rng = np.random.default_rng(9)
    v1 = rng.integers(0, 256, 2 * PAGE, dtype=np.uint8)
    v2 = v1.copy()
    v2[10] ^= 1
    link = Link(2 * PAGE, codec="none")
    link.send(v1, 0)
    e1 = link.send(v1, 0, ack=False)
    e2 = link.send(v2, 0, ack=False)
    assert e2.flags == 0                       # v1 not acknowledged: no delta
    link.encoder.acked(0, 2 * PAGE, e1.checksum)   # ack of v1 arrives after v2 was sent
    v3 = v2.copy()
    v3[20] ^= 1
    assert link.send(v3, 0).flags == 0         # still literal: the receiver may hold v1 or v2
    v4 = v3.copy()
    v4[30] ^= 1
    assert _kinds(link.send(v4, 0))[0] == 6       # v3 was acked: delta


def test_forget_peer_acks_stops_references_until_reacked() -> None:
    a = np.random.default_rng(10).integers(0, 256, 2 * PAGE, dtype=np.uint8)
    link = Link(8 * PAGE, codec="none")
    e = link.send(a, 0)
    link.encoder.forget_peer_acks()
    assert link.send(a.copy(), 4 * PAGE).flags == 0
    link.encoder.acked(0, 2 * PAGE, e.checksum)
    assert _kinds(link.send(a.copy(), 6 * PAGE)) == [3, 3]


def test_reference_without_a_reader_is_a_codec_error() -> None:
    a = np.random.default_rng(11).integers(0, 256, PAGE, dtype=np.uint8)
    link = Link(4 * PAGE)
    link.send(a, 0)
    enc = link.encoder.encode(memoryview(a.copy()), 2 * PAGE)
    out = bytearray(PAGE)
    with pytest.raises(CodecError):
        ChunkDecoder().decode(enc.codec, enc.flags, enc.payload, enc.raw_len, memoryview(out))


def test_file_readers_decode_references_like_any_reader(tmp_path: object) -> None:
    """The native file path (one pread per run, no GIL) rebuilds what the generic reader does."""
    from pathlib import Path
    rng = np.random.default_rng(13)
    v1 = rng.integers(0, 256, 8 * PAGE, dtype=np.uint8)
    link = Link(24 * PAGE, codec="none")
    link.send(v1, 0)
    link.send(v1, 0)
    v2 = v1.copy()
    v2[[7, 2 * PAGE + 9, 6 * PAGE]] ^= 0x5A
    mixed = np.concatenate([v1[3 * PAGE: 5 * PAGE], np.zeros(PAGE, np.uint8), v1[: PAGE]])
    frames = [(link.encoder.encode(memoryview(mixed), 16 * PAGE), mixed), (link.encoder.encode(memoryview(v2), 0), v2)]
    partial = Path(str(tmp_path)) / "partial.img"
    partial.write_bytes(bytes(link.dest.data))
    with FilePages(partial) as reader:
        for enc, data in frames:
            kinds = _kinds(enc)
            assert {3, 6} & set(kinds), kinds  # references and deltas into the partial file
            assert _decode(enc, reader) == _decode(enc, MemoryPages(link.dest.data)) == data.tobytes()
        partial.write_bytes(bytes(link.dest.data[: 2 * PAGE]))  # the referenced pages are gone
        enc, _ = frames[0]
        with pytest.raises(CodecError, match="beyond the end"):
            ChunkDecoder(read_page=reader).decode(enc.codec, enc.flags, enc.payload, enc.raw_len,
                                                  memoryview(bytearray(enc.raw_len)))


def _repeat_migration(tmp_path: object, changed: float, codec: str) -> tuple[int, int, dict[str, int]]:
    from pathlib import Path
    base = Path(str(tmp_path)) / "baseline.img"
    image = page_mix(512, seed=21)
    base.write_bytes(image.tobytes())
    chunk = 32 * PAGE
    first = sum(len(ChunkEncoder(codec_by_name(codec)).encode(memoryview(image[o:o + chunk]), o).payload)
                for o in range(0, len(image), chunk))
    new = image.copy().reshape(-1, PAGE)
    rng = np.random.default_rng(22)
    for p in rng.choice(len(new), int(changed * len(new)), replace=False):
        new[p, rng.integers(0, PAGE, 64)] = rng.integers(0, 256, 64)
    new = new.reshape(-1)
    have = HaveList.from_bytes(have_list(base).to_bytes())
    encoder = ChunkEncoder(codec_by_name(codec))
    encoder.set_peer_have_list(have)
    wire = 0
    with FilePages(base) as reader:
        for o in range(0, len(new), chunk):
            enc = encoder.encode(memoryview(new[o:o + chunk]), o)
            wire += len(enc.payload)
            assert _decode(enc, None, reader) == new[o:o + chunk].tobytes()
    return first, wire, encoder.stats.pages


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_repeat_migration_sends_only_changed_pages(tmp_path: object, codec: str) -> None:
    first, wire, kinds = _repeat_migration(tmp_path, 0.05, codec)
    assert kinds["baseline"] > 0.5 * 512
    assert wire < 0.15 * first


def test_forced_fingerprint_collision_is_sent_literally(tmp_path: object) -> None:
    """Every fingerprint collides, so only the confirmation half can tell pages apart."""
    rng = np.random.default_rng(12)
    baseline = rng.integers(0, 256, 4 * PAGE, dtype=np.uint8)
    other = rng.integers(0, 256, 4 * PAGE, dtype=np.uint8)
    old = pages.set_fingerprint_mask(0)
    try:
        encoder = ChunkEncoder(codec_by_name("none"), delta_cache_bytes=0)
        have = np.zeros((4, 2), np.uint64)
        zero = np.empty(4, np.uint8)
        pages.page_hashes(baseline, zero, have)
        encoder.set_peer_have_list(HaveList(have))
        dest = MemoryPages(bytes(16 * PAGE))
        enc = encoder.encode(memoryview(other), 0)
        assert enc.flags == 0                     # nothing trusted: all four pages literal
        dest.write(0, _decode(enc, dest, MemoryPages(baseline)))
        encoder.acked(0, 4 * PAGE, enc.checksum)
        enc2 = encoder.encode(memoryview(rng.integers(0, 256, 4 * PAGE, dtype=np.uint8)), 8 * PAGE)
        assert enc2.flags == 0                    # colliding acked pages are not trusted either
        same = encoder.encode(memoryview(baseline), 0)
        assert _kinds(same) == [5, 5, 5, 5]       # true matches still are references
    finally:
        pages.set_fingerprint_mask(old)


def test_metrics_count_pages_by_kind_and_chunks_by_codec() -> None:
    metrics = Metrics()
    encoder = ChunkEncoder(codec_by_name("lz4"), metrics)
    data = page_mix(64, seed=3)
    encoder.encode(memoryview(data), 0)
    text = metrics.exposition().decode()
    zero = encoder.stats.pages["zero"]
    assert f'dwcp_v3_hde_pages_total{{kind="zero"}} {float(zero)}' in text
    assert 'dwcp_v3_hde_codec_chunks_total{codec="lz4"} 1.0' in text
    assert "dwcp_v3_hde_compression_latency_seconds_count 1.0" in text


def test_make_encoder_forces_the_configured_codec_or_selects() -> None:
    forced = make_encoder(Config(compression_algo="zstd", zstd_level=3))
    assert forced.codec is not None and forced.codec.name == "zstd" and forced.codec.level == 3
    # 1 MB/s: slow enough that zstd wins even if the host profile was measured on a loaded machine
    auto = make_encoder(Config(compression_algo="auto", delta_cache_bytes=1 << 20), link=lambda: 1e6,
                        cpu_share=None)  # an idle host, whatever this one's load
    assert auto.codec is None and auto.selector is not None
    text = page_mix(64, seed=4)
    enc = auto.encode(memoryview(text), 0)
    assert enc.codec == 2                          # slow link, compressible data: zstd
    assert _decode(enc) == text.tobytes()


class _CountingCodec(Codec):
    """A real codec that also records how many bytes it was asked to compress."""

    compressed: list[int]

    def compress(self, data: memoryview | bytes) -> bytes:
        self.compressed.append(len(data))
        return super().compress(data)


def _counting(name: str) -> _CountingCodec:
    base = codec_by_name(name)
    codec = _CountingCodec(base.id, base.name, base.level)
    object.__setattr__(codec, "compressed", [])
    return codec


@pytest.mark.parametrize("codec", ["lz4", "zstd", "snappy"])
def test_forced_codec_stores_an_incompressible_chunk_after_compressing_only_samples(codec: str) -> None:
    data = np.random.default_rng(11).integers(0, 256, 256 * PAGE, dtype=np.uint8)
    counting = _counting(codec)
    enc = ChunkEncoder(counting).encode(memoryview(data), 0)
    assert enc.codec == 0 and enc.flags == 0 and enc.payload_len == len(data)
    assert sum(counting.compressed) <= INCOMPRESSIBLE_SAMPLES * PAGE  # not the whole MiB
    assert _decode(enc) == data.tobytes()


@pytest.mark.parametrize("codec", ["lz4", "zstd", "snappy"])
@pytest.mark.parametrize("text_every", [1, 2, 3])
def test_forced_codec_still_compresses_a_chunk_whose_samples_shrink(codec: str, text_every: int) -> None:
    """Random pages with text pages among them (every page, every other, every third): the
    samples see text, the whole chunk is compressed, and it decodes byte for byte."""
    rng = np.random.default_rng(text_every)
    grid = rng.integers(0, 256, (256, PAGE), dtype=np.uint8)
    words = rng.integers(97, 123, (32, 8), dtype=np.uint8)
    for i in range(0, 256, text_every):
        grid[i] = words[rng.integers(0, 32, PAGE // 8)].reshape(-1)
    data = grid.reshape(-1)
    for offset in (None, 0):  # the plain path and the page-map path
        enc = ChunkEncoder(codec_by_name(codec)).encode(memoryview(data), offset)
        assert enc.codec == codec_by_name(codec).id and enc.payload_len < len(data)
        assert _decode(enc) == data.tobytes()


def test_page_map_with_zero_pages_and_an_incompressible_body_is_stored_and_decodes() -> None:
    data = np.random.default_rng(3).integers(0, 256, (256, PAGE), dtype=np.uint8)
    data[::5] = 0  # zero pages: the page-map layout, its literal body random
    counting = _counting("lz4")
    enc = ChunkEncoder(counting).encode(memoryview(data.reshape(-1)), 0)
    assert enc.flags == FLAG_PAGE_MAP and enc.codec == 0
    assert sum(counting.compressed) <= INCOMPRESSIBLE_SAMPLES * PAGE
    assert _decode(enc) == data.tobytes()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=300), st.integers(1, PAGE))
def test_literal_runs_are_the_maximal_runs_of_literal_pages(literal: list[bool], last_page: int) -> None:
    kinds = np.array([0 if lit else 1 for lit in literal], dtype=np.uint8)  # LITERAL = 0, ZERO = 1
    raw_len = (len(literal) - 1) * PAGE + last_page
    starts, ends = _literal_runs(kinds, raw_len)
    expected, page = [], 0
    while page < len(literal):
        if literal[page]:
            first = page
            while page < len(literal) and literal[page]:
                page += 1
            expected.append((first * PAGE, min(page * PAGE, raw_len)))
        else:
            page += 1
    assert list(zip(starts, ends, strict=True)) == expected
    assert all(isinstance(x, int) for x in starts + ends)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=120), st.integers(1, PAGE), st.integers(1, 6))
def test_spread_pages_of_the_runs_are_the_pages_of_the_gathered_bytes(literal: list[bool], last_page: int,
                                                                       count: int) -> None:
    """The one sample picker: over the literal runs where they lie (the selector's estimate) it
    gives the very pages it gives over the gathered literal bytes (a forced codec's check): the
    first page, the last, and pages evenly between, as many as asked or as there are."""
    kinds = np.array([0 if lit else 1 for lit in literal], dtype=np.uint8)
    raw_len = (len(literal) - 1) * PAGE + last_page
    data = np.random.default_rng(len(literal) * PAGE + last_page).integers(0, 256, raw_len, dtype=np.uint8).tobytes()
    starts, ends = _literal_runs(kinds, raw_len)
    total = sum(ends) - sum(starts)
    gathered = b"".join(data[start:end] for start, end in zip(starts, ends, strict=True))
    from_runs = [bytes(page) for page in spread_pages(memoryview(data), starts, ends, total, count)]
    from_body = [bytes(page) for page in spread_pages(memoryview(gathered), [0], [total], total, count)]
    assert from_runs == from_body
    n_pages = (total + PAGE - 1) // PAGE
    assert len(from_body) == min(count, n_pages)
    if total:
        assert from_body[0] == gathered[:PAGE]
        assert from_body[-1] == gathered[(n_pages - 1) * PAGE:] or len(from_body) == 1


def test_a_forced_codec_never_measures_the_selectors_speeds() -> None:
    """The selector's host profile (a calibration of every codec, ~20 ms) and its per-chunk speed
    updates only serve the `auto` choice: a forced codec leaves them alone; auto still feeds them."""
    data = page_mix(256, seed=4)
    for algo, measured in (("zstd", False), ("lz4", False), ("auto", True)):
        encoder = make_encoder(Config(compression_algo=algo), link=1e6, cpu_share=None)
        for offset in (None, 0):  # the plain and the page-map paths
            encoder.encode(memoryview(data), offset)
        assert encoder.selector is not None
        assert (encoder.selector._profile is not None) is measured, algo


@pytest.mark.parametrize("codec", ["zstd", "snappy", "lz4"])
def test_forced_codec_compresses_skewed_bytes_lz4_cannot_shrink(codec: str) -> None:
    """Random bytes of 16 values: no repeats for lz4, half the entropy for zstd's Huffman stage.
    The samples are tried with the forced codec, not only lz4: zstd still compresses the chunk."""
    data = np.random.default_rng(8).integers(0, 16, 256 * PAGE, dtype=np.uint8) * 17
    enc = ChunkEncoder(codec_by_name(codec)).encode(memoryview(data), 0)
    whole = len(codec_by_name(codec).compress(memoryview(data)))
    if whole < len(data) * 0.9:  # the codec packs it (zstd): so must the encoder
        assert enc.codec == codec_by_name(codec).id and enc.payload_len == whole
    assert _decode(enc) == data.tobytes()
