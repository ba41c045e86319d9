"""HDE kernels in GB/s, beside numpy equivalents and memcpy measured in the same run.

Each kernel runs over the same buffer as its reference, best of several repeats, one thread:
  zero scan            vs numpy `not buf.reshape(pages, 4096).any(axis=1)` and memcpy
  page hashes (128b)   vs xxhash xxh3_128 per page and memcpy
  in-chunk dedupe      (hash + table + byte confirmation) vs numpy np.unique over page rows
  XOR delta encode     vs numpy `new ^ old` + `np.flatnonzero` (the XOR and run scan alone)
  XOR delta decode     vs numpy `page ^= xor` (in place)
Delta pages have 1 % of their bytes changed in short runs, as a page re-sent in a pre-copy round.

    .venv/bin/python -m benchmarks.bench_kernels [--quick]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from benchmarks.harness import standalone

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dwcp_agent._native import delta, pages  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PAGE = 4096


def _best(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3)


def run(quick: bool) -> dict[str, Any]:
    size = (64 if quick else 256) << 20
    repeat = 3 if quick else 5
    n = size // PAGE
    rng = np.random.default_rng(1)
    zero = np.zeros(size, np.uint8)
    data = rng.integers(0, 256, size, dtype=np.uint8)
    dst = np.empty_like(data)
    mask = np.empty(n, np.uint8)
    hashes = np.empty((n, 2), np.uint64)
    kinds = np.empty(n, np.uint8)
    refs = np.empty(n, np.uint64)
    out: dict[str, Any] = {"bytes": size, "threads": 1}

    t_memcpy = _best(lambda: np.copyto(dst, data), repeat)
    out["memcpy_gbps"] = _gbps(size, t_memcpy)

    t = _best(lambda: pages.zero_page_mask(zero, mask), repeat)
    t_np = _best(lambda: ~zero.reshape(n, PAGE).any(axis=1), repeat)
    out["zero_scan"] = {"gbps": _gbps(size, t), "numpy_gbps": _gbps(size, t_np),
                        "vs_numpy": round(t_np / t, 2), "vs_memcpy": round(t_memcpy / t, 2)}

    t = _best(lambda: pages.page_hashes(data, mask, hashes), repeat)
    sub = data[: min(size, 32 << 20)]
    t_x = _best(lambda: [xxhash.xxh3_128_intdigest(sub[i:i + PAGE]) for i in range(0, len(sub), PAGE)], 2)
    t_x *= size / len(sub)
    out["page_hash128"] = {"gbps": _gbps(size, t), "xxh3_128_per_page_gbps": _gbps(size, t_x),
                           "vs_xxh3_per_page": round(t_x / t, 2), "vs_memcpy": round(t_memcpy / t, 2)}

    # dedupe on a chunk stream where a third of the pages repeat
    dup_src = data.reshape(n, PAGE).copy()
    dup_src[rng.integers(0, n, n // 3)] = dup_src[rng.integers(0, n, n // 3)]
    dup_flat = dup_src.reshape(-1)
    chunk = 256 * PAGE

    def dedupe() -> None:
        for off in range(0, size, chunk):
            c = dup_flat[off:off + chunk]
            k = chunk // PAGE
            pages.page_hashes(c, mask[:k], hashes[:k])
            pages.dedupe_in_chunk(c, mask[:k], hashes[:k], kinds[:k], refs[:k])

    def dedupe_numpy() -> None:
        for off in range(0, size, chunk):
            rows = dup_flat[off:off + chunk].reshape(-1, PAGE)
            np.unique(rows.view(np.dtype((np.void, PAGE))), return_index=True)

    t = _best(dedupe, repeat)
    t_np = _best(dedupe_numpy, 2)
    out["dedupe_in_chunk"] = {"gbps": _gbps(size, t), "numpy_unique_gbps": _gbps(size, t_np),
                              "vs_numpy": round(t_np / t, 2), "vs_memcpy": round(t_memcpy / t, 2)}

    # XOR delta: whole pages, 1 % of bytes changed in runs of 1..8
    old = data.reshape(n, PAGE)
    new = old.copy()
    for _ in range(PAGE // 100 // 4):
        cols = rng.integers(0, PAGE - 8, n)
        for j in range(4):
            new[np.arange(n), cols + j] ^= 0x3C
    cache = old
    kinds_d = np.full(n, 6, np.uint8)
    slots = np.arange(n, dtype=np.int64)
    enc = np.empty(n * 256, np.uint8)
    lens = np.empty(n, np.uint16)
    new_flat = new.reshape(-1)

    def encode() -> tuple[int, int]:
        kinds_d[:] = 6
        return delta.encode_deltas(new_flat, cache, kinds_d, slots, enc, lens, 2048)

    t = _best(encode, repeat)
    total, count = encode()
    assert count == n, "every page should fit a delta"

    def encode_numpy() -> None:
        for off in range(0, n, 256):
            x = new[off:off + 256] ^ old[off:off + 256]
            np.flatnonzero(x)

    t_np = _best(encode_numpy, repeat)
    out["xor_delta_encode"] = {"gbps": _gbps(size, t), "numpy_xor_scan_gbps": _gbps(size, t_np),
                               "vs_numpy": round(t_np / t, 2), "vs_memcpy": round(t_memcpy / t, 2),
                               "mean_delta_bytes": round(total / n, 1)}

    streams = enc[:total]
    offsets = np.concatenate([[0], np.cumsum(lens[:n].astype(np.int64))])
    target = old.copy()
    xors = (new ^ old)

    def decode() -> None:
        np.copyto(target, old)
        # assemble() applies DELTA pages against reference pages already in place
        delta.assemble(target.reshape(-1), size, kinds_d, np.zeros(0, np.uint64), lens[:n], np.zeros(0, np.uint8),
                       streams)

    def decode_copy_only() -> None:
        np.copyto(target, old)

    t = _best(decode, repeat) - _best(decode_copy_only, repeat)
    decode()
    assert np.array_equal(target, new) and offsets[-1] == total
    t_np = _best(lambda: np.bitwise_xor(target, xors, out=target), repeat)
    out["xor_delta_decode"] = {"gbps": _gbps(size, t), "numpy_xor_gbps": _gbps(size, t_np),
                               "vs_numpy": round(t_np / t, 2), "vs_memcpy": round(t_memcpy / t, 2)}
    return out


def main() -> None:
    standalone("kernels", run, __doc__)


if __name__ == "__main__":
    main()
