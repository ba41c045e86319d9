"""Core data path: real agents on loopback migrating images, beside `iperf3 -P 4` in the same run.

Two agent processes (own ports and state), images and destinations on tmpfs (/dev/shm) when it
exists, because a VM's memory lands in RAM and a disk would measure the disk. Two references,
measured in the same run: `iperf3 -P 4` (the socket alone) and benchmarks/reference/filecopy.c, a
bare C program doing the verified file-to-file copy over 4 loopback streams (socket + the file read
and file write every migration makes). Cases, 4 streams each, protocol and codec varied one at a
time:
  * protocol, same codec: v1 against v3 on the random image with codec none (raw AMST, quoted
    as a ratio to iperf3 -P 4), and on the vm-mix image with lz4 (the first-cut codec);
  * codec, same protocol (v3) on the vm-mix image: none, lz4, zstd, auto (HDE's choice per chunk);
  * like for like with the C copy, which encrypts nothing: raw v1 again between agents with
    `insecure_datacenter_plaintext` (every other case runs the default TLS + AES-128-GCM frames).
Each case migrates once unmeasured first: on a VM guest, the first write to never-touched memory
costs a host page fault per page (seen here: 0.4-0.5 GB/s for fresh tmpfs pages against ~4 GB/s
for reused ones), which would measure the hypervisor rather than the agent. Then every case and
both references run RUNS times; tables give the median and min-max of the runs.

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

from benchmarks.harness import cell, spread, standalone
from dwcp_agent.client import api_call, follow
from dwcp_agent.demo import LocalAgent, free_port
from dwcp_agent.migration.images import generate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
REFERENCE = ROOT / "benchmarks" / "reference"
GiB = 1 << 30
RUNS = 3
# (name, image profile, codec, protocol, channels); agents are started once per (codec, channels)
CASES = (("random_none_v1", "random", "none", "v1", "tls"), ("random_none_v3", "random", "none", "v3", "tls"),
         ("vmmix_lz4_v1", "vm-mix", "lz4", "v1", "tls"), ("vmmix_lz4_v3", "vm-mix", "lz4", "v3", "tls"),
         ("vmmix_none_v3", "vm-mix", "none", "v3", "tls"), ("vmmix_zstd_v3", "vm-mix", "zstd", "v3", "tls"),
         ("vmmix_auto_v3", "vm-mix", "auto", "v3", "tls"),
         ("random_none_v1_plaintext", "random", "none", "v1", "plaintext"))
PROTOCOL_ROWS = ("random_none_v1", "random_none_v1_plaintext", "random_none_v3", "vmmix_lz4_v1", "vmmix_lz4_v3")
CODEC_ROWS = ("vmmix_none_v3", "vmmix_lz4_v3", "vmmix_zstd_v3", "vmmix_auto_v3")


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


def filecopy(image: Path, work: Path, streams: int, chunk: int, runs: int) -> list[float]:
    """Throughputs in bytes/s of benchmarks/reference/filecopy.c (the bare verified file-to-file
    copy over loopback TCP), compiled and measured now: `runs` runs after one warm-up."""
    binary = work / "filecopy"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(REFERENCE / "filecopy.c"), "-lxxhash", "-lpthread"],
                   check=True, capture_output=True, timeout=120)
    out = work / "filecopy-out.img"
    rates = []
    for _ in range(runs + 1):
        run = subprocess.run([str(binary), str(image), str(out), str(streams), str(chunk)], capture_output=True,
                             text=True, check=True, timeout=300)
        rates.append(float(run.stdout))
        out.unlink()
    return rates[1:]


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
    size = (256 << 20) if quick else 2 * GiB
    work = _workdir()
    psk = work / "psk"
    psk.write_text(secrets.token_hex(32))
    results: dict[str, Any] = {"image_bytes": size, "workdir": str(work), "runs": RUNS, "streams": 4}
    agents: list[LocalAgent] = []
    try:
        iperf = [iperf3(4, 3 if quick else 5) for _ in range(RUNS)]
        results["iperf3_P4"] = spread([r / 1e9 for r in iperf])
        reference = float(results["iperf3_P4"]["median"]) * 1e9
        images: dict[str, Path] = {"random": generate(work / "random.img", size, "random", seed=7),
                                   "vm-mix": generate(work / "vm-mix.img", size, "vm-mix", seed=7)}
        results["c_filecopy_4streams"] = spread([r / 1e9 for r in filecopy(images["random"], work, 4, 1 << 20, RUNS)])
        floor = float(results["c_filecopy_4streams"]["median"]) * 1e9
        for codec, channels in dict.fromkeys((c[2], c[4]) for c in CASES):
            env = {"STREAM_COUNT": "4", "COMPRESSION_ALGO": codec}
            plain = {"insecure_datacenter_plaintext": "true"} if channels == "plaintext" else {}
            source = LocalAgent(f"src-{codec}-{channels}", work, psk, env, plain)
            dest = LocalAgent(f"dst-{codec}-{channels}", work, psk, env, {"acp_port": str(free_port()), **plain})
            agents += [source, dest]
            source.wait_ready()
            dest.wait_ready()
            for name, profile, case_codec, protocol, case_channels in CASES:
                if (case_codec, case_channels) != (codec, channels):
                    continue
                image = source.images / f"{profile}.img"
                if not image.exists():
                    image.hardlink_to(images[profile])
                _migrate(source, dest, image, protocol)  # warm-up, see the module docstring
                finals = [_migrate(source, dest, image, protocol) for _ in range(RUNS)]
                rates = [size / f["duration_s"] for f in finals]
                results[name] = {"codec": codec, "protocol": protocol, "image": profile, "channels": channels,
                                 "logical_gbps": spread([r / 1e9 for r in rates]),
                                 "wire_bytes": finals[-1]["wire_bytes"],
                                 "compression_ratio": round(size / finals[-1]["wire_bytes"], 3),
                                 "ratio_to_iperf3_P4": spread([r / reference for r in rates]),
                                 "ratio_to_c_filecopy": spread([r / floor for r in rates])}
            for agent in (source, dest):
                agent.stop()
    finally:
        for agent in agents:
            agent.stop()
        shutil.rmtree(work, ignore_errors=True)
    return results


def markdown(results: dict[str, Any]) -> str:
    ref, floor = results["iperf3_P4"], results["c_filecopy_4streams"]
    head = ["| case | logical GB/s | x iperf3 -P 4 | x C file copy | wire ratio |", "|---|---|---|---|---|"]
    lines = [f"### Data path ({results['image_bytes'] >> 20} MiB images, loopback, 4 streams, median (min-max) "
             f"of {results['runs']} runs)", "",
             f"References: iperf3 -P 4 (the socket alone) {cell(ref)} GB/s; C file copy, 4 streams (socket + "
             f"file copies) {cell(floor)} GB/s. Agents encrypt (TLS + AES-128-GCM frames) except in the "
             "plaintext row, the one like for like with the C copy.", "", "Protocol, same codec:", "", *head]

    def row(name: str) -> str:
        r = results[name]
        plain = ", plaintext" if r.get("channels") == "plaintext" else ""
        return (f"| {r['image']}, {r['codec']}, {r['protocol']}{plain} | {cell(r['logical_gbps'])} | "
                f"{cell(r['ratio_to_iperf3_P4'])} | {cell(r['ratio_to_c_filecopy'])} | {r['compression_ratio']} |")

    lines += [row(n) for n in PROTOCOL_ROWS]
    lines += ["", "Codec, same protocol (v3):", "", *head]
    lines += [row(n) for n in CODEC_ROWS]
    return "\n".join(lines)


def main() -> None:
    standalone("datapath", run, __doc__, markdown)


if __name__ == "__main__":
    main()
