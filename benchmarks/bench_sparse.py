"""Sparse images: the same data in images of growing logical size, against the tools people use.

The data (4 GiB of vm-mix pages in 1 GiB regions; --quick: 256 MiB in 64 MiB regions) is laid
out in sparse raw images of 4, 64 and 1024 GiB logical size (--quick: 0.25, 4, 64 GiB), regions
spread evenly with holes between. Files go to /dev/shm when it has room (DWCP_BENCH_DIR
overrides); the full run takes about 10 minutes. Each image is copied, in the same run, by:
  * dwcp: source and destination agents' data paths in two processes, over loopback, verified;
    in plaintext, like the rsync daemon (bench_crypto measures what channel encryption costs);
  * `qemu-img convert -O raw` and `cp --sparse=always` to a local path (no network);
  * `rsync --sparse` to an rsync daemon on loopback (it reads and sends the holes; stopped at a
    120 s cap, 60 s with --quick).
Reported per tool and size: wall time (median of the runs), peak RSS of each process (ru_maxrss
from wait4), and bytes on the wire (dwcp frames; rsync's own byte counts). The targets (issue 16):
dwcp time at 1024 GiB <= 1.2 x at 4 GiB, faster than rsync at every size, RSS <= 512 MiB.

    .venv/bin/python -m benchmarks.bench_sparse [--quick]
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import standalone

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dwcp_agent.migration.images import generate  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
PSK = "bench-sparse-key-0123456789abcdef0123"

RECEIVER = r"""
import sys
from dwcp_agent.config import load_config
from dwcp_agent.migration.server import DataServer
from dwcp_agent.telemetry.metrics import Metrics
dest, state, psk = sys.argv[1:4]
config = load_config(environ={}, overrides={"psk": psk, "data_port": 0, "listen_host": "127.0.0.1",
                                           "state_dir": state, "dest_dirs": [dest], "node_id": "bench-dst",
                                           "insecure_datacenter_plaintext": True})
server = DataServer(config, Metrics(), psk.encode())
server.start()
print(server.port, flush=True)
sys.stdin.readline()
server.stop(5.0)
"""

SENDER = r"""
import json, sys, time
from pathlib import Path
from dwcp_agent.config import load_config
from dwcp_agent.migration.model import MigrationRequest
from dwcp_agent.migration.sender import SendSession
from dwcp_agent.telemetry.metrics import Metrics
source, dest, port, state, psk = sys.argv[1:6]
config = load_config(environ={}, overrides={"psk": psk, "state_dir": state, "source_dirs": [str(Path(source).parent)],
                                           "node_id": "bench-src",
                                           "insecure_datacenter_plaintext": True})
request = MigrationRequest("bench-" + str(time.time_ns()), "vm-bench", Path(source), "127.0.0.1", int(port), dest)
started = time.perf_counter()
result = SendSession(config, Metrics(), psk.encode(), request).run()
print(json.dumps({"seconds": time.perf_counter() - started, "wire_bytes": result.wire_bytes,
                  "digest": result.digest.hex()}), flush=True)
"""


def _hwm(pid: int) -> int:
    """The process's peak RSS so far (VmHWM; 0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _wait(proc: subprocess.Popen[Any], timeout: float) -> tuple[int, int]:
    """(exit status, peak RSS bytes) of a child, killing it past `timeout`. The peak is VmHWM,
    polled: wait4's ru_maxrss would count the parent's pages the child had before its exec."""
    deadline = time.monotonic() + timeout
    peak = 0
    while True:
        peak = max(peak, _hwm(proc.pid))
        pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, peak
        if time.monotonic() > deadline:
            proc.kill()
        time.sleep(0.02)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def dwcp(image: Path, work: Path) -> dict[str, Any]:
    dest_dir = work / "dst"
    dest_dir.mkdir(exist_ok=True)
    dest = dest_dir / image.name
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(dest_dir), str(work / "state-r"), PSK],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert receiver.stdout is not None and receiver.stdin is not None
        port = receiver.stdout.readline().strip()
        log = work / "sender.log"
        with open(log, "w+") as output:  # a file, not a pipe: nothing blocks while we wait4
            sender = subprocess.Popen([sys.executable, "-c", SENDER, str(image), str(dest), port,
                                       str(work / "state-s"), PSK], stdout=output, stderr=subprocess.STDOUT,
                                      text=True, env=_env())
            status, sender_rss = _wait(sender, 1800)
        out = log.read_text()
        if status != 0:
            raise RuntimeError(f"dwcp sender failed: {out[-1000:]}")
        receiver.stdin.write("\n")
        receiver.stdin.flush()
        _, receiver_rss = _wait(receiver, 60)
    finally:
        if receiver.poll() is None:
            receiver.kill()
    result = json.loads(out.strip().splitlines()[-1])
    _check_same(image, dest)
    dest.unlink()
    return {"seconds": result["seconds"], "wire_bytes": result["wire_bytes"],
            "peak_rss_source": sender_rss, "peak_rss_destination": receiver_rss}


def _timed(cmd: list[str], timeout: float) -> tuple[float, int, str, bool]:
    """(seconds, peak RSS, stdout, finished) of one command."""
    with tempfile.TemporaryFile("w+") as output:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, text=True)
        status, rss = _wait(proc, timeout)
        seconds = time.perf_counter() - started
        output.seek(0)
        out = output.read()
    finished = status == 0
    if status != 0 and seconds < timeout:
        raise RuntimeError(f"{cmd[0]} failed ({status}): {out[-500:]}")
    return seconds, rss, out, finished


def local_copy(tool: str, image: Path, work: Path, timeout: float) -> dict[str, Any]:
    dest = work / f"{tool}.img"
    cmd = (["qemu-img", "convert", "-O", "raw", "-f", "raw", str(image), str(dest)] if tool == "qemu-img"
           else ["cp", "--sparse=always", str(image), str(dest)])
    seconds, rss, _, finished = _timed(cmd, timeout)
    if finished:
        _check_same(image, dest)
    dest.unlink(missing_ok=True)
    return {"seconds": seconds, "wire_bytes": 0, "peak_rss": rss, "finished": finished}


@contextlib.contextmanager
def rsync_daemon(work: Path) -> Any:
    """An rsync daemon on a free loopback port, serving `work/rsync-dst` as module `dst`."""
    target = work / "rsync-dst"
    target.mkdir(exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = work / "rsyncd.conf"
    conf.write_text(f"use chroot = no\npid file = {work}/rsyncd.pid\n[dst]\npath = {target}\nread only = no\n"
                    "uid = root\ngid = root\n")
    daemon = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}", "--address=127.0.0.1",
                               f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.05)
        yield port, target
    finally:
        daemon.kill()
        daemon.wait()


def rsync(image: Path, port: int, target: Path, timeout: float) -> dict[str, Any]:
    seconds, rss, out, finished = _timed(["rsync", "--sparse", "--stats", str(image),
                                          f"rsync://127.0.0.1:{port}/dst/"], timeout)
    sent = re.search(r"Total bytes sent: ([\d,]+)", out)
    received = re.search(r"Total bytes received: ([\d,]+)", out)
    wire = sum(int(m.group(1).replace(",", "")) for m in (sent, received) if m)
    if finished:
        _check_same(image, target / image.name)
    for leftover in target.iterdir():
        leftover.unlink()
    return {"seconds": seconds, "wire_bytes": wire if finished else None, "peak_rss": rss, "finished": finished}


def _check_same(a: Path, b: Path) -> None:
    """Byte equality over the data extents of both files (holes compare as zeros)."""
    if a.stat().st_size != b.stat().st_size:
        raise AssertionError(f"{b} has size {b.stat().st_size}, expected {a.stat().st_size}")
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for x, y in ((fa.fileno(), fb.fileno()), (fb.fileno(), fa.fileno())):
            pos, size = 0, a.stat().st_size
            while pos < size:
                try:
                    start = os.lseek(x, pos, os.SEEK_DATA)
                except OSError:
                    break
                end = os.lseek(x, start, os.SEEK_HOLE)
                for off in range(start, end, 16 * MiB):
                    n = min(16 * MiB, end - off)
                    if os.pread(x, n, off) != os.pread(y, n, off):
                        raise AssertionError(f"{b} differs from {a} at {off}")
                pos = end


def _layout(image: Path, regions: list[Path], logical: int) -> None:
    """A sparse image of `logical` bytes holding the regions spread evenly (holes between)."""
    region_size = regions[0].stat().st_size
    stride = logical // len(regions)
    with open(image, "wb") as out:
        out.truncate(logical)
        for i, region in enumerate(regions):
            offset = i * stride + (stride - region_size) // 2
            with open(region, "rb") as src:
                done = 0
                while done < region_size:
                    done += os.copy_file_range(src.fileno(), out.fileno(), region_size - done, done, offset + done)


def budget_cost(regions: list[Path], logical: int, budgets: list[int]) -> dict[str, Any]:
    """HDE ratio (data bytes / payload bytes) of the regions encoded at their offsets in the
    largest image, with the index held to each budget (chunks acknowledged as they are sent)."""
    from dwcp_agent.hde.chunk import ChunkEncoder
    from dwcp_agent.hde.codecs import codec_by_name

    region_size = regions[0].stat().st_size
    stride = logical // len(regions)
    out: dict[str, Any] = {}
    chunk = MiB
    buf = bytearray(chunk)
    for budget in budgets:
        encoder = ChunkEncoder(codec_by_name("lz4"), index_budget_bytes=budget)
        payload = 0
        for i, region in enumerate(regions):
            base = i * stride + (stride - region_size) // 2
            with open(region, "rb", buffering=0) as f:
                for off in range(0, region_size, chunk):
                    n = f.readinto(buf)
                    enc = encoder.encode(memoryview(buf)[:n], base + off)
                    encoder.acked(base + off, enc.raw_len, enc.checksum)
                    payload += enc.payload_len
        out[str(budget)] = {"ratio": round(len(regions) * region_size / max(payload, 1), 3),
                            "evicted_blocks": encoder._index.evictions}
    return out


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k in runs[0] if isinstance(runs[0][k], int | float) and not isinstance(runs[0][k], bool)]
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in keys}
    out.update({k: max(r[k] for r in runs) for k in keys if k.startswith("peak_rss")})
    out.update({k: v for k, v in runs[0].items() if k not in out})
    out["runs"] = len(runs)
    return out


def run(quick: bool) -> dict[str, Any]:
    region_size = 64 * MiB if quick else GiB
    n_regions = 4
    sizes = [n_regions * region_size, 4 * GiB, 64 * GiB] if quick else [4 * GiB, 64 * GiB, 1024 * GiB]
    repeats = 1 if quick else 3
    # rsync reads and sends every zero of the holes: at 64 and 1024 GiB it would run for many
    # minutes, so it is stopped at the cap (reported as such) and the full run stays ~10 minutes.
    rsync_cap = 60.0 if quick else 120.0
    base = Path(os.environ.get("DWCP_BENCH_DIR", "") or _work_base(3 * n_regions * region_size + 2 * GiB))
    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f"bench-sparse-{os.getpid()}-", dir=base))
    results: dict[str, Any] = {"data_bytes": n_regions * region_size, "region_bytes": region_size, "sizes": {},
                               "repeats": repeats, "rsync_cap_s": rsync_cap}
    try:
        regions = [generate(work / f"region{i}.raw", region_size, "vm-mix", seed=i) for i in range(n_regions)]
        with rsync_daemon(work) as (port, target):
            warm = work / "src" / "warm-up.img"
            warm.parent.mkdir(exist_ok=True)
            _layout(warm, regions[:1], regions[0].stat().st_size)
            dwcp(warm, work)  # not measured: first-run costs (imports, page cache) go here
            warm.unlink()
            for logical in sizes:
                image = work / "src" / f"sparse-{logical // GiB if logical >= GiB else logical / GiB}g.img"
                image.parent.mkdir(exist_ok=True)
                _layout(image, regions, logical)
                row: dict[str, Any] = {}
                row["dwcp"] = _median([dwcp(image, work) for _ in range(repeats)])
                for tool in ("qemu-img", "cp"):
                    row[tool] = _median([local_copy(tool, image, work, rsync_cap) for _ in range(repeats)])
                row["rsync"] = rsync(image, port, target, rsync_cap)
                results["sizes"][str(logical)] = row
                print(f"{logical / GiB:g} GiB: " + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in row.items()),
                      file=sys.stderr, flush=True)
                image.unlink()
        budgets = [16 * MiB, 64 * MiB, 256 * MiB]
        results["index_budget_ratio"] = budget_cost(regions, sizes[-1], budgets)
        results["index_budget_ratio_same_region_x4"] = budget_cost([regions[0]] * n_regions, sizes[-1], budgets)
        by_size = results["sizes"]
        first, last = by_size[str(sizes[0])]["dwcp"]["seconds"], by_size[str(sizes[-1])]["dwcp"]["seconds"]
        results["dwcp_time_ratio_largest_to_smallest"] = round(last / first, 3)
        results["dwcp_faster_than_rsync_everywhere"] = all(
            row["dwcp"]["seconds"] < row["rsync"]["seconds"] for row in by_size.values())
        results["dwcp_peak_rss_max"] = max(max(row["dwcp"]["peak_rss_source"], row["dwcp"]["peak_rss_destination"])
                                           for row in by_size.values())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["work_dir"] = str(base)
    results["elapsed_s"] = round(time.perf_counter() - began, 1)
    return results


def _work_base(needed: int) -> str:
    """tmpfs when it has room for the regions, one image and one copy (the images are sparse, so
    the copies cost their data only), so the disk's speed is not what gets measured."""
    shm = Path("/dev/shm")
    if shm.is_dir():
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize >= needed:
            return str(shm)
    return tempfile.gettempdir()


def markdown(results: dict[str, Any]) -> str:
    lines = [f"### sparse ({results['data_bytes'] / GiB:g} GiB of data, median of {results['repeats']})", "",
             "| logical | tool | time s | peak RSS MiB (src / dst) | wire MiB |", "|---|---|---|---|---|"]
    for logical, row in results["sizes"].items():
        for tool, r in row.items():
            rss = (f"{r['peak_rss_source'] / MiB:.0f} / {r['peak_rss_destination'] / MiB:.0f}" if tool == "dwcp"
                   else f"{r['peak_rss'] / MiB:.0f}")
            wire = "local" if tool in ("qemu-img", "cp") else (
                f"{r['wire_bytes'] / MiB:.0f}" if r.get("wire_bytes") is not None else "-")
            done = "" if r.get("finished", True) else f" (stopped at the {results['rsync_cap_s']:.0f} s cap)"
            lines.append(f"| {int(logical) / GiB:g} GiB | {tool} | {r['seconds']:.1f}{done} | {rss} | {wire} |")
    lines += ["", f"run: {results.get('elapsed_s', 0):.0f} s in {results.get('work_dir', '?')}",
              "", f"dwcp time, largest / smallest image: {results['dwcp_time_ratio_largest_to_smallest']} "
              "(target <= 1.2); faster than rsync at every size: "
              f"{results['dwcp_faster_than_rsync_everywhere']}; dwcp peak RSS max "
              f"{results['dwcp_peak_rss_max'] / MiB:.0f} MiB (target <= 512)", "",
              *(f"HDE ratio by index_budget_bytes ({what}): " + ", ".join(
                  f"{int(b) / MiB:.0f} MiB: {r['ratio']} ({r['evicted_blocks']} blocks evicted)"
                  for b, r in results[key].items())
                for key, what in (("index_budget_ratio", "distinct regions"),
                                  ("index_budget_ratio_same_region_x4", "one region four times")))]
    return "\n".join(lines)


def main() -> None:
    standalone("sparse", run, __doc__, markdown)


if __name__ == "__main__":
    main()
