"""Core data path: real agents on loopback migrating images, beside `iperf3 -P 4` in the same run.

Two agent processes (own ports and state), images and destinations on tmpfs (/dev/shm) when it
exists, because a VM's memory lands in RAM and a disk would measure the disk. References,
measured in the same run: `iperf3 -P 4` (the socket alone) and benchmarks/reference/filecopy.c, a
bare C program doing the verified file-to-file copy over 4 loopback streams (socket + the file read
and file write every migration makes), run two ways:
  * plain (xxh3 per chunk, destination only ftruncate'd): the reference for the plaintext agent
    row, which does the same work;
  * `--seal --reserve` (each chunk also AES-128-GCM sealed with intel-ipsec-mb, the agent's cipher
    library, one key per stream, opened and tag-checked before the write; the destination
    posix_fallocate'd before the receivers start, as the agent reserves the image's space before it
    answers Start): the reference for every other row, since agents seal their streams by default
    (TLS + AES-128-GCM frames) and reserve space, and a plain copy would count those guarantees as
    agent overhead.
Each row's "x C copy" column is its ratio to its like-for-like reference (JSON
`ratio_to_like_for_like_c_copy`, with `like_for_like_reference` naming it); `ratio_to_c_filecopy`
stays the ratio to the plain copy for every row. Cases, 4 streams each, protocol and codec varied
one at a time:
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


# filecopy.c variants: JSON key -> its options (see the module docstring for which row uses which)
C_PLAIN = "c_filecopy_4streams"
C_SEALED = "c_filecopy_sealed_reserved_4streams"
C_VARIANTS = {C_PLAIN: (), C_SEALED: ("--seal", "--reserve")}


def filecopy(image: Path, work: Path, streams: int, chunk: int, runs: int) -> dict[str, list[float]]:
    """Throughputs in bytes/s of benchmarks/reference/filecopy.c (the bare verified file-to-file
    copy over loopback TCP), per variant of C_VARIANTS, compiled and measured now: `runs` runs
    after one warm-up, the variants alternating so that load drifts hit both alike."""
    binary = work / "filecopy"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(REFERENCE / "filecopy.c"), "-lxxhash", "-lpthread",
                    "-lIPSec_MB"], check=True, capture_output=True, timeout=120)
    out = work / "filecopy-out.img"
    rates: dict[str, list[float]] = {name: [] for name in C_VARIANTS}
    for _ in range(runs + 1):
        for name, options in C_VARIANTS.items():
            run = subprocess.run([str(binary), *options, str(image), str(out), str(streams), str(chunk)],
                                 capture_output=True, text=True, check=True, timeout=300)
            rates[name].append(float(run.stdout))
            out.unlink()
    return {name: r[1:] for name, r in rates.items()}


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
        for variant, c_rates in filecopy(images["random"], work, 4, 1 << 20, RUNS).items():
            results[variant] = spread([r / 1e9 for r in c_rates])
        floor = float(results[C_PLAIN]["median"]) * 1e9
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
                like = C_PLAIN if channels == "plaintext" else C_SEALED
                like_rate = float(results[like]["median"]) * 1e9
                results[name] = {"codec": codec, "protocol": protocol, "image": profile, "channels": channels,
                                 "logical_gbps": spread([r / 1e9 for r in rates]),
                                 "wire_bytes": finals[-1]["wire_bytes"],
                                 "compression_ratio": round(size / finals[-1]["wire_bytes"], 3),
                                 "ratio_to_iperf3_P4": spread([r / reference for r in rates]),
                                 "ratio_to_c_filecopy": spread([r / floor for r in rates]),
                                 "like_for_like_reference": like,
                                 "ratio_to_like_for_like_c_copy": spread([r / like_rate for r in rates])}
            for agent in (source, dest):
                agent.stop()
    finally:
        for agent in agents:
            agent.stop()
        shutil.rmtree(work, ignore_errors=True)
    return results


def markdown(results: dict[str, Any]) -> str:
    ref, floor, sealed = results["iperf3_P4"], results[C_PLAIN], results[C_SEALED]
    head = ["| case | logical GB/s | x iperf3 -P 4 | x C copy, like for like | wire ratio |", "|---|---|---|---|---|"]
    lines = [f"### Data path ({results['image_bytes'] >> 20} MiB images, loopback, 4 streams, median (min-max) "
             f"of {results['runs']} runs)", "",
             f"References: iperf3 -P 4 (the socket alone) {cell(ref)} GB/s; C file copy, 4 streams (socket + "
             f"file copies): plain {cell(floor)} GB/s, sealed (AES-128-GCM, intel-ipsec-mb) + reserved "
             f"(posix_fallocate) {cell(sealed)} GB/s. Agents seal (TLS + AES-128-GCM frames) and reserve "
             "except in the plaintext row: that row is quoted against the plain C copy, every other row "
             "against the sealed + reserved one.", "", "Protocol, same codec:", "", *head]

    def row(name: str) -> str:
        r = results[name]
        plain = ", plaintext" if r.get("channels") == "plaintext" else ""
        return (f"| {r['image']}, {r['codec']}, {r['protocol']}{plain} | {cell(r['logical_gbps'])} | "
                f"{cell(r['ratio_to_iperf3_P4'])} | {like_for_like(r)} | {r['compression_ratio']} |")

    def like_for_like(r: dict[str, Any]) -> str:
        kind = "plain" if r["like_for_like_reference"] == C_PLAIN else "sealed+reserved"
        return f"{cell(r['ratio_to_like_for_like_c_copy'])} ({kind})"

    lines += [row(n) for n in PROTOCOL_ROWS]
    lines += ["", "Codec, same protocol (v3):", "", *head]
    lines += [row(n) for n in CODEC_ROWS]
    return "\n".join(lines)


def main() -> None:
    standalone("datapath", run, __doc__, markdown)


if __name__ == "__main__":
    main()
