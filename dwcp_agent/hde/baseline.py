"""Baseline negotiation: the destination tells the source what it already holds, page by page.

The receiver computes a `HaveList` of its baseline (an earlier image of the same VM, or a shared
base image): the 128-bit page hash of every page, zero pages as (0, 0). It travels in the
resume/handshake control messages as `HaveList.to_bytes()` (a versioned, zstd-compressed blob).
The sender installs it with `ChunkEncoder.set_peer_have_list`; pages whose hash matches in all
128 bits go as SAME / BASELINE references, which the receiver resolves by reading its baseline
through a `FilePages` reader. Whatever slips through (a 128-bit collision) is still caught by
the chunk checksum and the object digest.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from dwcp_agent._native import pages
from dwcp_agent.hde.codecs import CodecError
from dwcp_agent.hde.layout import PAGE_SIZE

HAVE_MAGIC = b"DWHL"
# Bump when the page hash in native/pages.pyx changes: hashes of two versions never match.
HASH_VERSION = 1
_HEADER = struct.Struct("<4sHHQ")   # magic, version, page size / 1024, pages
READ_BLOCK = 8 << 20


@dataclass(frozen=True)
class HaveList:
    """Per-page (fingerprint, confirmation) hashes of the receiver's baseline, shape (pages, 2)."""

    hashes: np.ndarray

    @property
    def pages(self) -> int:
        return int(self.hashes.shape[0])

    def to_bytes(self) -> bytes:
        """Wire form: header, then zstd of the little-endian u64 pairs (about 16 B per page before
        compression; zero and repeated pages compress away)."""
        body = np.ascontiguousarray(self.hashes, dtype="<u8").tobytes()
        packed = zstandard.ZstdCompressor(level=1).compress(body)
        return _HEADER.pack(HAVE_MAGIC, HASH_VERSION, PAGE_SIZE // 1024, self.pages) + packed

    @classmethod
    def from_bytes(cls, blob: bytes | memoryview, max_pages: int = 1 << 32) -> HaveList:
        """Parse a have-list from a peer; anything malformed is a CodecError, never a bigger allocation
        than max_pages * 16 bytes."""
        view = memoryview(blob)
        if len(view) < _HEADER.size:
            raise CodecError("have-list is shorter than its header")
        magic, version, page_k, count = _HEADER.unpack(view[: _HEADER.size])
        if magic != HAVE_MAGIC:
            raise CodecError("have-list has a bad magic")
        if version != HASH_VERSION or page_k * 1024 != PAGE_SIZE:
            raise CodecError(f"have-list hash version {version} / page {page_k} KiB is not ours")
        if count > max_pages:
            raise CodecError(f"have-list of {count} pages exceeds the limit of {max_pages}")
        size = count * 16
        packed = bytes(view[_HEADER.size:])
        try:
            claimed = zstandard.frame_content_size(packed)
            if claimed not in (-1, size):
                raise CodecError(f"have-list body claims {claimed} bytes, header says {size}")
            body = zstandard.ZstdDecompressor().decompress(packed, max_output_size=max(size, 1))
        except zstandard.ZstdError as exc:
            raise CodecError(f"have-list body does not decode: {exc}") from exc
        if len(body) != size:
            raise CodecError(f"have-list body holds {len(body)} bytes, header says {size}")
        hashes = np.frombuffer(body, dtype="<u8").astype(np.uint64).reshape(count, 2)
        return cls(hashes)


def header_pages(blob: bytes | memoryview) -> int:
    """Pages a have-list claims, from its header alone (0 if it has none): checked against the
    index budget before anything is decompressed."""
    view = memoryview(blob)
    if len(view) < _HEADER.size:
        return 0
    return int(_HEADER.unpack(view[: _HEADER.size])[3])


def have_list(path: str | os.PathLike[str]) -> HaveList:
    """Hash every page of the file at `path` (the receiver's baseline); a short last page is
    left out, since only whole pages are ever referenced. Holes are not read: their pages stay
    (0, 0), the hash of a zero page."""
    from dwcp_agent.migration.extents import data_extents

    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        count = size // PAGE_SIZE
        hashes = np.zeros((count, 2), dtype=np.uint64)
        zero = np.empty(READ_BLOCK // PAGE_SIZE, dtype=np.uint8)
        buf = np.empty(READ_BLOCK, dtype=np.uint8)
        for start, end in data_extents(f.fileno(), count * PAGE_SIZE):
            done, stop = start // PAGE_SIZE, (end + PAGE_SIZE - 1) // PAGE_SIZE
            while done < stop:
                want = min(READ_BLOCK // PAGE_SIZE, stop - done) * PAGE_SIZE
                got = os.preadv(f.fileno(), [buf.data[:want]], done * PAGE_SIZE)
                if got != want:
                    raise OSError(f"{path} shrank while its have-list was computed")
                n = want // PAGE_SIZE
                pages.page_hashes(buf[:want], zero[:n], hashes[done: done + n])
                done += n
    return HaveList(hashes)


class FilePages:
    """Reads pages of a file for the decoder: `reader(offset, length) -> bytes` with os.pread.

    Give the receiver's partial file as `read_page` (pages it has acknowledged) and the baseline
    file as `read_baseline`. A read past the end is a CodecError: the sender referenced a page
    this file does not have.
    """

    def __init__(self, file: int | str | Path) -> None:
        if isinstance(file, int):
            self.fd, self._owned = file, False
        else:
            self.fd, self._owned = os.open(file, os.O_RDONLY), True

    def __call__(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise CodecError(f"reference to bytes {offset}..{offset + length} beyond the end of the file")
        return data

    def read_into(self, offset: int, out: memoryview) -> None:
        """Fill `out` from `offset` without an intermediate copy (the decoder prefers this)."""
        done = 0
        while done < len(out):
            got = os.preadv(self.fd, [out[done:]], offset + done)
            if got <= 0:
                raise CodecError(f"reference to bytes {offset}..{offset + len(out)} beyond the end of the file")
            done += got

    def close(self) -> None:
        if self._owned:
            os.close(self.fd)
            self._owned = False

    def __enter__(self) -> FilePages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
