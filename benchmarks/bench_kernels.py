"""HDE kernels in GB/s, beside numpy equivalents and memcpy measured in the same run.

Each kernel runs over the same buffer as its reference, one thread, several runs each (at least
3); figures are the median run, with min-max in `*_runs`. Set-up a kernel needs (restoring the
page a delta is decoded into) happens outside the timed region of every run, never by
subtracting one timing from another:
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

from benchmarks.harness import cell, spread, standalone

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dwcp_agent._native import delta, pages  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PAGE = 4096


def _runs(fn: Callable[[], object], repeat: int, setup: Callable[[], object] | None = None) -> list[float]:
    """Seconds of each of `repeat` runs of fn (setup, untimed, before each)."""
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _median_of(fn: Callable[[], object], repeat: int, setup: Callable[[], object] | None = None) -> float:
    return _median(_runs(fn, repeat, setup))


def _median(times: list[float]) -> float:
    return float(spread(times, 9)["median"])


def _gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3)


def _gbps_runs(nbytes: int, times: list[float]) -> dict[str, Any]:
    return spread([nbytes / t / 1e9 for t in times], 3)


def run(quick: bool) -> dict[str, Any]:
    size = (64 if quick else 256) << 20
    repeat = 3 if quick else 7
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

    t_memcpy = _median_of(lambda: np.copyto(dst, data), repeat)
    out["memcpy_gbps"] = _gbps(size, t_memcpy)

    runs = _runs(lambda: pages.zero_page_mask(zero, mask), repeat)
    t = _median(runs)
    t_np = _median_of(lambda: ~zero.reshape(n, PAGE).any(axis=1), repeat)
    out["zero_scan"] = {"gbps": _gbps(size, t), "numpy_gbps": _gbps(size, t_np),
                        "vs_numpy": round(t_np / t, 2), "vs_memcpy": round(t_memcpy / t, 2),
                        "gbps_runs": _gbps_runs(size, runs)}

    runs = _runs(lambda: pages.page_hashes(data, mask, hashes), repeat)
    t = _median(runs)
    sub = data[: min(size, 32 << 20)]
    t_x = _median_of(lambda: [xxhash.xxh3_128_intdigest(sub[i:i + PAGE]) for i in range(0, len(sub), PAGE)], 3)
    t_x *= size / len(sub)
    out["page_hash128"] = {"gbps": _gbps(size, t), "xxh3_128_per_page_gbps": _gbps(size, t_x),
                           "vs_xxh3_per_page": round(t_x / t, 2), "vs_memcpy": round(t_memcpy / t, 2),
                           "gbps_runs": _gbps_runs(size, runs)}

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

    runs = _runs(dedupe, repeat)
    t = _median(runs)
    t_np = _median_of(dedupe_numpy, 3)
    out["dedupe_in_chunk"] = {"gbps": _gbps(size, t), "numpy_unique_gbps": _gbps(size, t_np),
                              "vs_numpy": round(t_np / t, 2), "vs_memcpy": round(t_memcpy / t, 2),
                              "gbps_runs": _gbps_runs(size, runs)}

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

    runs = _runs(encode, repeat)
    t = _median(runs)
    total, count = encode()
    assert count == n, "every page should fit a delta"

    def encode_numpy() -> None:
        for off in range(0, n, 256):
            x = new[off:off + 256] ^ old[off:off + 256]
            np.flatnonzero(x)

    t_np = _median_of(encode_numpy, repeat)
    out["xor_delta_encode"] = {"gbps": _gbps(size, t), "numpy_xor_scan_gbps": _gbps(size, t_np),
                               "vs_numpy": round(t_np / t, 2), "vs_memcpy": round(t_memcpy / t, 2),
                               "mean_delta_bytes": round(total / n, 1), "gbps_runs": _gbps_runs(size, runs)}

    streams = enc[:total]
    offsets = np.concatenate([[0], np.cumsum(lens[:n].astype(np.int64))])
    target = old.copy()
    xors = (new ^ old)

    def restore() -> None:  # the reference pages a receiver already holds: untimed set-up
        np.copyto(target, old)

    def decode() -> None:
        # assemble() applies DELTA pages against reference pages already in place
        delta.assemble(target.reshape(-1), size, kinds_d, np.zeros(0, np.uint64), lens[:n], np.zeros(0, np.uint8),
                       streams)

    runs = _runs(decode, repeat, setup=restore)
    t = _median(runs)
    restore()
    decode()
    assert np.array_equal(target, new) and offsets[-1] == total
    t_np = _median_of(lambda: np.bitwise_xor(target, xors, out=target), repeat, setup=restore)
    out["xor_delta_decode"] = {"gbps": _gbps(size, t), "numpy_xor_gbps": _gbps(size, t_np),
                               "vs_numpy": round(t_np / t, 2), "vs_memcpy": round(t_memcpy / t, 2),
                               "gbps_runs": _gbps_runs(size, runs)}
    return out


KERNELS = (("zero_scan", "zero-page scan", "numpy_gbps", "numpy any()"),
           ("page_hash128", "page hashes (128 bit)", "xxh3_128_per_page_gbps", "xxh3_128 per page"),
           ("dedupe_in_chunk", "in-chunk dedupe", "numpy_unique_gbps", "numpy unique"),
           ("xor_delta_encode", "XOR delta encode", "numpy_xor_scan_gbps", "numpy xor + flatnonzero"),
           ("xor_delta_decode", "XOR delta decode", "numpy_xor_gbps", "numpy xor in place"))


def markdown(result: dict[str, Any]) -> str:
    rows = [f"### Kernels ({result['bytes'] >> 20} MiB, one thread; median (min-max) of the runs; "
            f"memcpy {result['memcpy_gbps']} GB/s)", "",
            "| kernel | GB/s | reference | reference GB/s | x reference |", "|---|---:|---|---:|---:|"]
    for key, label, ref_key, ref_label in KERNELS:
        k = result[key]
        ratio = k.get("vs_numpy", k.get("vs_xxh3_per_page"))
        rows.append(f"| {label} | {cell(k['gbps_runs'])} | {ref_label} | {k[ref_key]} | {ratio} |")
    return "\n".join(rows)


def main() -> None:
    standalone("kernels", run, __doc__, markdown)


if __name__ == "__main__":
    main()
