"""ACP commit latency and throughput on loopback, beside PySyncObj and etcd 3.4 measured in the same run.

Systems (each node its own process, every log durable before an entry is acknowledged):
  ACP Raft, 3 nodes, WAL fsync on          load: C concurrent asyncio clients inside node 1 (ConsensusService.claim)
  ACP PBFT, 4 nodes (Ed25519 + HMAC)       same load
  (ACP links in plaintext with PSK + per-frame HMAC, like etcd's http:// peers here; agents default to TLS)
  PySyncObj 0.3, 3 nodes, journal file     load: C outstanding replicated calls inside node 1; the journal
                                           (an mmap PySyncObj never flushes by itself) is msync'ed per entry
  etcd 3.4 (etcd-server), 3 members        load: C concurrent asyncio clients on one gRPC channel (aetcd, etcd's
                                           native API) to member 1, from one Python process on the same host
Every operation is one write committed by the cluster; latency is submit -> result at the client.
Clients are Python asyncio tasks on one event loop for every system; ACP's and PySyncObj's share
node 1's process (as the agent's API does), etcd's cannot (etcd is Go) and reach member 1 over
loopback gRPC. Each (system, load) runs RUNS times on a fresh cluster; tables give the median
and the min-max of the runs.

    .venv/bin/python -m benchmarks.bench_acp [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness import cell, save, spread  # noqa: E402
from dwcp_agent.demo import free_port  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PSK = "bench-" + "k" * 32
RUNS = 3


def _summary(latencies: list[float], seconds: float) -> dict[str, Any]:
    lat = sorted(latencies)
    if not lat:
        return {"ops": 0}

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2)
    return {"ops": len(lat), "throughput_ops_s": round(len(lat) / seconds, 1), "p50_ms": pct(0.50),
            "p99_ms": pct(0.99), "max_ms": round(lat[-1] * 1000, 2)}


# ------------------------------------------------------------------ node processes


async def _acp_node(args: argparse.Namespace) -> None:
    from dwcp_agent.acp.auth import public_key_hex
    from dwcp_agent.acp.runtime.service import ConsensusService
    from dwcp_agent.config import load_config
    from dwcp_agent.telemetry.metrics import Metrics

    # Sibling state directories hold each member's key (made by _cluster_run before any node starts).
    keys = ",".join(f"{n}={public_key_hex(Path(args.state).parent / n)}"
                    for n in (item.partition("=")[0] for item in args.peers.split(",")))
    config = load_config(environ={}, overrides={
        "node_id": args.name, "acp_port": args.port, "acp_peers": args.peers, "acp_protocol": args.protocol,
        "acp_peer_keys": keys, "psk": PSK, "listen_host": "127.0.0.1", "log_level": "warning",
        # Plaintext links (PSK-authenticated, every frame MAC'd), like for like with etcd's http peers
        # and PySyncObj's plain TCP; an agent's default is TLS on the consensus port.
        "insecure_datacenter_plaintext": True})
    svc = ConsensusService(config, Metrics(), Path(args.state), fsync=True)
    await svc.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    if args.out:
        while svc.health()["status"] != "ok":
            await asyncio.sleep(0.05)
        await svc.claim("warm-up", "h")
        latencies: list[float] = []
        end = time.perf_counter() + args.seconds

        async def client(c: int) -> None:
            i = 0
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                await svc.claim(f"vm-{c}-{i}", "h")
                latencies.append(time.perf_counter() - t0)
                i += 1
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(args.clients)))
        Path(args.out).write_text(json.dumps({"latencies": latencies, "seconds": time.perf_counter() - start}))
    else:
        await stop.wait()
    await svc.stop()


def _flush_journal_per_entry() -> None:
    """PySyncObj 0.3 appends to an mmap'ed journal and flushes it only at shutdown; make every
    append durable (msync) before the entry is acknowledged, as ACP's WAL and etcd's do."""
    from pysyncobj import journal

    append = journal.FileJournal.add

    def durable_add(self: Any, command: bytes, idx: int, term: int) -> None:
        append(self, command, idx, term)
        self.flush()

    journal.FileJournal.add = durable_add


def _syncobj_node(args: argparse.Namespace) -> None:
    from pysyncobj import SyncObj, SyncObjConf, replicated

    class KV(SyncObj):  # type: ignore[misc]
        def __init__(self, me: str, others: list[str], conf: SyncObjConf) -> None:
            super().__init__(me, others, conf)
            self.data: dict[str, str] = {}

        @replicated  # type: ignore[misc]
        def set(self, key: str, value: str) -> None:
            self.data[key] = value

    _flush_journal_per_entry()
    addrs = args.peers.split(",")
    me = addrs[int(args.name) - 1]
    conf = SyncObjConf(journalFile=os.path.join(args.state, "journal"), fullDumpFile=None)
    kv = KV(me, [a for a in addrs if a != me], conf)
    if not args.out:
        signal.sigwait([signal.SIGTERM])
        return
    while kv._getLeader() is None or not kv.isReady():
        time.sleep(0.05)
    kv.set("warm-up", "v", sync=True, timeout=10)
    latencies: list[float] = []
    lock = threading.Lock()
    done = threading.Event()
    end = time.perf_counter() + args.seconds
    counter = [0]

    def issue() -> None:
        with lock:
            counter[0] += 1
            n = counter[0]
        t0 = time.perf_counter()

        def callback(_result: Any, error: Any) -> None:
            if error == 0:
                with lock:
                    latencies.append(time.perf_counter() - t0)
            if time.perf_counter() < end:
                issue()
            else:
                done.set()
        kv.set(f"k{n}", "v", callback=callback)
    start = time.perf_counter()
    for _ in range(args.clients):
        issue()
    done.wait(args.seconds + 10)
    time.sleep(0.2)
    Path(args.out).write_text(json.dumps({"latencies": latencies, "seconds": time.perf_counter() - start}))
    os._exit(0)


# ------------------------------------------------------------------ drivers


def _spawn(role: str, name: str, port: int, peers: str, state: Path, protocol: str = "",
           out: str = "", clients: int = 0, seconds: float = 0) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, __file__, "--role", role, "--name", name, "--port", str(port), "--peers", peers,
           "--state", str(state), "--protocol", protocol, "--out", out, "--clients", str(clients),
           "--seconds", str(seconds)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _cluster_run(role: str, nodes: int, protocol: str, clients: int, seconds: float) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-acp-{role}-"))
    ports = [free_port() for _ in range(nodes)]
    if role == "acp":
        peers = ",".join(f"n{i + 1}=127.0.0.1:{p}" for i, p in enumerate(ports))
        names = [f"n{i + 1}" for i in range(nodes)]
    else:
        peers = ",".join(f"127.0.0.1:{p}" for p in ports)
        names = [str(i + 1) for i in range(nodes)]
    out = tmp / "result.json"
    procs = []
    try:
        for name in names:
            (tmp / name).mkdir()
            if role == "acp":
                from dwcp_agent.acp.auth import public_key_hex

                public_key_hex(tmp / name)  # every member's key exists before any member pins them
        for i, name in enumerate(names):
            state = tmp / name
            procs.append(_spawn(role, name, ports[i], peers, state, protocol, str(out) if i == 0 else "",
                                clients, seconds))
        procs[0].wait(timeout=seconds + 120)
        data = json.loads(out.read_text())
        return _summary(data["latencies"], data["seconds"])
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def _etcd_run(clients: int, seconds: float) -> dict[str, Any]:
    etcd = shutil.which("etcd")
    if etcd is None:
        return {"skipped": "etcd not installed (Debian package etcd-server)"}
    tmp = Path(tempfile.mkdtemp(prefix="bench-etcd-"))
    peer_ports = [free_port() for _ in range(3)]
    client_ports = [free_port() for _ in range(3)]
    initial = ",".join(f"e{i}=http://127.0.0.1:{p}" for i, p in enumerate(peer_ports))
    procs = []
    try:
        for i in range(3):
            cmd = [etcd, "--name", f"e{i}", "--data-dir", str(tmp / f"e{i}"),
                   "--listen-peer-urls", f"http://127.0.0.1:{peer_ports[i]}",
                   "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_ports[i]}",
                   "--listen-client-urls", f"http://127.0.0.1:{client_ports[i]}",
                   "--advertise-client-urls", f"http://127.0.0.1:{client_ports[i]}",
                   "--initial-cluster", initial, "--initial-cluster-state", "new", "--log-level", "error"]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return asyncio.run(_etcd_load(client_ports[0], clients, seconds))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


async def _etcd_load(port: int, clients: int, seconds: float) -> dict[str, Any]:
    """C asyncio clients PUT through etcd's gRPC KV API (aetcd) on one channel to member 1."""
    import aetcd

    async with aetcd.Client(host="127.0.0.1", port=port, timeout=10) as etcd:
        deadline = time.monotonic() + 30
        while True:
            try:
                await etcd.put(b"warm-up", b"v")
                break
            except aetcd.exceptions.ClientError:
                if time.monotonic() > deadline:
                    return {"skipped": "etcd cluster did not start"}
                await asyncio.sleep(0.1)
        latencies: list[float] = []
        end = time.perf_counter() + seconds

        async def client(c: int) -> None:
            i = 0
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                await etcd.put(f"vm-{c}-{i}".encode(), b"h")
                latencies.append(time.perf_counter() - t0)
                i += 1
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        return _summary(latencies, time.perf_counter() - start)


SYSTEMS = (("acp_raft_3", "ACP Raft, 3 nodes, fsync"), ("acp_pbft_4", "ACP PBFT, 4 nodes"),
           ("pysyncobj_3", "PySyncObj, 3 nodes, journal msync per entry"),
           ("etcd_3", "etcd 3.4, 3 members, gRPC (aetcd)"))
METRICS = ("throughput_ops_s", "p50_ms", "p99_ms")


def _repeated(system: str, clients: int, seconds: float, runs: int) -> dict[str, Any]:
    """`runs` fresh clusters under the same load: each run's summary and the median/spread per metric."""
    samples = [_measure(system, clients, seconds) for _ in range(runs)]
    out: dict[str, Any] = {"runs": samples}
    skipped = [s["skipped"] for s in samples if "skipped" in s]
    if skipped:
        out["skipped"] = skipped[0]
    done = [s for s in samples if s.get("ops")]
    for metric in METRICS:
        out[metric] = spread([s[metric] for s in done], 2)
    return out


def _measure(system: str, clients: int, seconds: float) -> dict[str, Any]:
    if system == "acp_raft_3":
        return _cluster_run("acp", 3, "raft", clients, seconds)
    if system == "acp_pbft_4":
        return _cluster_run("acp", 4, "pbft", clients, seconds)
    if system == "pysyncobj_3":
        return _cluster_run("syncobj", 3, "", clients, seconds)
    return _etcd_run(clients, seconds)


def _raft_failover(repeats: int) -> dict[str, Any]:
    """kill -9 the leader of 3 real agents; time until a survivor commits a write (seconds)."""
    from dwcp_agent.acp.auth import public_key_hex
    from dwcp_agent.client import ApiError, api_call
    from dwcp_agent.demo import LocalAgent

    times: list[float] = []
    for _ in range(repeats):
        tmp = Path(tempfile.mkdtemp(prefix="bench-failover-"))
        psk = tmp / "psk"
        psk.write_text(PSK)
        ports = [free_port() for _ in range(3)]
        peers = ",".join(f"a{i + 1}=127.0.0.1:{p}" for i, p in enumerate(ports))
        keys = ",".join(f"a{i + 1}={public_key_hex(tmp / f'a{i + 1}')}" for i in range(3))
        agents = [LocalAgent(f"a{i + 1}", tmp, psk, None, {"acp_port": p, "acp_peers": peers, "acp_peer_keys": keys,
                                                           "acp_protocol": "raft", "log_level": "warning"})
                  for i, p in enumerate(ports)]
        try:
            for agent in agents:
                agent.wait_ready()
            leader = ""
            while not leader:
                leader = api_call(agents[0].url, "GET", "/api/v3/cluster").get("leader", "")
                time.sleep(0.05)
            victim = next(a for a in agents if a.name == leader)
            survivor = next(a for a in agents if a is not victim)
            api_call(survivor.url, "POST", "/api/v3/vms/before/claim", {"host": "h"})
            victim.kill()
            start = time.perf_counter()
            while True:
                try:
                    api_call(survivor.url, "POST", "/api/v3/vms/after/claim", {"host": "h"}, timeout=0.2)
                    break
                except ApiError:
                    pass
            times.append(time.perf_counter() - start)
        finally:
            for agent in agents:
                if agent.proc is not None and agent.proc.poll() is None:
                    agent.stop(timeout=5)
            shutil.rmtree(tmp, ignore_errors=True)
    times.sort()
    return {"runs": len(times), "median_s": round(times[len(times) // 2], 3), "max_s": round(times[-1], 3),
            "election_timeout_s": "0.5 to 1.0 (10-20 ticks of 50 ms)"}


def run(quick: bool) -> dict[str, Any]:
    """Two loads per system, same run: latency (4 clients) and throughput (32 clients), RUNS runs each."""
    seconds = 2.5 if quick else 10.0
    out: dict[str, Any] = {"seconds": seconds, "cpus": os.cpu_count(), "latency_clients": 4,
                           "throughput_clients": 32, "runs_per_configuration": RUNS}
    for key, _label in SYSTEMS:
        out[key] = {"latency": _repeated(key, 4, seconds, RUNS), "throughput": _repeated(key, 32, seconds, RUNS)}

    def median(key: str, load: str, metric: str) -> float | None:
        value = out[key][load][metric].get("median")
        return float(value) if value is not None else None

    raft_tput = median("acp_raft_3", "throughput", "throughput_ops_s") or 0.0
    raft_p99 = median("acp_raft_3", "latency", "p99_ms")
    for ref in ("pysyncobj_3", "etcd_3"):
        tput = median(ref, "throughput", "throughput_ops_s")
        if tput:
            out[f"raft_throughput_vs_{ref}"] = round(raft_tput / tput, 2)
        p99 = median(ref, "latency", "p99_ms")
        if p99 and raft_p99 is not None:
            out[f"raft_p99_vs_{ref}"] = round(raft_p99 / p99, 2)
    out["raft_failover"] = _raft_failover(3 if quick else 10)
    pbft_p99 = median("acp_pbft_4", "latency", "p99_ms")
    pbft_tput = median("acp_pbft_4", "throughput", "throughput_ops_s") or 0.0
    if raft_tput:
        out["pbft_throughput_vs_raft"] = round(pbft_tput / raft_tput, 2)
    out["targets"] = {
        "raft_throughput_ge_pysyncobj": raft_tput >= (median("pysyncobj_3", "throughput", "throughput_ops_s")
                                                      or 1e9),
        "raft_p99_le_10ms": (raft_p99 if raft_p99 is not None else 1e9) <= 10,
        "pbft_p99_le_20ms": (pbft_p99 if pbft_p99 is not None else 1e9) <= 20,
        "pbft_throughput_ge_half_raft": bool(raft_tput) and pbft_tput >= 0.5 * raft_tput,
        "raft_failover_within_two_election_timeouts": out["raft_failover"]["max_s"] <= 2.0,
    }
    return out


def markdown(result: dict[str, Any]) -> str:
    """Median (min-max) of the runs: p50/p99 at the latency load, ops/s and p99 at the throughput load."""
    runs = result.get("runs_per_configuration", 1)
    rows = [f"Median (min-max) of {runs} runs per cell, each on a fresh cluster; every system durable per entry.",
            "",
            "| system | p50 ms (4 clients) | p99 ms (4 clients) | ops/s (32 clients) | p99 ms (32 clients) |",
            "|---|---:|---:|---:|---:|"]
    for key, label in SYSTEMS:
        lat, tput = result[key]["latency"], result[key]["throughput"]
        if lat["p50_ms"].get("runs") and tput["throughput_ops_s"].get("runs"):
            rows.append(f"| {label} | {cell(lat['p50_ms'])} | {cell(lat['p99_ms'])} "
                        f"| {cell(tput['throughput_ops_s'])} | {cell(tput['p99_ms'])} |")
        else:
            rows.append(f"| {label} | {lat.get('skipped') or tput.get('skipped') or 'no result'} | | | |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--role", default="", help=argparse.SUPPRESS)
    for name in ("name", "peers", "state", "protocol", "out"):
        parser.add_argument(f"--{name}", default="", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "acp":
        asyncio.run(_acp_node(args))
        return
    if args.role == "syncobj":
        _syncobj_node(args)
        return
    result = run(args.quick)
    save("acp", result)
    print(markdown(result))
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("raft_", "pbft_")) or k == "targets"},
                     indent=2))


if __name__ == "__main__":
    main()
