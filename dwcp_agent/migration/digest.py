"""The object digest: one hash over the ordered chunk checksums, proving the whole image."""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import xxhash

from dwcp_agent.hde.chunk import checksum


def chunk_count(size: int, chunk_size: int) -> int:
    return (size + chunk_size - 1) // chunk_size


def chunk_length(index: int, size: int, chunk_size: int) -> int:
    return min(chunk_size, size - index * chunk_size)


@lru_cache(maxsize=4)
def zero_checksum(length: int) -> int:
    """Checksum of `length` zero bytes: what a hole chunk contributes to the object digest, so a
    hole and written zeros give the same digest."""
    return checksum(bytes(length))


def hole_checksums(sums: np.ndarray, start: int, count: int, size: int, chunk_size: int) -> None:
    """Set the checksums of hole chunks [start, start + count) (the last chunk may be short)."""
    end = min(start + count, chunk_count(size, chunk_size))
    if end <= start:
        return
    sums[start:end] = zero_checksum(chunk_size)
    last = end - 1
    if chunk_length(last, size, chunk_size) != chunk_size:
        sums[last] = zero_checksum(chunk_length(last, size, chunk_size))


def object_digest(checksums: np.ndarray) -> bytes:
    """xxh3-128 over the little-endian u64 chunk checksums in chunk order."""
    return xxhash.xxh3_128_digest(np.ascontiguousarray(checksums, dtype="<u8").tobytes())


def file_digest(fd: int, size: int, chunk_size: int) -> bytes:
    """Re-read a file chunk by chunk (one reused buffer) and compute its object digest."""
    return object_digest(reread_checksums(fd, size, chunk_size, range(chunk_count(size, chunk_size))))


def reread_checksums(fd: int, size: int, chunk_size: int, indices: range | list[int],
                     out: np.ndarray | None = None) -> np.ndarray:
    """Checksums of the given chunks as they are in the file now (one reused buffer)."""
    sums = out if out is not None else np.zeros(chunk_count(size, chunk_size), dtype=np.uint64)
    view = memoryview(bytearray(chunk_size))
    for i in indices:
        length = chunk_length(i, size, chunk_size)
        got = os.preadv(fd, [view[:length]], i * chunk_size)
        if got != length:
            raise OSError(f"short read at chunk {i}: {got} of {length} bytes")
        sums[i] = checksum(view[:length])
    return sums
