"""HDE end to end in process, beside zstd and lz4 through their Python bindings, like for like.

Two images: the vm-mix synthetic VM image (dwcp_agent.migration.images) and an image of real
files (this machine's Python standard library and shared libraries, concatenated and padded to
whole pages). Every contender works on the same in-memory buffer: no process start, no file
I/O on either side. For each image and for 1 thread and for every core:
  * memcpy of the image (numpy), the ceiling of any in-memory pipeline;
  * references: `zstd -1` and lz4 (block, default mode; HDE's lz4 codec) through the zstandard
    and lz4 bindings, compressing the same 1 MiB chunks on a pool of the same number of threads
    (both bindings release the GIL), and zstd -1 with zstd's own workers (`-T<n>`) over the
    whole image as one stream;
  * HDE: codec chosen per chunk for a 10 Gbit/s and a 1 Gbit/s link, then forced zstd -1, lz4
    and none, encoding 1 MiB chunks on a pool of the same number of threads (as the sender
    does), each chunk acknowledged as soon as it is encoded (a receiver that keeps up);
  * the first-cut encoder (git 8457109: zero pages + one codec) with lz4, when git has it.
Decoding runs on one thread on both sides (HDE decodes in order into one image, as a receiver).
Every configuration runs RUNS times; tables give the median and min-max of the runs.
Throughputs are logical (raw) bytes per second of wall time.

    .venv/bin/python -m benchmarks.bench_hde [--quick]
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lz4.block
import numpy as np
import zstandard

from benchmarks.harness import cell, spread, standalone

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dwcp_agent.config import Config  # noqa: E402
from dwcp_agent.hde.chunk import ChunkDecoder, EncodedChunk, make_encoder  # noqa: E402
from dwcp_agent.migration.images import generate  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PAGE = 4096
CHUNK = 1 << 20
MiB = 1 << 20
FIRST_CUT = "8457109"
RUNS = 3
HDE_CASES = (("hde_auto_10gbe", "auto", 1.25e9), ("hde_auto_1gbe", "auto", 1.25e8),
             ("hde_zstd1", "zstd", 0.0), ("hde_lz4", "lz4", 0.0), ("hde_none", "none", 0.0))


def real_files_image(path: Path, size: int) -> Path:
    """Python stdlib sources and shared libraries of this machine, concatenated to `size` bytes."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib")]
    written = 0
    with open(path, "wb") as out:
        for root in roots:
            for file in sorted(root.rglob("*")):
                if written >= size:
                    break
                if not file.is_file() or file.is_symlink() or not (file.suffix == ".py" or ".so" in file.name):
                    continue
                try:
                    data = file.read_bytes()[: size - written]
                except OSError:
                    continue
                out.write(data)
                written += len(data)
        out.write(bytes((-written) % PAGE))
    return path


def _load_first_cut() -> Any | None:
    try:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{FIRST_CUT}:dwcp_agent/hde/chunk.py"],
                                capture_output=True, check=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    spec = importlib.util.spec_from_loader("first_cut_chunk", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["first_cut_chunk"] = module
    exec(compile(source, "first_cut_chunk.py", "exec"), module.__dict__)
    return module


def _pipeline(image: np.ndarray, encode: Callable[[memoryview, int], EncodedChunk],
              threads: int) -> tuple[float, list[EncodedChunk]]:
    offsets = range(0, len(image), CHUNK)
    acked = getattr(getattr(encode, "__self__", None), "acked", None)

    done: list[int] = []
    lock = threading.Lock()

    def one(o: int) -> EncodedChunk:
        chunk = encode(memoryview(image[o:o + CHUNK]), o)
        with lock:
            done.append(o // CHUNK)
            if acked is not None:
                acked(o, chunk.raw_len, chunk.checksum)   # a receiver that acknowledges at once
        return chunk

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        chunks = list(pool.map(one, offsets))
    return time.perf_counter() - start, chunks, done


def _decode_all(image: np.ndarray, chunks: list[EncodedChunk], order: list[int]) -> float:
    """Decode every chunk into one image in acknowledgement order, so every page a chunk
    references is in place, as at a receiver; references read that image."""
    out = np.empty_like(image)
    out.fill(0)  # touched before timing: on a VM guest the first touch of fresh memory costs a fault per page

    def read_page(offset: int, length: int) -> memoryview:
        return out.data[offset: offset + length]

    decoder = ChunkDecoder(read_page=read_page)

    def one(i: int) -> None:
        c = chunks[i]
        decoder.decode(c.codec, c.flags, c.payload, c.raw_len, memoryview(out[i * CHUNK: i * CHUNK + c.raw_len]))

    start = time.perf_counter()
    for i in order:
        one(i)
    seconds = time.perf_counter() - start
    if not np.array_equal(out, image):
        raise AssertionError("decoded image differs")
    return seconds


def _chunk_reference(image: np.ndarray, threads: int, compress: Callable[[bytes | memoryview], bytes],
                     decompress: Callable[[bytes, int], bytes]) -> tuple[float, float, int]:
    """(encode s, decode s, wire bytes) of a binding compressing the same 1 MiB chunks on `threads` threads."""
    offsets = range(0, len(image), CHUNK)
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        packed = list(pool.map(lambda o: compress(memoryview(image[o:o + CHUNK])), offsets))
    encode_s = time.perf_counter() - start
    out = np.empty_like(image)
    start = time.perf_counter()
    for o, blob in zip(offsets, packed, strict=True):
        out[o:o + CHUNK] = np.frombuffer(decompress(blob, min(CHUNK, len(image) - o)), np.uint8)
    decode_s = time.perf_counter() - start
    if not np.array_equal(out, image):
        raise AssertionError("reference round trip differs")
    return encode_s, decode_s, sum(len(b) for b in packed)


def _zstd_chunks(image: np.ndarray, threads: int) -> tuple[float, float, int]:
    local = threading.local()

    def compress(data: bytes | memoryview) -> bytes:
        if not hasattr(local, "c"):
            local.c = zstandard.ZstdCompressor(level=1)
        return bytes(local.c.compress(data))

    decompressor = zstandard.ZstdDecompressor()
    return _chunk_reference(image, threads, compress, lambda b, n: decompressor.decompress(b, max_output_size=n))


def _lz4_chunks(image: np.ndarray, threads: int) -> tuple[float, float, int]:
    return _chunk_reference(image, threads, lambda d: lz4.block.compress(d, store_size=False),
                            lambda b, n: lz4.block.decompress(b, uncompressed_size=n))


def _zstd_stream(image: np.ndarray, threads: int) -> tuple[float, float, int]:
    """zstd -1 -T<threads> over the whole image as one frame (zstd's own worker threads)."""
    compressor = zstandard.ZstdCompressor(level=1, threads=threads if threads > 1 else 0)
    start = time.perf_counter()
    packed = compressor.compress(image.data)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    out = zstandard.ZstdDecompressor().decompress(packed, max_output_size=len(image))
    decode_s = time.perf_counter() - start
    if not np.array_equal(np.frombuffer(out, np.uint8), image):
        raise AssertionError("zstd stream round trip differs")
    return encode_s, decode_s, len(packed)


REFERENCES: dict[str, Callable[[np.ndarray, int], tuple[float, float, int]]] = {
    "zstd1_chunks": _zstd_chunks, "lz4_chunks": _lz4_chunks, "zstd1_stream": _zstd_stream}


def _hde(image: np.ndarray, algo: str, link: float, threads: int) -> tuple[float, float, int, dict[str, Any]]:
    """(encode s, decode s, wire bytes, stats) of one HDE run on `threads` encode threads."""
    warm = make_encoder(Config(compression_algo=algo, zstd_level=1), link=link, threads=threads)
    warm.encode(memoryview(image[:CHUNK]), None)   # warm the selector's host profile
    encoder = make_encoder(Config(compression_algo=algo, zstd_level=1), link=link, threads=threads)
    seconds, chunks, order = _pipeline(image, encoder.encode, threads)
    dec = _decode_all(image, chunks, order)
    return seconds, dec, sum(c.payload_len for c in chunks), {"pages": encoder.stats.pages,
                                                               "codec_chunks": encoder.stats.codec_chunks}


def _entry(size: int, runs: list[tuple[float, float, int]]) -> dict[str, Any]:
    return {"encode_gbps": spread([size / r[0] / 1e9 for r in runs]),
            "decode_gbps": spread([size / r[1] / 1e9 for r in runs]),
            "ratio": round(size / runs[0][2], 3)}


def measure_image(image_path: Path, thread_counts: tuple[int, ...], runs: int) -> dict[str, Any]:
    image = np.fromfile(image_path, dtype=np.uint8)
    size = len(image)
    res: dict[str, Any] = {"bytes": size, "thread_counts": list(thread_counts), "runs": runs}
    dst = np.empty_like(image)
    res["memcpy_gbps"] = spread([size / _timed(lambda: np.copyto(dst, image)) / 1e9 for _ in range(runs)])
    first_cut = _load_first_cut()
    for threads in thread_counts:
        at: dict[str, Any] = {}
        for name, reference in REFERENCES.items():
            at[name] = _entry(size, [reference(image, threads) for _ in range(runs)])
        for name, algo, link in HDE_CASES:
            samples = [_hde(image, algo, link, threads) for _ in range(runs)]
            at[name] = {**_entry(size, [s[:3] for s in samples]), **samples[-1][3]}
        if first_cut is not None:
            from dwcp_agent.hde.codecs import codec_by_name
            timings = []
            for _ in range(runs):
                enc = first_cut.ChunkEncoder(codec_by_name("lz4"))
                seconds, chunks, _ = _pipeline(image, lambda v, o, enc=enc: enc.encode(v), threads)
                timings.append(seconds)
            wire = sum(len(c.payload) for c in chunks)  # that version's chunks have one contiguous payload
            at["first_cut_lz4"] = {"encode_gbps": spread([size / t / 1e9 for t in timings]),
                                   "ratio": round(size / wire, 3)}

        def med(name: str, key: str = "encode_gbps", at: dict[str, Any] = at) -> float:
            return float(at[name][key]["median"])

        at["vs"] = {  # medians, each against the reference on the same thread count
            "hde_zstd1_speed_vs_zstd1_chunks": round(med("hde_zstd1") / med("zstd1_chunks"), 2),
            "hde_zstd1_speed_vs_zstd1_stream": round(med("hde_zstd1") / med("zstd1_stream"), 2),
            "hde_zstd1_ratio_vs_zstd1_chunks": round(at["hde_zstd1"]["ratio"] / at["zstd1_chunks"]["ratio"], 3),
            "hde_lz4_speed_vs_lz4_chunks": round(med("hde_lz4") / med("lz4_chunks"), 2),
            "hde_lz4_ratio_vs_lz4_chunks": round(at["hde_lz4"]["ratio"] / at["lz4_chunks"]["ratio"], 3),
            "hde_auto_1gbe_speed_vs_zstd1_chunks": round(med("hde_auto_1gbe") / med("zstd1_chunks"), 2),
            "hde_auto_1gbe_ratio_vs_zstd1_chunks": round(at["hde_auto_1gbe"]["ratio"] / at["zstd1_chunks"]["ratio"],
                                                         3),
            "hde_auto_10gbe_speed_vs_lz4_chunks": round(med("hde_auto_10gbe") / med("lz4_chunks"), 2),
            "hde_zstd1_decode_vs_zstd1_chunks": round(med("hde_zstd1", "decode_gbps")
                                                      / med("zstd1_chunks", "decode_gbps"), 2),
        }
        if "first_cut_lz4" in at:
            at["vs"]["hde_lz4_speed_vs_first_cut"] = round(med("hde_lz4") / med("first_cut_lz4"), 2)
        res[f"threads_{threads}"] = at
    return res


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(quick: bool) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    thread_counts = (1, cores) if cores > 1 else (1,)
    size = (64 if quick else 1024) * MiB
    out: dict[str, Any] = {"chunk_bytes": CHUNK, "cores": cores, "runs": RUNS}
    with tempfile.TemporaryDirectory(prefix="bench-hde-") as tmpdir:
        tmp = Path(tmpdir)
        vm = generate(tmp / "vm-mix.img", size, "vm-mix", seed=1)
        out["vm_mix"] = measure_image(vm, thread_counts, RUNS)
        vm.unlink()
        files = real_files_image(tmp / "real-files.img", (64 if quick else 512) * MiB)
        out["real_files"] = measure_image(files, thread_counts, RUNS)
    return out


ROWS = (("zstd1_chunks", "zstd -1 (binding, 1 MiB chunks)"), ("zstd1_stream", "zstd -1 -T<n> (binding, one stream)"),
        ("lz4_chunks", "lz4 (binding, 1 MiB chunks)"), ("hde_zstd1", "HDE zstd -1"), ("hde_lz4", "HDE lz4"),
        ("hde_auto_1gbe", "HDE auto, 1 GbE link"), ("hde_auto_10gbe", "HDE auto, 10 GbE link"),
        ("hde_none", "HDE none"), ("first_cut_lz4", "first-cut encoder, lz4"))


def markdown(result: dict[str, Any]) -> str:
    """Per image: encode GB/s at 1 thread and all cores, wire ratio, 1-thread decode GB/s."""
    parts = []
    for image in ("vm_mix", "real_files"):
        r = result[image]
        counts = r["thread_counts"]
        head = " | ".join(f"encode GB/s, {t} thread{'s' if t > 1 else ''}" for t in counts)
        parts += [f"### HDE vs zstd/lz4, {image} ({r['bytes'] >> 20} MiB, median (min-max) of {r['runs']} runs; "
                  f"memcpy {cell(r['memcpy_gbps'])} GB/s)", "",
                  f"| encoder | {head} | wire ratio | decode GB/s (1 thread) |",
                  "|---|" + "---:|" * (len(counts) + 2)]
        for key, label in ROWS:
            entries = [r[f"threads_{t}"].get(key) for t in counts]
            if not all(entries):
                continue
            decode = entries[0].get("decode_gbps")
            parts.append(f"| {label} | " + " | ".join(cell(e["encode_gbps"]) for e in entries)
                         + f" | {entries[0]['ratio']} | {cell(decode) if decode else '-'} |")
        parts.append("")
    return "\n".join(parts)


def main() -> None:
    standalone("hde", run, __doc__, markdown)


if __name__ == "__main__":
    main()
