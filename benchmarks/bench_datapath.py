"""Core data path: real agents on loopback migrating images, beside `iperf3 -P 4` in the same run.

Two agent processes (own ports and state), images and destinations on tmpfs (/dev/shm) when it
exists, because a VM's memory lands in RAM and a disk would measure the disk. Two references,
measured in the same run: `iperf3 -P 4` (the socket alone) and benchmarks/reference/filecopy.c, a
bare C program doing the verified file-to-file copy over 4 loopback streams (socket + the file read
and file write every migration makes). Cases:
  * random image, codec none, 4 streams: raw AMST throughput, quoted as a ratio to iperf3 -P 4;
  * vm-mix image, COMPRESSION_ALGO=auto (HDE): logical throughput and wire ratio;
  * vm-mix image, protocol v1 (the first-cut encoding: zero pages + lz4), for comparison.
Each case migrates once unmeasured first: on a VM guest, the first write to never-touched memory
costs a host page fault per page (seen here: 0.4-0.5 GB/s for fresh tmpfs pages against ~4 GB/s
for reused ones), which would measure the hypervisor rather than the agent.

    .venv/bin/python -m benchmarks.bench_datapath [--quick]
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import standalone
from dwcp_agent.client import api_call, follow
from dwcp_agent.demo import LocalAgent, free_port
from dwcp_agent.migration.images import generate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
REFERENCE = ROOT / "benchmarks" / "reference"
GiB = 1 << 30


def iperf3(streams: int, seconds: int) -> float:
    """Loopback iperf3 throughput in bytes/s (receiver side), measured now."""
    port = free_port()
    server = subprocess.Popen(["iperf3", "-s", "-1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-P", str(streams), "-t", str(seconds),
                              "-J"], capture_output=True, text=True, check=True, timeout=seconds + 30)
        bits: float = json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]
        return bits / 8
    finally:
        server.kill()
        server.wait()


def filecopy(image: Path, work: Path, streams: int, chunk: int) -> float:
    """Throughput in bytes/s of benchmarks/reference/filecopy.c (the bare verified file-to-file
    copy over loopback TCP), compiled and measured now; the second of two runs (warm pages)."""
    binary = work / "filecopy"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(REFERENCE / "filecopy.c"), "-lxxhash", "-lpthread"],
                   check=True, capture_output=True, timeout=120)
    out = work / "filecopy-out.img"
    rate = 0.0
    for _ in range(2):
        run = subprocess.run([str(binary), str(image), str(out), str(streams), str(chunk)], capture_output=True,
                             text=True, check=True, timeout=300)
        rate = float(run.stdout)
        out.unlink()
    return rate


def _workdir() -> Path:
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and shutil.disk_usage(shm).free > 8 * GiB else None
    return Path(tempfile.mkdtemp(prefix="dwcp-bench-", dir=base))


def _migrate(source: LocalAgent, dest: LocalAgent, image: Path, protocol: str | None = None) -> dict[str, Any]:
    target = dest.images / "out.img"
    target.unlink(missing_ok=True)
    # a new VM id per run: a completed migration hands the VM's ownership to the destination
    body: dict[str, Any] = {"source": str(image), "to": f"127.0.0.1:{dest.data_port}", "dest_path": str(target),
                            "vm_id": f"bench-{secrets.token_hex(4)}"}
    if protocol:
        body["protocol"] = protocol
    final = follow(source.url, api_call(source.url, "POST", "/api/v3/migrations", body)["id"], show_progress=False)
    if final["state"] != "completed":
        raise RuntimeError(f"migration failed: {final.get('error')}")
    target.unlink()
    return final


def run(quick: bool) -> dict[str, Any]:
    size = (512 << 20) if quick else 2 * GiB
    work = _workdir()
    psk = work / "psk"
    psk.write_text(secrets.token_hex(32))
    results: dict[str, Any] = {"image_bytes": size, "workdir": str(work)}
    agents: list[LocalAgent] = []
    try:
        reference = iperf3(4, 3 if quick else 5)
        results["iperf3_P4_bytes_per_second"] = reference
        images: dict[str, Path] = {"random": generate(work / "random.img", size, "random", seed=7)}
        floor = filecopy(images["random"], work, 4, 1 << 20)
        results["c_filecopy_4streams_bytes_per_second"] = floor
        cases = [("random_none_4streams", "random", {"COMPRESSION_ALGO": "none"}, "v1"),
                 ("random_none_4streams_hde", "random", {"COMPRESSION_ALGO": "none"}, None),
                 ("vmmix_auto_v3", "vm-mix", {"COMPRESSION_ALGO": "auto"}, None),
                 ("vmmix_first_cut_v1", "vm-mix", {"COMPRESSION_ALGO": "lz4"}, "v1")]
        for name, profile, env, protocol in cases:
            source = LocalAgent(f"src-{name}", work, psk, {"STREAM_COUNT": "4", **env})
            dest = LocalAgent(f"dst-{name}", work, psk, {"STREAM_COUNT": "4", **env},
                              {"acp_port": str(free_port())})
            agents += [source, dest]
            if profile not in images:
                images[profile] = generate(work / f"{profile}.img", size, profile, seed=7)
            image = source.images / f"{profile}.img"
            if not image.exists():
                image.hardlink_to(images[profile])
            source.wait_ready()
            dest.wait_ready()
            _migrate(source, dest, image, protocol)  # warm-up, see the module docstring
            final = _migrate(source, dest, image, protocol)
            rate = size / final["duration_s"]
            results[name] = {"logical_bytes_per_second": rate, "wire_bytes": final["wire_bytes"],
                             "compression_ratio": size / final["wire_bytes"], "duration_s": final["duration_s"],
                             "ratio_to_iperf3_P4": rate / reference, "ratio_to_c_filecopy": rate / floor}
            for agent in (source, dest):
                agent.stop()
    finally:
        for agent in agents:
            agent.stop()
        shutil.rmtree(work, ignore_errors=True)
    return results


def markdown(results: dict[str, Any]) -> str:
    ref = results["iperf3_P4_bytes_per_second"]
    floor = results["c_filecopy_4streams_bytes_per_second"]
    lines = [f"### Data path ({results['image_bytes'] >> 20} MiB images, loopback)", "",
             "| case | logical GB/s | x iperf3 -P 4 | x C file copy | wire ratio |", "|---|---|---|---|---|",
             f"| iperf3 -P 4 (reference: the socket alone) | {ref / 1e9:.2f} | 1.00 | {ref / floor:.2f} | - |",
             f"| C file copy, 4 streams (reference: socket + file copies) | {floor / 1e9:.2f} | {floor / ref:.2f} "
             "| 1.00 | 1.00 |"]
    for name in ("random_none_4streams", "random_none_4streams_hde", "vmmix_auto_v3", "vmmix_first_cut_v1"):
        r = results[name]
        lines.append(f"| {name} | {r['logical_bytes_per_second'] / 1e9:.2f} | {r['ratio_to_iperf3_P4']:.2f} | "
                     f"{r['ratio_to_c_filecopy']:.2f} | {r['compression_ratio']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    standalone("datapath", run, __doc__, markdown)


if __name__ == "__main__":
    main()
