"""HDE end to end in process: encode + decode of whole images, beside the zstd -1 / lz4 CLIs.

Two images: the vm-mix synthetic VM image (dwcp_agent.migration.images) and an image of real
files (this machine's Python standard library and shared libraries, concatenated and padded to
whole pages). For each, in the same run:
  * memcpy of the image (numpy), the ceiling of any in-memory pipeline;
  * `zstd -1` and `lz4` (default level) command-line tools on the image file: ratio and speed;
  * the first-cut encoder (git 8457109: zero pages + one codec) with lz4, when git has it;
  * HDE: codec chosen per chunk for a 10 Gbit/s and a 1 Gbit/s link, then forced zstd -1, lz4
    and none.
HDE encodes 1 MiB chunks on a pool of one thread per core (as the sender does), each chunk
acknowledged as soon as it is encoded (a receiver that keeps up), and decodes them on one thread
in order; throughputs are logical bytes per second of wall time.

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

import numpy as np

from benchmarks.harness import standalone

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


def cli(tool: list[str], image: Path, tmp: Path) -> dict[str, float]:
    """Compress `image` with a CLI tool to a file: ratio and GB/s (single-threaded tools)."""
    target = tmp / "cli.out"
    start = time.perf_counter()
    subprocess.run([*tool, "-q", "-f", "-c", str(image)], stdout=target.open("wb"), check=True)
    seconds = time.perf_counter() - start
    size = image.stat().st_size
    ratio = size / target.stat().st_size
    target.unlink()
    return {"ratio": round(ratio, 3), "gbps": round(size / seconds / 1e9, 3)}


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


def measure_image(image_path: Path, tmp: Path, threads: int) -> dict[str, Any]:
    image = np.fromfile(image_path, dtype=np.uint8)
    size = len(image)
    res: dict[str, Any] = {"bytes": size, "threads": threads}
    dst = np.empty_like(image)
    t = min(_timed(lambda: np.copyto(dst, image)) for _ in range(3))
    res["memcpy_gbps"] = round(size / t / 1e9, 3)
    res["zstd_cli_1"] = cli(["zstd", "-1", "-T1"], image_path, tmp)
    res["lz4_cli"] = cli(["lz4", "-1"], image_path, tmp)
    first_cut = _load_first_cut()
    if first_cut is not None:
        from dwcp_agent.hde.codecs import codec_by_name
        enc = first_cut.ChunkEncoder(codec_by_name("lz4"))
        seconds, chunks, _ = _pipeline(image, lambda v, o: enc.encode(v), threads)
        wire = sum(len(c.payload) for c in chunks)  # that version's chunks have one contiguous payload
        res["first_cut_lz4"] = {"encode_gbps": round(size / seconds / 1e9, 3), "ratio": round(size / wire, 3)}
    for name, algo, link in (("hde_auto_10gbe", "auto", 1.25e9), ("hde_auto_1gbe", "auto", 1.25e8),
                             ("hde_zstd1", "zstd", 0.0), ("hde_lz4", "lz4", 0.0), ("hde_none", "none", 0.0)):
        encoder = make_encoder(Config(compression_algo=algo, zstd_level=1), link=link, threads=threads)
        encoder.encode(memoryview(image[:CHUNK]), None)   # warm the selector's host profile
        encoder = make_encoder(Config(compression_algo=algo, zstd_level=1), link=link, threads=threads)
        seconds, chunks, order = _pipeline(image, encoder.encode, threads)
        wire = sum(c.payload_len for c in chunks)
        dec = _decode_all(image, chunks, order)
        res[name] = {"encode_gbps": round(size / seconds / 1e9, 3), "decode_gbps": round(size / dec / 1e9, 3),
                     "ratio": round(size / wire, 3), "pages": encoder.stats.pages,
                     "codec_chunks": encoder.stats.codec_chunks}
    z, h = res["zstd_cli_1"], res["hde_auto_10gbe"]
    res["vs"] = {
        "hde_auto_1gbe_ratio_vs_zstd1": round(res["hde_auto_1gbe"]["ratio"] / z["ratio"], 3),
        "hde_auto_1gbe_speed_vs_zstd1": round(res["hde_auto_1gbe"]["encode_gbps"] / z["gbps"], 2),
        "hde_auto_ratio_vs_zstd1": round(h["ratio"] / z["ratio"], 3),
        "hde_auto_speed_vs_zstd1": round(h["encode_gbps"] / z["gbps"], 2),
        "hde_zstd1_ratio_vs_zstd1": round(res["hde_zstd1"]["ratio"] / z["ratio"], 3),
        "hde_zstd1_speed_vs_zstd1": round(res["hde_zstd1"]["encode_gbps"] / z["gbps"], 2),
        "hde_lz4_ratio_vs_lz4": round(res["hde_lz4"]["ratio"] / res["lz4_cli"]["ratio"], 3),
        "hde_lz4_speed_vs_lz4": round(res["hde_lz4"]["encode_gbps"] / res["lz4_cli"]["gbps"], 2),
        "hde_auto_speed_vs_memcpy": round(h["encode_gbps"] / res["memcpy_gbps"], 3),
    }
    if "first_cut_lz4" in res:
        res["vs"]["hde_lz4_speed_vs_first_cut"] = round(res["hde_lz4"]["encode_gbps"]
                                                        / res["first_cut_lz4"]["encode_gbps"], 2)
    return res


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(quick: bool) -> dict[str, Any]:
    threads = os.cpu_count() or 1
    size = (256 if quick else 1024) * MiB
    out: dict[str, Any] = {"chunk_bytes": CHUNK}
    with tempfile.TemporaryDirectory(prefix="bench-hde-") as tmpdir:
        tmp = Path(tmpdir)
        vm = generate(tmp / "vm-mix.img", size, "vm-mix", seed=1)
        out["vm_mix"] = measure_image(vm, tmp, threads)
        vm.unlink()
        files = real_files_image(tmp / "real-files.img", (128 if quick else 512) * MiB)
        out["real_files"] = measure_image(files, tmp, threads)
    return out


def main() -> None:
    standalone("hde", run, __doc__)


if __name__ == "__main__":
    main()
