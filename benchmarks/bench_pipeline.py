"""Per-core throughput of each side of the data path alone, before and after a change, in one run.

Source pipeline: the real SendSession (read -> HDE encode -> frame -> socket) pinned to one core,
into a destination on the other core that acknowledges and discards. Destination pipeline: the
real DataServer (receive -> verify -> decode -> write -> journal -> digest) pinned to one core,
fed frames recorded beforehand by a feeder on the other core. Cases: random and vm-mix images,
codecs none / lz4 / zstd. Beside them, per core: the bare C file copy
(benchmarks/reference/filecopy.c) with both of its ends on one core, and with each end on its own
core (the per-side reference: bytes per CPU second of its sender and of its receiver), and memcpy.

"before" is a `git worktree` of DWCP_PIPELINE_BASELINE (default 73d0f58, the tree before the
migration-core refactor) with its own kernels built; "after" is this tree. The same worker script
(benchmarks/pipeline_worker.py) runs against both through PYTHONPATH.

    .venv/bin/python -m benchmarks.bench_pipeline [--quick] [--case IMAGE/CODEC[/SIDE] ...]
        [--size-mib N] [--repeats N] [--rounds N] [--baseline-tree PATH] [--dir PATH]

`--case` keeps only the named cases (e.g. `vm-mix/zstd/dest`); `--rounds N` measures each case
N times, before and after alternating, and reports the medians and the paired (same-round)
ratios; `--baseline-tree` reuses a tree of the baseline with its kernels built instead of making
one; `--dir` puts the images and outputs on another file system (default tmpfs, /dev/shm).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "pipeline_worker.py"
REFERENCE = Path(__file__).resolve().parent / "reference"
BASELINE = os.environ.get("DWCP_PIPELINE_BASELINE", "73d0f58")
CODECS = ("none", "lz4", "zstd")
IMAGES = ("random", "vm-mix")
CHUNK = 1 << 20


def _cpus() -> tuple[int, int]:
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[0], cpus[-1]


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    return env


def _worker(tree: Path, role: str, args: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    out = subprocess.run([sys.executable, str(WORKER), role, json.dumps(args)], env=_env(tree), cwd=tree,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"{role} failed: {out.stderr.strip()[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _server(tree: Path, role: str, args: dict[str, Any]) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, str(WORKER), role, json.dumps(args)], env=_env(tree), cwd=tree,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip():
        proc.kill()
        raise RuntimeError(f"{role} did not start: {proc.communicate(timeout=10)[1][-2000:]}")
    return proc, int(line)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads (/proc/<pid>/stat utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(tree: Path, work: Path, image: Path, codec: str, side: str, repeats: int) -> tuple[float, float]:
    """Bytes per second of one side of the pipeline on one core, and its CPU seconds per GiB
    (the measure that holds on a loaded machine: time other processes held the core is not in it)."""
    near, far = _cpus()
    common = {"work": str(work), "codec": codec, "chunk": CHUNK, "image": str(image), "repeats": repeats}
    if side == "source":
        server, port = _server(tree, "sink", dict(common, cpu=far))
        role = "source"
        args = dict(common, cpu=near, port=port)
    else:
        server, port = _server(tree, "dest", dict(common, cpu=near))
        role = "feeder"
        args = dict(common, cpu=far, port=port)
    try:
        server_cpu = _cpu_seconds(server.pid)
        out = _worker(tree, role, args)
        if side == "source":  # the source's own measure around SendSession.run (best of the repeats)
            cpu = float(out.get("cpu_seconds", float("nan")))
        else:  # the destination server served `repeats` migrations of the image
            cpu = (_cpu_seconds(server.pid) - server_cpu) / repeats
        return float(out["bytes_per_second"]), cpu / (image.stat().st_size / (1 << 30))
    finally:
        server.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):  # a loaded disk can hold a killed writer
            server.communicate(timeout=60)
        for written in (work / "dst").glob("out*.img"):  # the feeder's images, once nothing holds them
            written.unlink(missing_ok=True)
        # Every measurement starts with no dirty pages or pending discards of the one before: their
        # writeback would land in whichever version runs next.
        os.sync()


def paired(before: list[tuple[float, float]], after: list[tuple[float, float]]) -> dict[str, Any]:
    """Each round's after/before rate, measured back to back: this host's speed drifts by a third
    over minutes (the same case, same code, 3.0 then 4.5 CPU s/GiB), which moves both versions of
    a round alike but can put one version's median in a slow stretch. The median of the paired
    ratios, and in how many rounds after >= before."""
    ratios = [a_rate / b_rate for (b_rate, _), (a_rate, _) in zip(before, after, strict=True)]
    return {"paired_after_over_before": statistics.median(ratios),
            "rounds_after_at_least_before": sum(ratio >= 1 for ratio in ratios), "rounds": len(ratios)}


def baseline_tree(work: Path) -> Path:
    """A worktree of the baseline commit with its native kernels built."""
    tree = work / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), BASELINE], check=True,
                   capture_output=True, timeout=120)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, check=True,
                   capture_output=True, timeout=1800)
    return tree


def c_filecopy_references(image: Path, work: Path) -> dict[str, float]:
    """The bare verified file copy (benchmarks/reference/filecopy.c, one stream, plaintext, same
    chunk size), two ways: both ends on one core (bytes per second), and each end pinned to its
    own core, as each side of the agent is measured here (bytes per CPU second of that side: the
    least a sender that reads, hashes and sends, or a receiver that receives, checks and writes,
    can cost on this host and file system)."""
    binary = work / "filecopy"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(REFERENCE / "filecopy.c"), "-lxxhash", "-lpthread",
                    "-lIPSec_MB"], check=True, capture_output=True, timeout=120)
    near, far = _cpus()
    copy = [str(binary), str(image), str(work / "filecopy.out"), "1", str(CHUNK)]
    one_core, send_cpu, recv_cpu = [], [], []
    for _ in range(3):
        out = subprocess.run(copy, capture_output=True, text=True, check=True, timeout=600,
                             preexec_fn=lambda: os.sched_setaffinity(0, {near}))
        one_core.append(float(out.stdout.split()[0]))
        split = subprocess.run([copy[0], "--pin", f"{near},{far}", *copy[1:]], capture_output=True, text=True,
                               check=True, timeout=600).stdout.split()
        send_cpu.append(float(split[1]))
        recv_cpu.append(float(split[2]))
    (work / "filecopy.out").unlink(missing_ok=True)
    size = image.stat().st_size
    return {"c_filecopy_one_core_bytes_per_second": max(one_core),
            "c_filecopy_source_side_bytes_per_cpu_second": size / statistics.median(send_cpu),
            "c_filecopy_dest_side_bytes_per_cpu_second": size / statistics.median(recv_cpu)}


def memcpy_one_core(size: int = 256 << 20) -> float:
    code = f"""
import os, time, numpy as np
os.sched_setaffinity(0, {{{_cpus()[0]}}})
a = np.ones({size}, dtype=np.uint8); b = np.empty_like(a); best = 0.0
for _ in range(5):
    t = time.perf_counter(); np.copyto(b, a); best = max(best, {size} / (time.perf_counter() - t))
print(best)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return float(out.stdout.strip())


def selected(cases: list[str]) -> list[tuple[str, str, str]]:
    """(image, codec, side) triples named by --case patterns (IMAGE/CODEC[/SIDE]); all when none."""
    every = [(image, codec, side) for image in IMAGES for codec in CODECS for side in ("source", "dest")]
    if not cases:
        return every
    keep = []
    for triple in every:
        if any(tuple(pattern.split("/")) == triple[:len(pattern.split("/"))] for pattern in cases):
            keep.append(triple)
    if not keep:
        raise SystemExit(f"no case matches {cases}: cases are IMAGE/CODEC[/SIDE] with IMAGE in {IMAGES}, "
                         f"CODEC in {CODECS}, SIDE source or dest")
    return keep


def _default_dir(image_bytes: int) -> Path | None:
    """tmpfs when it has room, as bench_datapath: a VM's memory lands in RAM, and on a disk the
    destination's figure is the disk's writeback as much as the pipeline (on this VM's ext4, three
    cases carrying the very same frames read 0.91-1.18x of each other in one run)."""
    shm = Path("/dev/shm")
    room = 12 * image_bytes  # both images, the destination's outputs, C copy, and slack
    return shm if shm.is_dir() and shutil.disk_usage(shm).free > room else None


def run(quick: bool, cases: list[str] | None = None, size_mib: int | None = None, repeats: int | None = None,
        rounds: int = 1, baseline: Path | None = None, directory: Path | None = None) -> dict[str, Any]:
    from dwcp_agent.migration.images import generate

    size = (size_mib or (64 if quick else 512)) << 20
    repeats = repeats or (1 if quick else 3)
    chosen = selected(cases or [])
    work = Path(tempfile.mkdtemp(prefix=f"dwcp-pipeline-{os.getpid()}-", dir=directory or _default_dir(size)))
    results: dict[str, Any] = {"image_bytes": size, "chunk_bytes": CHUNK, "baseline": BASELINE, "rounds": rounds,
                               "directory": str(work.parent), "cases": []}
    trees: dict[str, Path] = {"after": ROOT}
    made_baseline = False
    try:
        images = {name: generate(work / f"{name}.img", size, name, seed=7)
                  for name in IMAGES if any(image == name for image, _, _ in chosen)}
        results.update(c_filecopy_references(next(iter(images.values())), work))
        results["memcpy_one_core_bytes_per_second"] = memcpy_one_core()
        if baseline is not None:
            trees["before"] = baseline
        else:
            try:
                trees["before"] = baseline_tree(work)
                made_baseline = True
            except (subprocess.SubprocessError, OSError) as exc:
                results["baseline_error"] = f"no baseline tree for {BASELINE}: {exc}"
        for image_name, codec, side in chosen:
            row: dict[str, Any] = {"image": image_name, "codec": codec, "side": side}
            samples: dict[str, list[tuple[float, float]]] = {label: [] for label in trees}
            for turn in range(rounds):  # alternate which version goes first
                order = list(trees.items()) if turn % 2 == 0 else list(reversed(trees.items()))
                for label, tree in order:
                    samples[label].append(measure(tree, work, images[image_name], codec, side, repeats))
            for label, got in samples.items():
                row[f"{label}_bytes_per_second"] = statistics.median(rate for rate, _ in got)
                row[f"{label}_cpu_s_per_gib"] = statistics.median(cpu for _, cpu in got)
                if rounds > 1:
                    row[f"{label}_samples"] = got
            if "before_bytes_per_second" in row:
                row["after_over_before"] = row["after_bytes_per_second"] / row["before_bytes_per_second"]
                row["cpu_before_over_after"] = row["before_cpu_s_per_gib"] / row["after_cpu_s_per_gib"]
                row.update(paired(samples["before"], samples["after"]))
            results["cases"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        results["load_average"] = os.getloadavg()
    finally:
        if made_baseline:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(trees["before"])],
                           capture_output=True, timeout=120)
        shutil.rmtree(work, ignore_errors=True)
    return results


def markdown(results: dict[str, Any]) -> str:
    copy = results["c_filecopy_one_core_bytes_per_second"] / 1e9
    mem = results["memcpy_one_core_bytes_per_second"] / 1e9
    c_source = results.get("c_filecopy_source_side_bytes_per_cpu_second", float("nan")) / 1e9
    c_dest = results.get("c_filecopy_dest_side_bytes_per_cpu_second", float("nan")) / 1e9
    lines = [f"### Per-core pipeline throughput (GB/s per core; C file copy {copy:.2f}, memcpy {mem:.2f}; "
             f"files in {results.get('directory', '?')})", "",
             f"C file copy per side, GB per CPU second: sender (read, xxh3, send) {c_source:.2f}, "
             f"receiver (recv, xxh3 check, write) {c_dest:.2f}.", "",
             f"Median of {results.get('rounds', 1)} alternating round(s); load average "
             f"{' '.join(f'{x:.2f}' for x in results.get('load_average', ()))}.", "",
             "| image | codec | side | before | after | after/before | paired after/before (rounds >= 1) "
             "| CPU s/GiB before | CPU s/GiB after |",
             "|---|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for r in results["cases"]:
        before = r.get("before_bytes_per_second")
        lines.append(f"| {r['image']} | {r['codec']} | {r['side']} | "
                     f"{before / 1e9 if before else nan:.2f} | {r['after_bytes_per_second'] / 1e9:.2f} | "
                     f"{r.get('after_over_before', nan):.2f} | {r.get('paired_after_over_before', nan):.2f} "
                     f"({r.get('rounds_after_at_least_before', '-')}/{r.get('rounds', '-')}) | "
                     f"{r.get('before_cpu_s_per_gib', nan):.3f} | "
                     f"{r.get('after_cpu_s_per_gib', nan):.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB images, one repeat")
    parser.add_argument("--case", action="append", default=[], help="IMAGE/CODEC[/SIDE]; repeatable")
    parser.add_argument("--size-mib", type=int, help="image size (default 512, 64 with --quick)")
    parser.add_argument("--repeats", type=int, help="migrations per measurement (default 3, 1 with --quick)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating before/after measurements per case")
    parser.add_argument("--baseline-tree", type=Path, help="an existing baseline tree with its kernels built")
    parser.add_argument("--dir", type=Path, help="where images and outputs go (default /dev/shm when it has room)")
    args = parser.parse_args()
    result = run(args.quick, args.case, args.size_mib, args.repeats, args.rounds, args.baseline_tree, args.dir)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.json").write_text(json.dumps(result, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()
