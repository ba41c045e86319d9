"""Chunk encoding, first cut: zero pages are not sent, the rest goes through one codec.

Payload layout (the frame's flags say which parts are present):
  FLAG_ALL_ZERO  no payload at all: every page of the chunk is zero.
  FLAG_ZERO_MAP  payload starts with a bitmap, one bit per page (1 = zero page, LSB first),
                 followed by the codec's encoding of the non-zero pages back to back.
  neither        the codec's encoding of the whole chunk.
A codec that would inflate the data is replaced by `none`, so the wire never carries more than
the raw bytes plus the bitmap.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import xxhash

from dwcp_agent._native import pages
from dwcp_agent.hde.codecs import Codec, CodecError, CodecId, codec_by_id
from dwcp_agent.telemetry.metrics import Metrics

PAGE_SIZE = pages.PAGE_SIZE
FLAG_ALL_ZERO = 0x01
FLAG_ZERO_MAP = 0x02


def checksum(data: memoryview | bytes) -> int:
    """xxh3-64 of a chunk's raw bytes, as carried in the frame header."""
    return xxhash.xxh3_64_intdigest(data)


@dataclass(frozen=True)
class EncodedChunk:
    """What the sender frames: codec id, flags, payload, and the raw length and checksum."""

    codec: int
    flags: int
    payload: bytes
    raw_len: int
    checksum: int


class ChunkEncoder:
    """Encodes chunks for one migration; safe to call from several threads at once."""

    def __init__(self, codec: Codec, metrics: Metrics | None = None) -> None:
        self.codec = codec
        self.metrics = metrics
        self._local = threading.local()

    def _mask(self, n_pages: int) -> np.ndarray:
        mask: np.ndarray | None = getattr(self._local, "mask", None)
        if mask is None or mask.shape[0] < n_pages:
            mask = np.empty(max(n_pages, 1024), dtype=np.uint8)
            self._local.mask = mask
        return mask[:n_pages]

    def encode(self, data: memoryview) -> EncodedChunk:
        start = time.perf_counter()
        raw_len = len(data)
        digest = checksum(data)
        n_pages = (raw_len + PAGE_SIZE - 1) // PAGE_SIZE
        mask = self._mask(n_pages)
        zeros = pages.zero_page_mask(data, mask) if raw_len else 0
        if zeros == n_pages:
            encoded = EncodedChunk(CodecId.NONE, FLAG_ALL_ZERO, b"", raw_len, digest)
        elif zeros:
            body = _gather_nonzero(data, mask)
            codec_id, payload = self._compress(body)
            bitmap = np.packbits(mask, bitorder="little").tobytes()
            encoded = EncodedChunk(codec_id, FLAG_ZERO_MAP, bitmap + payload, raw_len, digest)
        else:
            codec_id, payload = self._compress(data)
            encoded = EncodedChunk(codec_id, 0, payload, raw_len, digest)
        if self.metrics is not None:
            self.metrics.hde_compression_latency.observe(time.perf_counter() - start)
            self.metrics.hde_pages.labels("zero").inc(zeros)
            self.metrics.hde_pages.labels("literal").inc(n_pages - zeros)
            self.metrics.hde_codec_chunks.labels(CodecId(encoded.codec).name.lower()).inc()
        return encoded

    def _compress(self, body: memoryview | bytes) -> tuple[int, bytes]:
        if self.codec.id is not CodecId.NONE:
            payload = self.codec.compress(body)
            if len(payload) < len(body):
                return self.codec.id, payload
        return CodecId.NONE, bytes(body)


def _gather_nonzero(data: memoryview, mask: np.ndarray) -> bytes:
    """The non-zero pages of `data` back to back (the last page may be short)."""
    arr = np.frombuffer(data, dtype=np.uint8)
    full = len(arr) // PAGE_SIZE
    body = arr[: full * PAGE_SIZE].reshape(full, PAGE_SIZE)[mask[:full] == 0].tobytes()
    if full < len(mask) and not mask[full]:
        body += arr[full * PAGE_SIZE:].tobytes()
    return body


class ChunkDecoder:
    """Rebuilds a chunk's raw bytes from its frame; malformed payloads raise CodecError."""

    def __init__(self, zstd_level: int = 1) -> None:
        self.zstd_level = zstd_level

    def decode(self, codec_id: int, flags: int, payload: memoryview, raw_len: int, out: memoryview) -> None:
        """Write exactly `raw_len` decoded bytes into `out[:raw_len]`."""
        if len(out) < raw_len:
            raise CodecError(f"output buffer of {len(out)} bytes cannot hold {raw_len}")
        dest = np.frombuffer(out, dtype=np.uint8, count=raw_len)
        if flags & ~(FLAG_ALL_ZERO | FLAG_ZERO_MAP):
            raise CodecError(f"unknown chunk flags 0x{flags:02x}")
        if flags & FLAG_ALL_ZERO:
            if len(payload):
                raise CodecError("all-zero chunk carries a payload")
            dest[:] = 0
            return
        codec = codec_by_id(codec_id, self.zstd_level)
        if not flags & FLAG_ZERO_MAP:
            dest[:] = np.frombuffer(codec.decompress(payload, raw_len), dtype=np.uint8)
            return
        n_pages = (raw_len + PAGE_SIZE - 1) // PAGE_SIZE
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
