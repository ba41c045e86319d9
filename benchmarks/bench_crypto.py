"""Cost of channel encryption: the same migration with TLS 1.3 (default) and in plaintext, same run.

Two agent pairs on loopback, one with the default mutual TLS and one with the explicit
`insecure_datacenter_plaintext` switch, migrate the same image (datacenter profile: random
pages, codec none, 4 streams; and the vm-mix image with HDE on). Runs alternate between the two
pairs, after one unmeasured warm-up each (see bench_datapath's docstring); the median of several
runs per mode is quoted, and the encrypted/plaintext ratio (target >= 0.8). Beside the wall-clock
rate, each agent's CPU seconds (user + system, from /proc) per GiB moved are recorded per side: on
a loaded machine wall time is noise, CPU per byte is not. benchmarks/stream_cpu.py adds one data
stream's own CPU per GiB per side (plaintext, sealed natively, the former Python sealing). Also
measured now:
OpenSSL's AES-128-GCM and AES-256-GCM speed on this CPU (`openssl speed`), the bound on what any
AEAD design could do per core.

    .venv/bin/python -m benchmarks.bench_crypto [--quick]
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import statistics
import subprocess
from pathlib import Path
from typing import Any

from benchmarks import stream_cpu
from benchmarks.bench_datapath import _migrate, _workdir
from benchmarks.harness import standalone
from dwcp_agent.demo import LocalAgent, free_port
from dwcp_agent.migration.images import generate

GIB = 1 << 30
MODES = {"tls": {}, "plaintext": {"DWCP_INSECURE_DATACENTER_PLAINTEXT": "true"}}


def openssl_speed(cipher: str) -> float:
    """Bytes/s of `openssl speed -evp <cipher>` on 1 MiB blocks, one core (0 when unavailable)."""
    try:
        out = subprocess.run(["openssl", "speed", "-seconds", "1", "-bytes", "1048576", "-evp", cipher],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0.0
    match = re.search(r"^\S+\s+([\d.]+)k\s*$", out.strip().splitlines()[-1]) if out.strip() else None
    return float(match.group(1)) * 1000 if match else 0.0


def cpu_seconds(agent: LocalAgent) -> float:
    """User + system CPU seconds the agent process has used so far (/proc/<pid>/stat)."""
    assert agent.proc is not None
    fields = Path(f"/proc/{agent.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(quick: bool) -> dict[str, Any]:
    size = (256 << 20) if quick else (1 << 30)
    repeats = 3 if quick else 5
    work = _workdir()
    psk = work / "psk"
    psk.write_text(secrets.token_hex(32))
    results: dict[str, Any] = {"image_bytes": size, "repeats": repeats,
                               "openssl_aes128gcm_bytes_per_second": openssl_speed("aes-128-gcm"),
                               "openssl_aes256gcm_bytes_per_second": openssl_speed("aes-256-gcm"),
                               "stream_cpu": stream_cpu.run(quick)}
    agents: list[LocalAgent] = []
    try:
        for case, profile, codec in (("random_none_4streams", "random", "none"), ("vmmix_auto", "vm-mix", "auto")):
            image = generate(work / f"{profile}.img", size, profile, seed=7)
            pairs = {}
            for mode, env in MODES.items():
                env = {"STREAM_COUNT": "4", "COMPRESSION_ALGO": codec, **env}
                source = LocalAgent(f"src-{case}-{mode}", work, psk, env)
                dest = LocalAgent(f"dst-{case}-{mode}", work, psk, env, {"acp_port": str(free_port())})
                agents += [source, dest]
                source.wait_ready()
                dest.wait_ready()
                linked = source.images / image.name
                if not linked.exists():
                    linked.hardlink_to(image)
                _migrate(source, dest, linked)  # warm-up
                pairs[mode] = (source, dest, linked)
            rates: dict[str, list[float]] = {mode: [] for mode in MODES}
            cpu: dict[str, dict[str, list[float]]] = {mode: {"source": [], "dest": []} for mode in MODES}
            for _ in range(repeats):  # alternate, so drift in machine load hits both modes alike
                for mode, (source, dest, linked) in pairs.items():
                    before = cpu_seconds(source), cpu_seconds(dest)
                    rates[mode].append(size / _migrate(source, dest, linked)["duration_s"])
                    cpu[mode]["source"].append((cpu_seconds(source) - before[0]) / (size / GIB))
                    cpu[mode]["dest"].append((cpu_seconds(dest) - before[1]) / (size / GIB))
            medians = {mode: statistics.median(r) for mode, r in rates.items()}
            cpu_medians = {f"{mode}_{side}_cpu_s_per_gib": statistics.median(values)
                           for mode, sides in cpu.items() for side, values in sides.items()}
            results[case] = {"tls_bytes_per_second": medians["tls"],
                             "plaintext_bytes_per_second": medians["plaintext"],
                             "ratio_tls_to_plaintext": medians["tls"] / medians["plaintext"],
                             **cpu_medians, "runs": rates, "cpu_s_per_gib_runs": cpu}
            for source, dest, _ in pairs.values():
                source.stop()
                dest.stop()
    finally:
        for agent in agents:
            agent.stop()
        shutil.rmtree(work, ignore_errors=True)
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [f"### Channel encryption cost ({results['image_bytes'] >> 20} MiB images, loopback, "
             f"median of {results['repeats']})", "",
             "| case | TLS 1.3 GB/s | plaintext GB/s | TLS / plaintext "
             "| CPU s/GiB source TLS / plain | CPU s/GiB dest TLS / plain |", "|---|---|---|---|---|---|"]
    for case in ("random_none_4streams", "vmmix_auto"):
        r = results[case]
        lines.append(f"| {case} | {r['tls_bytes_per_second'] / 1e9:.2f} | {r['plaintext_bytes_per_second'] / 1e9:.2f}"
                     f" | {r['ratio_tls_to_plaintext']:.2f}"
                     f" | {r['tls_source_cpu_s_per_gib']:.2f} / {r['plaintext_source_cpu_s_per_gib']:.2f}"
                     f" | {r['tls_dest_cpu_s_per_gib']:.2f} / {r['plaintext_dest_cpu_s_per_gib']:.2f} |")
    aes128, aes256 = results["openssl_aes128gcm_bytes_per_second"], results["openssl_aes256gcm_bytes_per_second"]
    lines.append(f"\nOpenSSL on this CPU, one core: AES-128-GCM {aes128 / 1e9:.2f} GB/s, "
                 f"AES-256-GCM {aes256 / 1e9:.2f} GB/s.\n")
    lines.append(stream_cpu.markdown(results["stream_cpu"]))
    return "\n".join(lines)


def main() -> None:
    standalone("crypto", run, __doc__, markdown)


if __name__ == "__main__":
    main()
