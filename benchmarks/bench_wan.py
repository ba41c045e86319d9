"""AMST on an emulated WAN: a real migration between two agents beside iperf3 on the same path.

For each profile (tools/wanbed.py) and congestion control, in one bed and one run: iperf3 with
one stream, -P 8 and -P 16, then `dwcp-agent migrate` of an incompressible image (codec none, so
logical bytes = wire bytes) with STREAM_COUNT=0, i.e. streams chosen online by the tuner.
Ratios are against iperf3 measured minutes apart on the same namespaces, never across runs.

    .venv/bin/python -m benchmarks.bench_wan [--quick] [--profile internet] [--cc cubic]
JSON goes to benchmarks/results/bench_wan.json.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import wanbed  # noqa: E402

from dwcp_agent.migration.images import generate  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MiB = 1024 * 1024
# Image per profile: about 20-40 s of transfer at what the path allows a good sender.
IMAGE_BYTES = {"datacenter": 2048 * MiB, "metro": 2048 * MiB, "internet": 1024 * MiB, "bad-internet": 192 * MiB}
STREAM_LOG = re.compile(r"streams (\d+) -> (\d+)")


def iperf3(bed: wanbed.WanBed, streams: int, cc: str, seconds: int) -> dict[str, float]:
    """Goodput (receiver side) of `iperf3 -P streams -C cc` from a to b, in Mbit/s."""
    done = bed.run("a", ["iperf3", "-c", wanbed.ADDR_B, "-J", "-t", str(seconds), "-O", "2", "-P", str(streams),
                         "-C", cc], timeout=seconds + 60)
    report = json.loads(done.stdout)["end"]
    return {"mbit": report["sum_received"]["bits_per_second"] / 1e6,
            "retransmits": float(report["sum_sent"].get("retransmits", 0))}


def amst(bed: wanbed.WanBed, root: Path, psk: Path, image: Path, cc: str, streams: int = 0) -> dict[str, Any]:
    """Migrate `image` from an agent in a to one in b (streams 0 = tuner on); goodput and stream trace."""
    env = {"STREAM_COUNT": str(streams), "COMPRESSION_ALGO": "none", "DWCP_TCP_CONGESTION": cc}
    tag = secrets.token_hex(2)
    src = wanbed.BedAgent(bed, "a", root / f"src-{tag}", psk, env)
    dst = wanbed.BedAgent(bed, "b", root / f"dst-{tag}", psk, env)
    try:
        src.wait_ready()
        dst.wait_ready()
        staged = src.images / image.name
        if not staged.exists():
            staged.hardlink_to(image)
        record = src.migrate(staged, dst, dst.images / "vm.img")
    finally:
        src.stop()
        dst.stop()
    log_text = src.log_path.read_text(errors="replace")
    changes = [(int(a), int(b)) for a, b in STREAM_LOG.findall(log_text)]
    reasons = [json.loads(line)["msg"] for line in log_text.splitlines() if '"streams ' in line]
    shutil.rmtree(dst.images, ignore_errors=True)
    duration = float(record["duration_s"])
    return {
        "mbit": record["total_bytes"] * 8 / duration / 1e6 if duration else 0.0,
        "duration_s": duration,
        "bytes": record["total_bytes"],
        "state": record["state"],
        "stream_changes": changes,
        "tuner_log": reasons,
        "max_streams": max([b for _, b in changes] + [record.get("streams_configured", 0)]),
        "final_streams": changes[-1][1] if changes else record.get("streams_configured", 0),
    }


def bench_profile(profile: str, ccs: list[str], quick: bool, work: Path) -> dict[str, Any]:
    seconds = 8 if quick else 15
    size = IMAGE_BYTES[profile] // (2 if quick and profile != "bad-internet" else 1)
    image = generate(work / f"random-{size}.img", size, "random", seed=7) if not (
        work / f"random-{size}.img").exists() else work / f"random-{size}.img"
    psk = work / "psk"
    psk.write_text(secrets.token_hex(16))
    out: dict[str, Any] = {}
    with wanbed.WanBed(profile) as bed:
        bed.popen("b", ["iperf3", "-s"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        for cc in ccs:
            row: dict[str, Any] = {}
            for n in (1, 8, 16):
                row[f"iperf3_P{n}"] = iperf3(bed, n, cc, seconds)
            row["amst"] = amst(bed, work, psk, image, cc)
            best = max(row["iperf3_P8"]["mbit"], row["iperf3_P16"]["mbit"])
            row["ratio_vs_best_iperf3_P8_P16"] = row["amst"]["mbit"] / best if best else 0.0
            single = row["iperf3_P1"]["mbit"]
            row["ratio_vs_one_stream"] = row["amst"]["mbit"] / single if single else 0.0
            out[cc] = row
            print(f"{profile:13s} {cc:6s} amst {row['amst']['mbit']:8.1f} Mbit/s "
                  f"(max {row['amst']['max_streams']} streams)  iperf3 P1 {single:8.1f}  "
                  f"P8 {row['iperf3_P8']['mbit']:8.1f}  P16 {row['iperf3_P16']['mbit']:8.1f}  "
                  f"-> {row['ratio_vs_best_iperf3_P8_P16']:.2f}x best P8/P16, "
                  f"{row['ratio_vs_one_stream']:.1f}x one stream", flush=True)
    return out


def run(quick: bool, profiles: list[str] | None = None, ccs: list[str] | None = None) -> dict[str, Any]:
    """Entry point for benchmarks/run_all.py: every profile with CUBIC and BBR (quick: internet only)."""
    reason = wanbed.unsupported_reason()
    if reason:
        return {"skipped": reason}
    if shutil.which("iperf3") is None:
        return {"skipped": "iperf3 is not installed"}
    profiles = profiles or (["internet"] if quick else list(wanbed.PROFILES))
    ccs = ccs or ["cubic", "bbr"]
    work = Path("/dev/shm") / f"dwcp-bench-wan-{secrets.token_hex(3)}"
    work.mkdir(parents=True)
    results: dict[str, Any] = {"quick": quick, "profiles": {}}
    try:
        for profile in profiles:
            results["profiles"][profile] = bench_profile(profile, ccs, quick, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    inet = results["profiles"].get("internet", {}).get("cubic")
    if inet:
        results["acceptance_internet_cubic"] = {
            "amst_vs_best_iperf3": inet["ratio_vs_best_iperf3_P8_P16"],
            "amst_vs_one_stream": inet["ratio_vs_one_stream"],
            "pass": inet["ratio_vs_best_iperf3_P8_P16"] >= 0.85 and inet["ratio_vs_one_stream"] >= 10,
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_wan.json").write_text(json.dumps(results, indent=1))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--profile", action="append", choices=list(wanbed.PROFILES))
    parser.add_argument("--cc", action="append", choices=["cubic", "bbr"])
    args = parser.parse_args()
    result = run(args.quick, args.profile, args.cc)
    print(json.dumps(result.get("acceptance_internet_cubic", result.get("skipped", "")), indent=1))


if __name__ == "__main__":
    main()
