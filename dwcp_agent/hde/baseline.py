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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from dwcp_agent.hde.codecs import CodecError
from dwcp_agent.hde.layout import PAGE_SIZE
from dwcp_agent.kernels import pages

HAVE_MAGIC = b"DWHL"          # dense: one row per page (still read)
SPARSE_MAGIC = b"DWHS"        # sparse: rows of non-zero pages only, with their page indexes
# Bump when the page hash in native/pages.pyx changes: hashes of two versions never match.
HASH_VERSION = 1
_HEADER = struct.Struct("<4sHHQ")   # magic, version, page size / 1024, pages
_SPARSE = struct.Struct("<4sHHQQ")  # magic, version, page size / 1024, pages, rows
READ_BLOCK = 8 << 20


@dataclass(frozen=True)
class HaveList:
    """(fingerprint, confirmation) hashes of the receiver's baseline pages.

    Dense (`index` None): row i is page i, shape (pages, 2). Sparse: row r is page `index[r]`
    (ascending) and pages without a row are zero or holes; `total` is the page count either way.
    """

    hashes: np.ndarray
    index: np.ndarray | None = None
    total: int = -1

    @property
    def pages(self) -> int:
        """Pages of the baseline file (holes included)."""
        return self.total if self.total >= 0 else int(self.hashes.shape[0])

    @property
    def entries(self) -> int:
        """Rows held: what the have-list costs in memory (about 24 bytes each)."""
        return int(self.hashes.shape[0])

    def sparse(self) -> tuple[np.ndarray, np.ndarray]:
        """(page indexes, rows) of the non-zero pages, ascending."""
        hashes = np.ascontiguousarray(self.hashes, dtype=np.uint64).reshape(-1, 2)
        index = (np.arange(len(hashes), dtype=np.int64) if self.index is None
                 else np.ascontiguousarray(self.index, dtype=np.int64))
        keep = (hashes != 0).any(axis=1)
        return np.ascontiguousarray(index[keep]), np.ascontiguousarray(hashes[keep])

    def to_bytes(self) -> bytes:
        """Wire form: sparse header, then zstd of the row page indexes (delta-coded u64) and the
        little-endian u64 pairs: 24 bytes a non-zero page before compression, nothing for holes."""
        index, rows = self.sparse()
        deltas = np.diff(index, prepend=np.int64(0)).astype("<u8")
        body = deltas.tobytes() + np.ascontiguousarray(rows, dtype="<u8").tobytes()
        packed = zstandard.ZstdCompressor(level=1).compress(body)
        return _SPARSE.pack(SPARSE_MAGIC, HASH_VERSION, PAGE_SIZE // 1024, self.pages, len(index)) + packed

    @classmethod
    def from_bytes(cls, blob: bytes | memoryview, max_pages: int = 1 << 32) -> HaveList:
        """Parse a have-list from a peer; anything malformed is a CodecError, never a bigger allocation
        than max_pages * 24 bytes."""
        view = memoryview(blob)
        if len(view) >= 4 and bytes(view[:4]) == SPARSE_MAGIC:
            return cls._sparse_from(view, max_pages)
        if len(view) < _HEADER.size:
            raise CodecError("have-list is shorter than its header")
        magic, version, page_k, count = _HEADER.unpack(view[: _HEADER.size])
        if magic != HAVE_MAGIC:
            raise CodecError("have-list has a bad magic")
        _check_version(version, page_k)
        if count > max_pages:
            raise CodecError(f"have-list of {count} pages exceeds the limit of {max_pages}")
        body = _decompress(view[_HEADER.size:], count * 16)
        hashes = np.frombuffer(body, dtype="<u8").astype(np.uint64).reshape(count, 2)
        return cls(hashes)

    @classmethod
    def _sparse_from(cls, view: memoryview, max_pages: int) -> HaveList:
        if len(view) < _SPARSE.size:
            raise CodecError("have-list is shorter than its header")
        _, version, page_k, total, rows = _SPARSE.unpack(view[: _SPARSE.size])
        _check_version(version, page_k)
        if rows > max_pages or rows > total or total > 1 << 50:
            raise CodecError(f"have-list of {rows} rows / {total} pages exceeds the limit of {max_pages}")
        body = _decompress(view[_SPARSE.size:], rows * 24)
        index = np.cumsum(np.frombuffer(body[: rows * 8], dtype="<u8").astype(np.uint64)).astype(np.int64)
        if rows and (index[-1] >= total or (np.diff(index) <= 0).any() or index[0] < 0):
            raise CodecError("have-list page indexes do not ascend within the baseline")
        hashes = np.frombuffer(body[rows * 8:], dtype="<u8").astype(np.uint64).reshape(rows, 2)
        return cls(hashes, index, int(total))


def _check_version(version: int, page_k: int) -> None:
    if version != HASH_VERSION or page_k * 1024 != PAGE_SIZE:
        raise CodecError(f"have-list hash version {version} / page {page_k} KiB is not ours")


def _decompress(packed_view: memoryview, size: int) -> bytes:
    packed = bytes(packed_view)
    try:
        claimed = zstandard.frame_content_size(packed)
        if claimed not in (-1, size):
            raise CodecError(f"have-list body claims {claimed} bytes, header says {size}")
        body = zstandard.ZstdDecompressor().decompress(packed, max_output_size=max(size, 1))
    except zstandard.ZstdError as exc:
        raise CodecError(f"have-list body does not decode: {exc}") from exc
    if len(body) != size:
        raise CodecError(f"have-list body holds {len(body)} bytes, header says {size}")
    return body


def header_pages(blob: bytes | memoryview) -> int:
    """Rows a have-list carries (pages for the dense form), from its header alone (0 if it has
    none): checked against the index budget before anything is decompressed."""
    view = memoryview(blob)
    if len(view) >= _SPARSE.size and bytes(view[:4]) == SPARSE_MAGIC:
        return int(_SPARSE.unpack(view[: _SPARSE.size])[4])
    if len(view) < _HEADER.size:
        return 0
    return int(_HEADER.unpack(view[: _HEADER.size])[3])


def _non_zero_pages(fd: int, count: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(page indexes, hash rows) of the non-zero pages among the first `count` whole pages of
    `fd`, one read block at a time: holes are not read, zero pages get no row. The rows array is
    reused between blocks."""
    from dwcp_agent.migration.extents import data_extents

    zero = np.empty(READ_BLOCK // PAGE_SIZE, dtype=np.uint8)
    block = np.empty((READ_BLOCK // PAGE_SIZE, 2), dtype=np.uint64)
    buf = np.empty(READ_BLOCK, dtype=np.uint8)
    for start, end in data_extents(fd, count * PAGE_SIZE):
        done, stop = start // PAGE_SIZE, (end + PAGE_SIZE - 1) // PAGE_SIZE
        while done < stop:
            want = min(READ_BLOCK // PAGE_SIZE, stop - done) * PAGE_SIZE
            if os.preadv(fd, [buf.data[:want]], done * PAGE_SIZE) != want:
                raise OSError("the baseline shrank while its have-list was computed")
            n = want // PAGE_SIZE
            pages.page_hashes(buf[:want], zero[:n], block[:n])
            keep = np.flatnonzero(zero[:n] == 0)
            yield keep.astype(np.int64) + done, block[keep]
            done += n


def have_list(path: str | os.PathLike[str], max_entries: int = 1 << 40) -> HaveList | None:
    """Hash the pages of the file at `path` (the receiver's baseline), sparse: holes are not read
    and zero pages get no row. A short last page is left out, since only whole pages are ever
    referenced. None when it would hold more than `max_entries` rows (the index budget)."""
    indexes: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    rows: list[np.ndarray] = [np.zeros((0, 2), dtype=np.uint64)]
    held = 0
    with open(path, "rb", buffering=0) as f:
        count = os.fstat(f.fileno()).st_size // PAGE_SIZE
        for index, block in _non_zero_pages(f.fileno(), count):
            held += len(index)
            if held > max_entries:
                return None
            indexes.append(index)
            rows.append(block)
    return HaveList(np.concatenate(rows), np.concatenate(indexes), count)


def have_list_blob(path: str | os.PathLike[str], max_entries: int = 1 << 40) -> bytes | None:
    """`have_list(path, max_entries).to_bytes()` built as the file is read: the page indexes go
    into the compressor block by block and only the hash rows are held until the end (16 bytes a
    non-zero page instead of the list, its copies and the joined body). None over `max_entries`."""
    compressor = zstandard.ZstdCompressor(level=1).compressobj()
    packed: list[bytes] = []
    hashes = bytearray()
    held = last = 0
    with open(path, "rb", buffering=0) as f:
        count = os.fstat(f.fileno()).st_size // PAGE_SIZE
        for index, block in _non_zero_pages(f.fileno(), count):
            keep = (block != 0).any(axis=1)  # as HaveList.sparse(): a (0, 0) hash is never referenced
            held += int(keep.sum())
            if held > max_entries:
                return None
            if keep.any():
                kept = index[keep]
                packed.append(compressor.compress(np.diff(kept, prepend=np.int64(last)).astype("<u8").tobytes()))
                last = int(kept[-1])
                hashes += np.ascontiguousarray(block[keep], dtype="<u8").tobytes()
    packed.append(compressor.compress(hashes))
    packed.append(compressor.flush())
    return _SPARSE.pack(SPARSE_MAGIC, HASH_VERSION, PAGE_SIZE // 1024, count, held) + b"".join(packed)


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
