"""Byte codecs (none / lz4 / zstd / snappy) behind one interface, with the ids the wire carries.

Every codec releases the GIL inside its library, so a thread pool encodes chunks in parallel.
zstd contexts are not thread-safe, so each thread keeps its own.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from enum import IntEnum

import lz4.block
import snappy
import zstandard


class CodecId(IntEnum):
    """Codec identifiers as they travel in the frame header."""

    NONE = 0
    LZ4 = 1
    ZSTD = 2
    SNAPPY = 3


class CodecError(ValueError):
    """A payload does not decode to the length its frame announced."""


@dataclass(frozen=True)
class Codec:
    """One codec: `compress` bytes-like -> bytes, `decompress` payload -> exactly raw_len bytes."""

    id: CodecId
    name: str
    level: int = 0

    def compress(self, data: memoryview | bytes) -> bytes:
        if self.id is CodecId.NONE:
            return bytes(data)
        if self.id is CodecId.LZ4:
            return lz4.block.compress(data, store_size=False)
        if self.id is CodecId.ZSTD:
            return _zstd_compressor(self.level).compress(data)
        return snappy.compress(bytes(data) if isinstance(data, memoryview) else data)

    def decompress(self, payload: memoryview | bytes, raw_len: int) -> bytes:
        """Exactly raw_len bytes, or CodecError. Sizes a payload claims are checked before any
        allocation, so a hostile payload cannot make the receiver allocate more than raw_len."""
        try:
            if self.id is CodecId.NONE:
                out = bytes(payload)
            elif self.id is CodecId.LZ4:
                out = lz4.block.decompress(payload, uncompressed_size=raw_len)
            elif self.id is CodecId.ZSTD:
                claimed = zstandard.frame_content_size(payload)
                if claimed not in (-1, raw_len):
                    raise CodecError(f"zstd: frame claims {claimed} bytes, frame announced {raw_len}")
                out = _zstd_decompressor().decompress(payload, max_output_size=raw_len)
            else:
                claimed = _snappy_length(payload)
                if claimed != raw_len:
                    raise CodecError(f"snappy: payload claims {claimed} bytes, frame announced {raw_len}")
                out = snappy.uncompress(bytes(payload))
        except CodecError:
            raise
        except (lz4.block.LZ4BlockError, zstandard.ZstdError, snappy.UncompressError, ValueError) as exc:
            raise CodecError(f"{self.name}: payload does not decode: {exc}") from exc
        if len(out) != raw_len:
            raise CodecError(f"{self.name}: decoded {len(out)} bytes, frame announced {raw_len}")
        return out


_local = threading.local()


def _snappy_length(payload: memoryview | bytes) -> int:
    """The uncompressed length a raw snappy block starts with (a uvarint), or -1 if malformed."""
    value = 0
    for i, byte in enumerate(bytes(payload[:5])):
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            return value
    return -1


def _zstd_compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("zc", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=False)
    return cache[level]


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "zd"):
        _local.zd = zstandard.ZstdDecompressor()
    return _local.zd


NAMES = {"none": CodecId.NONE, "lz4": CodecId.LZ4, "zstd": CodecId.ZSTD, "snappy": CodecId.SNAPPY}


def codec_by_name(name: str, zstd_level: int = 1) -> Codec:
    """The codec a config name selects."""
    if name not in NAMES:
        raise ValueError(f"unknown codec {name!r}; expected one of {', '.join(NAMES)}")
    return codec_by_id(NAMES[name], zstd_level)


def codec_by_id(codec_id: int, zstd_level: int = 1) -> Codec:
    """The codec a frame header names; an unknown id is a CodecError."""
    try:
        cid = CodecId(codec_id)
    except ValueError:
        raise CodecError(f"unknown codec id {codec_id}") from None
    return Codec(cid, cid.name.lower(), zstd_level if cid is CodecId.ZSTD else 0)
