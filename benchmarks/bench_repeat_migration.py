"""Repeat migration: wire bytes of a second migration of a 1 GiB vm-mix image with 5 % of its
pages changed, against the first migration of the same image, when the destination offers its
copy of the first image as a baseline (have-list).

Both migrations are timed the same way, end to end in process: the HDE encoder over 1 MiB
chunks with the same codec, each chunk acknowledged at once, decoded into the destination image
(the first against nothing, the second against the baseline file through FilePages) and checked
byte for byte. The repeat's time is also given with the receiver's have-list hashing included.
Each runs RUNS times (median and min-max). Reported: wire bytes of each, their ratio, the
have-list's size on the wire, and how long the receiver takes to compute it.

    .venv/bin/python -m benchmarks.bench_repeat_migration [--quick]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import cell, spread, standalone

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dwcp_agent.hde.baseline import FilePages, HaveList, have_list  # noqa: E402
from dwcp_agent.hde.chunk import ChunkDecoder, ChunkEncoder  # noqa: E402
from dwcp_agent.hde.codecs import codec_by_name  # noqa: E402
from dwcp_agent.migration.images import generate  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PAGE = 4096
CHUNK = 1 << 20
MiB = 1 << 20
RUNS = 3


def _migrate(image: np.ndarray, encoder: ChunkEncoder, baseline: FilePages | None) -> tuple[int, float]:
    """Encode every chunk (acknowledged at once), decode it into the destination image, verify it."""
    wire = 0
    dest = np.zeros_like(image)  # touched before timing (first-touch page faults are not the codec's)

    def read_page(offset: int, length: int) -> memoryview:
        return dest.data[offset: offset + length]

    decoder = ChunkDecoder(read_page=read_page, read_baseline=baseline)
    start = time.perf_counter()
    for off in range(0, len(image), CHUNK):
        data = image[off:off + CHUNK]
        enc = encoder.encode(memoryview(data), off)
        encoder.acked(off, enc.raw_len, enc.checksum)
        wire += enc.payload_len
        decoder.decode(enc.codec, enc.flags, enc.payload, enc.raw_len, memoryview(dest[off: off + enc.raw_len]))
        if not np.array_equal(dest[off: off + enc.raw_len], data):
            raise AssertionError(f"chunk at {off} decodes differently")
    return wire, time.perf_counter() - start


def run(quick: bool, changed: float = 0.05) -> dict[str, Any]:
    size = (128 if quick else 1024) * MiB
    out: dict[str, Any] = {"bytes": size, "changed_pages": changed, "runs": RUNS}
    rng = np.random.default_rng(11)
    with tempfile.TemporaryDirectory(prefix="bench-repeat-") as tmpdir:
        base_path = generate(Path(tmpdir) / "vm.img", size, "vm-mix", seed=3)
        image = np.fromfile(base_path, dtype=np.uint8)
        have_runs = []
        for _ in range(RUNS):
            start = time.perf_counter()
            have = have_list(base_path)
            have_runs.append(time.perf_counter() - start)
        have_s = float(spread(have_runs, 6)["median"])
        blob = have.to_bytes()
        out["have_list"] = {"wire_bytes": len(blob), "hash_gbps": spread([size / t / 1e9 for t in have_runs])}
        second = image.copy().reshape(-1, PAGE)
        pages = rng.choice(len(second), int(changed * len(second)), replace=False)
        # a changed page: a dirty stretch of 256 bytes rewritten, as a guest writing a structure
        for p in pages:
            start_byte = int(rng.integers(0, PAGE - 256))
            second[p, start_byte:start_byte + 256] = rng.integers(0, 256, 256, dtype=np.uint8)
        second = second.reshape(-1)
        for codec in ("lz4", "zstd"):
            first_runs, repeat_runs = [], []
            for _ in range(RUNS):
                first_wire, first_s = _migrate(image, ChunkEncoder(codec_by_name(codec)), None)
                encoder = ChunkEncoder(codec_by_name(codec))
                encoder.set_peer_have_list(HaveList.from_bytes(blob))
                with FilePages(base_path) as reader:
                    repeat_wire, repeat_s = _migrate(second, encoder, reader)
                first_runs.append(first_s)
                repeat_runs.append(repeat_s)
            out[codec] = {
                "first_wire_bytes": first_wire, "repeat_wire_bytes": repeat_wire,
                "repeat_vs_first": round(repeat_wire / first_wire, 4),
                "repeat_with_have_list_vs_first": round((repeat_wire + len(blob)) / first_wire, 4),
                "first_gbps": spread([size / t / 1e9 for t in first_runs]),
                "repeat_gbps": spread([size / t / 1e9 for t in repeat_runs]),
                "repeat_with_have_list_hashing_gbps": spread([size / (t + have_s) / 1e9 for t in repeat_runs]),
                "pages": encoder.stats.pages,
            }
    return out


def markdown(result: dict[str, Any]) -> str:
    have = result["have_list"]
    rows = [f"### Repeat migration ({result['bytes'] >> 20} MiB vm-mix, {result['changed_pages']:.0%} of pages "
            f"changed; median (min-max) of {result['runs']} runs, both migrations timed end to end)", "",
            f"Have-list: {have['wire_bytes']} bytes on the wire, hashed at {cell(have['hash_gbps'])} GB/s.", "",
            "| codec | repeat wire / first | with have-list | first GB/s | repeat GB/s | repeat GB/s incl. hashing |",
            "|---|---:|---:|---:|---:|---:|"]
    for codec in ("lz4", "zstd"):
        r = result[codec]
        rows.append(f"| {codec} | {r['repeat_vs_first']:.2%} | {r['repeat_with_have_list_vs_first']:.2%} | "
                    f"{cell(r['first_gbps'])} | {cell(r['repeat_gbps'])} | "
                    f"{cell(r['repeat_with_have_list_hashing_gbps'])} |")
    return "\n".join(rows)


def main() -> None:
    standalone("repeat_migration", run, __doc__, markdown)


if __name__ == "__main__":
    main()
