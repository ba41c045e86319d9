"""Chunk encoding: zero pages, duplicates, baseline and acknowledged pages, XOR deltas, codec.

The sender's `ChunkEncoder` turns a chunk into (codec, flags, payload); the receiver's
`ChunkDecoder` rebuilds the raw bytes, or raises CodecError. docs/hde.md specifies the payload
and the rule that keeps cross-chunk references safe with out-of-order streams: a chunk only
references pages the receiver is known to hold (its immutable baseline, or pages it has
acknowledged), and the receiver resolves them by reading its files before writing the chunk.

Encoding one chunk (all page work in native kernels, without the GIL):
  1. zero scan and 128-bit hash of every page (pages.page_hashes)
  2. duplicates inside the chunk, confirmed byte for byte (pages.dedupe_in_chunk)
  3. with an offset: baseline / acknowledged-page / delta candidates (index.PeerIndex.classify),
     delta encoding (delta.encode_deltas) and recording what was sent (PeerIndex.commit)
  4. the codec, chosen per chunk by the selector, over the page map and the literal bytes.
A chunk with no zero page and no reference goes as the codec's encoding of the raw bytes, and
a codec that would not shrink the data is replaced by `none`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

import numpy as np
import xxhash

from dwcp_agent.hde.baseline import FilePages, HaveList
from dwcp_agent.hde.codecs import Codec, CodecError, CodecId, codec_by_id, codec_by_name
from dwcp_agent.hde.layout import (
    DELTA_LIMIT,
    FLAG_ALL_ZERO,
    FLAG_PAGE_MAP,
    FLAG_ZERO_MAP,
    KNOWN_FLAGS,
    MAX_PAGE_INDEX,
    METRIC_KIND,
    PAGE_MAP_HEADER,
    PAGE_SIZE,
    PageKind,
    max_body_len,
    pages_in,
)
from dwcp_agent.hde.selector import SAMPLE_PAGES, CodecSelector, LinkSource, host_cpu_share, spread_pages
from dwcp_agent.kernels import delta, index, pages
from dwcp_agent.telemetry.metrics import Metrics

__all__ = [
    "FLAG_ALL_ZERO", "FLAG_PAGE_MAP", "FLAG_ZERO_MAP", "PAGE_SIZE", "ChunkDecoder", "ChunkEncoder",
    "EncodedChunk", "EncoderStats", "PageReader", "check_all_zero", "checksum", "make_encoder",
]

_K = np.uint8
_REF_KINDS = np.array([k in (PageKind.DUP_IN, PageKind.DUP_X, PageKind.BASELINE) for k in range(256)])
_N_KINDS = len(PageKind)
# Per chunk, the accounting walks these plain tuples, not the enums (an enum walk per chunk cost
# as much as a page hash of the chunk).
_KIND_LABELS = tuple((int(kind), METRIC_KIND[kind]) for kind in PageKind)
_CODEC_NAMES = {int(codec): codec.name.lower() for codec in CodecId}
# Hot-path constants: an enum member looked up on its class goes through EnumType.__getattr__.
_NONE = CodecId.NONE
_LZ4 = codec_by_name("lz4")
_LITERAL, _ZERO, _DUP_IN, _DUP_X, _BASELINE, _DELTA = (
    int(PageKind.LITERAL), int(PageKind.ZERO), int(PageKind.DUP_IN), int(PageKind.DUP_X), int(PageKind.BASELINE),
    int(PageKind.DELTA))
DEFAULT_INDEX_BUDGET = 256 << 20
# A non-zero baseline page costs its hash (16 B), its page index (8 B) and up to two
# fingerprint-table slots (2 x 16 B); holes and zero pages cost nothing.
BASELINE_BYTES_PER_PAGE = 56
# The incompressibility check of a forced codec (_incompressible): sample pages per body, the
# least shrink of one sample that makes the whole body worth compressing, and the smallest body
# checked (below it, compressing the body costs about what the samples would).
INCOMPRESSIBLE_SAMPLES = 4
INCOMPRESSIBLE_GAIN = 0.03
INCOMPRESSIBLE_MIN = 64 * PAGE_SIZE


def checksum(data: memoryview | bytes) -> int:
    """xxh3-64 of a chunk's raw bytes, as carried in the frame header."""
    return xxhash.xxh3_64_intdigest(data)


@dataclass(frozen=True)
class EncodedChunk:
    """What the sender frames: codec id, flags, the payload's parts, the raw length and checksum.

    The payload is the concatenation of `segments`; memoryviews alias the caller's chunk buffer
    (stored pages go to the socket from there, without a copy), so it must outlive the frame.
    """

    codec: int
    flags: int
    segments: tuple[bytes | memoryview, ...]
    raw_len: int
    checksum: int

    @cached_property
    def payload_len(self) -> int:
        return sum(len(part) for part in self.segments)

    @property
    def payload(self) -> bytes | memoryview:
        """The payload in one buffer (joined when it has several parts: tests, fuzzing)."""
        if len(self.segments) == 1:
            return self.segments[0]
        return b"".join(self.segments)


@dataclass
class EncoderStats:
    """Running totals of one encoder (benchmarks and the migration summary read them)."""

    chunks: int = 0
    logical_bytes: int = 0
    payload_bytes: int = 0
    pages: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("zero", "dup", "baseline", "delta", "literal"), 0))
    codec_chunks: dict[str, int] = field(default_factory=dict)


class PageReader(Protocol):
    """Reads `length` bytes at `offset` of a destination-side file (see baseline.FilePages)."""

    def __call__(self, offset: int, length: int) -> bytes | memoryview: ...


class _Scratch:
    """Per-thread buffers, grown to the largest chunk seen, reused for every chunk."""

    def __init__(self, n_pages: int, raw_len: int) -> None:
        self.n_pages = n_pages
        self.raw_len = raw_len
        self.zero = np.empty(n_pages, dtype=np.uint8)
        self.hashes = np.empty((n_pages, 2), dtype=np.uint64)
        self.kinds = np.empty(n_pages, dtype=np.uint8)
        self.refs = np.empty(n_pages, dtype=np.uint64)
        self.slots = np.empty(n_pages, dtype=np.int64)
        self.delta_lens = np.empty(n_pages, dtype=np.uint16)
        self.deltas = np.empty(max(raw_len // 2, PAGE_SIZE), dtype=np.uint8)
        self.body = np.empty(PAGE_MAP_HEADER.size + max_body_len(raw_len), dtype=np.uint8)


class ChunkEncoder:
    """Encodes the chunks of one migration; safe to call from several threads at once.

    `codec` forces one codec (the first-cut behaviour); without it `selector` chooses per chunk.
    Cross-chunk features need the chunk's `offset` in `encode` and the peer's acknowledgements
    through `acked`; without them the encoder still removes zero and duplicate pages per chunk.
    """

    def __init__(self, codec: Codec | None = None, metrics: Metrics | None = None, *,
                 selector: CodecSelector | None = None, delta_cache_bytes: int = 0,
                 dedupe_entries: int = 1 << 18, dedupe: bool = True,
                 index_budget_bytes: int = DEFAULT_INDEX_BUDGET) -> None:
        if codec is None and selector is None:
            selector = CodecSelector()
        self.codec = codec
        self.dedupe = dedupe  # in-chunk duplicate pages; cross-chunk features need `offset` in encode
        self.selector = selector
        self.metrics = metrics
        self.stats = EncoderStats()
        self._local = threading.local()
        self._lock = threading.Lock()
        # The budget (config index_budget_bytes) is split between per-page state and the baseline.
        self.baseline_max_pages = index_budget_bytes // 2 // BASELINE_BYTES_PER_PAGE
        self._index = index.PeerIndex(dedupe_entries, delta_cache_bytes, index_budget_bytes // 2)
        self._sent: dict[int, int] = {}   # chunk offset -> checksum of the version last encoded
        self._stats_lock = threading.Lock()
        self._page_counters: dict[str, Any] = {}
        self._codec_counters: dict[str, Any] = {}
        self._series: tuple[Any, tuple[tuple[int, Any], ...]] | None = None

    # -- peer state -------------------------------------------------------------------------

    def set_peer_have_list(self, have: HaveList | None) -> None:
        """Use the receiver's baseline: pages it already holds go as references."""
        if have is None:
            index, rows = np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.uint64)
        else:
            index, rows = have.sparse()  # zero pages and holes are never referenced: no row
        if len(rows) > self.baseline_max_pages:
            raise ValueError(f"have-list of {len(rows)} non-zero pages is over the index budget "
                             f"({self.baseline_max_pages} pages)")
        with self._lock:
            self._index.set_baseline(index, rows)

    def acked(self, offset: int, length: int, checksum: int | None = None) -> None:
        """The receiver has durably written the chunk at `offset`; its pages may now be referenced.

        With `checksum`, an acknowledgement of an older version of the chunk (a page re-sent since)
        is ignored, so a reference never points at content the receiver may be overwriting.
        """
        if offset % PAGE_SIZE or length < 0:
            return
        with self._lock:
            if checksum is not None and self._sent.get(offset, checksum) != checksum:
                return
            self._sent.pop(offset, None)
            self._index.ack(offset // PAGE_SIZE, length // PAGE_SIZE)

    def forget_peer_acks(self) -> None:
        """After a reconnect whose outcome is unknown: reference no acknowledged page until the
        resume (or new acks) confirms it again. Baseline references stay valid."""
        with self._lock:
            self._index.forget_acks()

    # -- encoding ---------------------------------------------------------------------------

    def _scratch(self, n_pages: int, raw_len: int) -> _Scratch:
        scratch: _Scratch | None = getattr(self._local, "scratch", None)
        if scratch is None or scratch.n_pages < n_pages or scratch.raw_len < raw_len:
            scratch = _Scratch(max(n_pages, 256), max(raw_len, 256 * PAGE_SIZE))
            self._local.scratch = scratch
        return scratch

    def encode(self, data: memoryview | bytes, offset: int | None = None) -> EncodedChunk:
        """Encode one chunk. `offset` (its byte offset in the object, page aligned) enables
        baseline, cross-chunk dedupe and delta; a chunk may be encoded again (re-send)."""
        start = time.perf_counter()
        view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
        raw_len = len(view)
        digest = checksum(view)
        n_pages = pages_in(raw_len)
        s = self._scratch(n_pages, raw_len)
        zero, hashes, kinds = s.zero[:n_pages], s.hashes[:n_pages], s.kinds[:n_pages]
        refs, slots = s.refs[:n_pages], s.slots[:n_pages]
        if self.dedupe or offset is not None:
            zeros = pages.page_hashes(view, zero, hashes) if raw_len else 0
            pages.dedupe_in_chunk(view, zero, hashes, kinds, refs)
        else:  # the first-cut profile: zero pages only, no fingerprints to compute
            zeros = pages.zero_page_mask(view, zero) if raw_len else 0
            np.copyto(kinds, zero)  # mask 1/0 is exactly PageKind.ZERO/LITERAL
        delta_bytes = n_delta = 0
        page0 = -1
        if offset is not None and offset % PAGE_SIZE == 0 and raw_len:
            page0 = offset // PAGE_SIZE
            with self._lock:
                if zeros < n_pages:
                    self._index.classify(page0, raw_len, hashes, kinds, refs, slots,
                                         self._index.cache_pages > 0)
                    if self._index.cache_pages:
                        delta_bytes, n_delta = delta.encode_deltas(
                            view, self._index.cache_array(), kinds, slots, s.deltas, s.delta_lens, DELTA_LIMIT)
                self._index.commit(page0, view, hashes, kinds)
                self._sent[offset] = digest
        per_kind = np.bincount(kinds, minlength=_N_KINDS).tolist() if n_pages else [0] * _N_KINDS
        if zeros == n_pages:
            encoded = EncodedChunk(_NONE, FLAG_ALL_ZERO, (), raw_len, digest)
        elif per_kind[_LITERAL] == n_pages:
            codec = self._choose(view, 0)
            codec_id, payload = self._compress(codec, view)
            encoded = EncodedChunk(codec_id, 0, (payload,), raw_len, digest)
        else:
            literal_len = per_kind[_LITERAL] * PAGE_SIZE
            if kinds[n_pages - 1] == _LITERAL:  # a short last page holds fewer bytes
                literal_len -= n_pages * PAGE_SIZE - raw_len
            encoded = self._encode_page_map(view, s, n_pages, page0, int(n_delta), int(delta_bytes), literal_len,
                                            digest)
        self._account(per_kind, encoded, _CODEC_NAMES[encoded.codec], time.perf_counter() - start)
        return encoded

    def _encode_page_map(self, view: memoryview, s: _Scratch, n_pages: int, page0: int, n_delta: int,
                         delta_bytes: int, literal_len: int, digest: int) -> EncodedChunk:
        """A chunk with zero, duplicate, reference or delta pages. Stored (codec none), its literal
        pages go to the socket from `view` itself; a codec needs them gathered first."""
        kinds = s.kinds[:n_pages]
        meta_len = _build_meta(s, n_pages, n_delta)
        body_len = meta_len + literal_len + delta_bytes
        PAGE_MAP_HEADER.pack_into(s.body.data, 0, body_len, max(page0, 0))
        runs: tuple[list[int], list[int]] | None = None
        if self.codec is not None:
            codec = self.codec
        else:  # the selector's estimate samples the literal runs where they lie
            assert self.selector is not None
            runs = _literal_runs(kinds, len(view))
            sample = b"".join(spread_pages(view, *runs, literal_len, SAMPLE_PAGES))
            codec = self.selector.choose_sampled(sample, literal_len + delta_bytes, meta_len).codec
        body = s.body.data[PAGE_MAP_HEADER.size: PAGE_MAP_HEADER.size + body_len]
        if codec.id is not _NONE:
            # Gathered natively (one copy per run of literal pages); the samples of a forced
            # codec's check are taken from the gathered bytes. The metadata always shrinks and XOR
            # deltas usually do: only literal pages are sampled.
            gathered = pages.gather_literals(view, kinds, body[meta_len: meta_len + literal_len])
            assert gathered == literal_len
            if delta_bytes or not self._skips(codec, _check_samples(body[meta_len: meta_len + literal_len])):
                at = meta_len + literal_len
                body[at: at + delta_bytes] = s.deltas.data[:delta_bytes]
                codec_id, packed = self._compress(codec, body, sampled=True)
                if codec_id is _NONE:
                    packed = bytes(packed)  # the scratch body is reused by this thread's next chunk
                return EncodedChunk(codec_id, FLAG_PAGE_MAP, (bytes(s.body.data[:PAGE_MAP_HEADER.size]), packed),
                                    len(view), digest)
        starts, ends = runs or _literal_runs(kinds, len(view))
        head = PAGE_MAP_HEADER.size + meta_len
        parts: list[bytes | memoryview] = [bytes(s.body.data[:head])]
        parts += [view[start:end] for start, end in zip(starts, ends, strict=True)]
        if delta_bytes:
            parts.append(bytes(s.deltas.data[:delta_bytes]))
        return EncodedChunk(_NONE, FLAG_PAGE_MAP, tuple(parts), len(view), digest)

    def _skips(self, codec: Codec, samples: list[memoryview]) -> bool:
        """A forced codec first tries a few sample pages (the selector samples for `auto` already):
        a chunk none of whose samples shrinks is stored without compressing all of it."""
        return self.codec is not None and codec.id is not _NONE and bool(samples) and _incompressible(codec, samples)

    def _choose(self, body: memoryview, meta_len: int) -> Codec:
        if self.codec is not None:
            return self.codec
        assert self.selector is not None
        return self.selector.choose(body, meta_len).codec

    def _compress(self, codec: Codec, body: memoryview, sampled: bool = False) -> tuple[int, bytes | memoryview]:
        """`body` compressed, or stored when that would not shrink it (`sampled`: _skips already
        said the body is worth compressing)."""
        if codec.id is not _NONE and (sampled or not self._skips(codec, _check_samples(body))):
            if self.codec is not None:  # forced: no choice for the measured speed to inform
                payload = codec.compress(body)
            else:
                assert self.selector is not None
                start = time.perf_counter()
                payload = codec.compress(body)
                self.selector.observe(codec, len(body), time.perf_counter() - start)
            if len(payload) < len(body):
                return codec.id, payload
        # Stored as is: the caller's buffer outlives the frame (the sender holds it until acked),
        # so no copy is needed for the payload.
        return _NONE, body

    def _account(self, per_kind: list[int], encoded: EncodedChunk, codec_name: str, seconds: float) -> None:
        with self._stats_lock:
            st = self.stats
            st.chunks += 1
            st.logical_bytes += encoded.raw_len
            st.payload_bytes += encoded.payload_len
            st.codec_chunks[codec_name] = st.codec_chunks.get(codec_name, 0) + 1
            for kind, label in _KIND_LABELS:
                if per_kind[kind]:
                    st.pages[label] += per_kind[kind]
        if self.metrics is not None:
            latency, page_counters = self._page_series()
            latency.observe(seconds)
            for kind, counter in page_counters:
                if per_kind[kind]:
                    counter.inc(per_kind[kind])
            _child(self._codec_counters, self.metrics.hde_codec_chunks, codec_name).inc()

    def _page_series(self) -> tuple[Any, tuple[tuple[int, Any], ...]]:
        """The latency histogram and each page kind's counter child, looked up once per encoder
        (kinds sharing a label share its child)."""
        if self._series is None:
            assert self.metrics is not None
            pages_family = self.metrics.hde_pages
            self._series = (self.metrics.hde_compression_latency,
                            tuple((kind, _child(self._page_counters, pages_family, label))
                                  for kind, label in _KIND_LABELS))
        return self._series


def _incompressible(codec: Codec, samples: list[memoryview]) -> bool:
    """True when no sample shrinks by INCOMPRESSIBLE_GAIN under `codec`.

    A compression that would not shrink the chunk is thrown away anyway (stored as codec none):
    four 4 KiB samples predict that for ~1.5 % of the cost of compressing a 1 MiB chunk (lz4 or
    zstd on random bytes: ~160 us a MiB here). lz4 tries each sample first, as the cheapest
    codec: what it shrinks, zstd and snappy shrink too; only what lz4 cannot shrink (bytes
    without repeats but skewed, which entropy coding still packs) is tried with `codec` itself.
    """
    for sample in samples:
        limit = len(sample) * (1 - INCOMPRESSIBLE_GAIN)
        if len(_LZ4.compress(sample)) < limit or (codec.id != _LZ4.id and len(codec.compress(sample)) < limit):
            return False
    return True


def _check_samples(body: memoryview) -> list[memoryview]:
    """The incompressibility check's samples of `body`; none when it is under INCOMPRESSIBLE_MIN
    (compressing a small body costs about what the samples would)."""
    if len(body) < INCOMPRESSIBLE_MIN:
        return []
    return spread_pages(body, [0], [len(body)], len(body), INCOMPRESSIBLE_SAMPLES)


def _child(cache: dict[str, Any], family: Any, label: str) -> Any:
    """The metric family's child for `label`, looked up once per encoder instead of once per chunk."""
    child = cache.get(label)
    if child is None:
        child = cache[label] = family.labels(label)
    return child


def _build_meta(s: _Scratch, n_pages: int, n_delta: int) -> int:
    """Lay out kinds | refs | delta lengths in s.body after room for the page-map header; the
    literal pages and the deltas follow them on the wire. Returns the section's length."""
    kinds = s.kinds[:n_pages]
    body = s.body[PAGE_MAP_HEADER.size:]
    pos = 0
    body[:n_pages] = kinds
    pos += n_pages
    ref_vals = s.refs[:n_pages][_REF_KINDS[kinds]]
    body[pos: pos + 8 * len(ref_vals)] = ref_vals.astype("<u8").view(np.uint8)
    pos += 8 * len(ref_vals)
    body[pos: pos + 2 * n_delta] = s.delta_lens[:n_delta].astype("<u2").view(np.uint8)
    return pos + 2 * n_delta


def _literal_runs(kinds: np.ndarray, raw_len: int) -> tuple[list[int], list[int]]:
    """Byte ranges [start, end) of the chunk's runs of consecutive literal pages, in order, as
    two lists (plain ints: a vm-mix chunk has ~64 runs, and numpy scalars per run cost ~90 us)."""
    literal = np.zeros(len(kinds) + 2, dtype=np.int8)
    np.equal(kinds, _LITERAL, out=literal[1:-1].view(np.bool_))
    edges = np.flatnonzero(np.diff(literal)) * PAGE_SIZE
    starts, ends = edges[::2].tolist(), edges[1::2].tolist()
    if ends and ends[-1] > raw_len:  # a short last page
        ends[-1] = raw_len
    return starts, ends


def make_encoder(config: Any, metrics: Metrics | None = None, link: LinkSource = None,
                 threads: int | None = None, cpu_share: Callable[[], float] | None = host_cpu_share) -> ChunkEncoder:
    """The encoder a migration uses, from config: `compression_algo` auto -> codec chosen per
    chunk against `link` (bytes/s, or a callable returning the current estimate; the bandwidth
    predictor plugs in here), otherwise that codec for every chunk; `delta_cache_bytes` sizes the
    XOR-delta cache; `cpu_share` scales the encoder threads by how busy the host is (None: not)."""
    algo = getattr(config, "compression_algo", "auto")
    level = getattr(config, "zstd_level", 1)
    workers = threads or getattr(config, "encode_threads", 0) or None
    selector = CodecSelector(level, link=link, threads=workers, forced=None if algo == "auto" else algo,
                             cpu_share=cpu_share)
    codec = None if algo == "auto" else codec_by_name(algo, level)
    return ChunkEncoder(codec, metrics, selector=selector,
                        delta_cache_bytes=getattr(config, "delta_cache_bytes", 0),
                        index_budget_bytes=getattr(config, "index_budget_bytes", DEFAULT_INDEX_BUDGET))


class ChunkDecoder:
    """Rebuilds a chunk's raw bytes from its frame; a malformed payload raises CodecError.

    `read_page` reads the receiver's partial image (pages it acknowledged), `read_baseline` its
    baseline; both are only called for chunks that reference them. Arguments given to `decode`
    override the ones given here.
    """

    def __init__(self, zstd_level: int = 1, read_page: PageReader | None = None,
                 read_baseline: PageReader | None = None) -> None:
        self.zstd_level = zstd_level
        self.read_page = read_page
        self.read_baseline = read_baseline

    def decode(self, codec_id: int, flags: int, payload: memoryview | bytes, raw_len: int, out: memoryview,
               read_page: PageReader | None = None,
               read_baseline: PageReader | None = None) -> np.ndarray | None:
        """Write exactly `raw_len` decoded bytes into `out[:raw_len]`. Returns the chunk's zero-page
        mask (1 = all-zero page) when the frame says which pages are zero, else None."""
        payload = memoryview(payload)
        if raw_len < 0 or len(out) < raw_len:
            raise CodecError(f"output buffer of {len(out)} bytes cannot hold {raw_len}")
        dest = np.frombuffer(out, dtype=np.uint8, count=raw_len)
        if flags & ~KNOWN_FLAGS or bin(flags).count("1") > 1:
            raise CodecError(f"unknown chunk flags 0x{flags:02x}")
        if flags & FLAG_ALL_ZERO:
            check_all_zero(codec_id, len(payload))
            dest[:] = 0
            return np.ones(pages_in(raw_len), dtype=np.uint8)
        codec = codec_by_id(codec_id, self.zstd_level)
        if flags & FLAG_ZERO_MAP:
            return _decode_zero_map(codec, payload, raw_len, dest)
        if flags & FLAG_PAGE_MAP:
            return _decode_page_map(codec, payload, raw_len, out, read_page or self.read_page,
                                    read_baseline or self.read_baseline)
        body = payload if codec.id is _NONE else codec.decompress(payload, raw_len)
        if len(body) != raw_len:
            raise CodecError(f"payload of {len(body)} bytes, frame announced {raw_len}")
        dest[:] = np.frombuffer(body, dtype=np.uint8)
        return None


def check_all_zero(codec_id: int, payload_len: int) -> None:
    """An ALL_ZERO frame has no payload and codec none; anything else is malformed."""
    if payload_len or codec_id != _NONE:
        raise CodecError("all-zero chunk carries a payload or a codec")


def _decode_zero_map(codec: Codec, payload: memoryview, raw_len: int, dest: np.ndarray) -> np.ndarray:
    """The first-cut layout: a zero bitmap, then the codec's encoding of the non-zero pages."""
    n_pages = pages_in(raw_len)
    map_len = (n_pages + 7) // 8
    if len(payload) < map_len:
        raise CodecError("zero-page bitmap is truncated")
    zero = np.unpackbits(np.frombuffer(payload[:map_len], dtype=np.uint8), bitorder="little")[:n_pages]
    full = raw_len // PAGE_SIZE
    tail = raw_len - full * PAGE_SIZE
    nonzero_full = int(full - zero[:full].sum())
    body_len = nonzero_full * PAGE_SIZE + (tail if full < n_pages and not zero[full] else 0)
    body = np.frombuffer(codec.decompress(payload[map_len:], body_len), dtype=np.uint8)
    grid = dest[: full * PAGE_SIZE].reshape(full, PAGE_SIZE)
    keep = zero[:full] == 0
    grid[~keep] = 0
    grid[keep] = body[: nonzero_full * PAGE_SIZE].reshape(nonzero_full, PAGE_SIZE)
    if tail:
        dest[full * PAGE_SIZE:] = 0 if zero[full] else body[nonzero_full * PAGE_SIZE:]
    return zero


def _decode_page_map(codec: Codec, payload: memoryview, raw_len: int, out: memoryview,
                     read_page: PageReader | None, read_baseline: PageReader | None) -> np.ndarray:
    n_pages = pages_in(raw_len)
    if len(payload) < PAGE_MAP_HEADER.size:
        raise CodecError("page-map header is truncated")
    body_len, page0 = PAGE_MAP_HEADER.unpack(payload[: PAGE_MAP_HEADER.size])
    if body_len > max_body_len(raw_len) or body_len < n_pages:
        raise CodecError(f"page-map body of {body_len} bytes is impossible for {raw_len} raw bytes")
    if page0 + n_pages > MAX_PAGE_INDEX:
        raise CodecError(f"chunk page index {page0} is out of range")
    packed = payload[PAGE_MAP_HEADER.size:]
    body = packed if codec.id is _NONE else memoryview(codec.decompress(packed, body_len))
    if len(body) != body_len:
        raise CodecError(f"page-map body of {len(body)} bytes, header says {body_len}")
    kinds = np.frombuffer(body, dtype=np.uint8, count=n_pages)
    if n_pages and int(kinds.max()) >= _N_KINDS:
        raise CodecError("unknown page kind in the page map")
    full = raw_len // PAGE_SIZE
    if full < n_pages and kinds[full] not in (_LITERAL, _ZERO):
        raise CodecError("a short last page can only be literal or zero")
    counts = np.bincount(kinds, minlength=_N_KINDS)
    n_ref = int(counts[_DUP_IN] + counts[_DUP_X] + counts[_BASELINE])
    n_delta = int(counts[_DELTA])
    pos = n_pages
    if pos + 8 * n_ref + 2 * n_delta > body_len:
        raise CodecError("page map announces more references than the body holds")
    refs = np.frombuffer(body, dtype="<u8", count=n_ref, offset=pos).astype(np.uint64)
    pos += 8 * n_ref
    delta_lens = np.frombuffer(body, dtype="<u2", count=n_delta, offset=pos).astype(np.uint16)
    pos += 2 * n_delta
    literal_len = int(counts[_LITERAL]) * PAGE_SIZE
    if full < n_pages and kinds[full] == PageKind.LITERAL:
        literal_len -= PAGE_SIZE - (raw_len - full * PAGE_SIZE)
    if pos + literal_len + int(delta_lens.sum()) != body_len:
        raise CodecError("page-map sections do not add up to the body length")
    if n_ref and int(refs.max()) >= MAX_PAGE_INDEX:
        raise CodecError("page reference out of range")
    if _is_file_or_none(read_page) and _is_file_or_none(read_baseline):
        try:
            delta.fill_from_files(out, raw_len, kinds, refs, page0, _fd_of(read_page), _fd_of(read_baseline))
        except ValueError as exc:
            raise CodecError(f"page map: {exc}") from None
    else:
        _fill_external(kinds, refs, page0, out, read_page, read_baseline)
    body_arr = np.frombuffer(body, dtype=np.uint8)
    try:
        delta.assemble(out, raw_len, kinds, refs, delta_lens, body_arr[pos: pos + literal_len],
                       body_arr[pos + literal_len:])
    except ValueError as exc:
        raise CodecError(f"page map: {exc}") from None
    return (kinds == _ZERO).view(np.uint8)


def _is_file_or_none(reader: PageReader | None) -> bool:
    return reader is None or isinstance(reader, FilePages)


def _fd_of(reader: PageReader | None) -> int:
    return reader.fd if isinstance(reader, FilePages) else -1


def _fill_external(kinds: np.ndarray, refs: np.ndarray, page0: int, out: memoryview,
                   read_page: PageReader | None, read_baseline: PageReader | None) -> None:
    """Copy every page that comes from the receiver's files into place, one read per run of
    consecutive pages (an unchanged stretch of a baseline is one read, not one per page)."""
    ref_pos = np.cumsum(_REF_KINDS[kinds]) - 1
    positions = np.arange(len(kinds), dtype=np.int64)
    sources: list[tuple[PageReader | None, np.ndarray, np.ndarray, str]] = []
    for kind, from_ref, reader, what in (
        (_DUP_X, True, read_page, "acknowledged page"),
        (_DELTA, False, read_page, "acknowledged page"),
        (_BASELINE, True, read_baseline, "baseline page"),
        (PageKind.SAME, False, read_baseline, "baseline page"),
    ):
        where = positions[kinds == kind]
        if not len(where):
            continue
        src = refs[ref_pos[where]].astype(np.int64) if from_ref else where + page0
        sources.append((reader, where, src, what))
    for reader, where, src, what in sources:
        if reader is None:
            raise CodecError(f"chunk references a {what} but this receiver has no reader for it")
        breaks = np.flatnonzero((np.diff(where) != 1) | (np.diff(src) != 1)) + 1
        for run in np.split(np.arange(len(where)), breaks):
            first, count = int(where[run[0]]), len(run)
            _read_run(reader, int(src[run[0]]) * PAGE_SIZE, out[first * PAGE_SIZE: (first + count) * PAGE_SIZE])


def _read_run(reader: PageReader | Callable[..., Any], offset: int, target: memoryview) -> None:
    read_into = getattr(reader, "read_into", None)
    if read_into is not None:
        read_into(offset, target)
        return
    data = reader(offset, len(target))
    if len(data) != len(target):
        raise CodecError(f"reader returned {len(data)} bytes for a {len(target)}-byte reference")
    target[:] = data
