"""A nemesis run: real agent processes, one per namespace; clients, a history, faults, a report.

Clients are threads in the hub namespace issuing ownership claims, leases, transfers and reads
to random nodes through the admin API; every operation is recorded with its invocation and
response time (an unknown outcome — timeout, 503, lost connection — has no response time) and
the history is checked per VM with the project's linearizability checker at the end.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemesis_net import NemesisNet, node_addr

from dwcp_agent.acp.auth import public_key_hex
from dwcp_agent.acp.runtime.wal import FSYNC_FAIL_FLAG_ENV
from dwcp_agent.acp.testing.linearizability import UNKNOWN, Operation, check_per_key, lease_model
from dwcp_agent.client import TOKEN_ENV, ApiError, api_call
from dwcp_agent.security.pki import ensure_ca

ACP_PORT = 9877
ADMIN_PORT = 8080
WRITES = ("claim", "lease", "transfer")
CLIENT_TIMEOUT_S = 2.0  # a request stuck on a cut-off node is given up (unknown outcome) after this




def _token_file(root: Path) -> Path:
    """One admin token for every node of the run, exported so this process's `api_call`s use it."""
    path = Path(os.environ.get(TOKEN_ENV) or root / "admin.token")
    if not path.exists():
        path.write_text(os.urandom(24).hex())
        path.chmod(0o600)
    os.environ[TOKEN_ENV] = str(path)
    return path


class Node:
    """`dwcp-agent serve` inside node namespace `index`; restartable on the same state."""

    def __init__(self, net: NemesisNet, index: int, root: Path, psk: Path, peers: str, protocol: str) -> None:
        self.net, self.index = net, index
        self.name = f"a{index + 1}"
        self.addr = node_addr(index)
        self.url = f"http://{self.addr}:{ADMIN_PORT}"
        self.state_dir = root / self.name
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.state_dir / "agent.log"
        # The WAL lives on a small tmpfs of its own, so a test can fill it (disk full), and fsync
        # fails while `fsync_flag` exists (the WAL's fault-injection hook).
        self.wal_dir = self.state_dir / "acp"
        self.wal_dir.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(self.wal_dir)], check=True)
        self.fsync_flag = self.state_dir / "fsync-fails"
        # DWCP_* names are config keys to an agent, which refuses unknown ones: pass none of the
        # harness's own (DWCP_NEMESIS_SECONDS, DWCP_SIM_SCHEDULES...).
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("DWCP_")}
        self.env = {**inherited, FSYNC_FAIL_FLAG_ENV: str(self.fsync_flag), TOKEN_ENV: str(_token_file(root))}
        self.argv = net.cmd(net.nodes[index], [
            sys.executable, "-m", "dwcp_agent", "serve", "--node-id", self.name, "--state-dir", str(self.state_dir),
            "--data-port", "9876", "--admin-port", str(ADMIN_PORT), "--listen-host", self.addr,
            "--admin-host", self.addr, "--psk-file", str(psk),
            "--set", f"acp_port={ACP_PORT}", "--set", f"acp_peers={peers}", "--set", f"acp_protocol={protocol}",
            "--set", "acp_snapshot_entries=200",
            "--set", f"tls_auto_issue_ca_dir={ensure_ca(root / 'cluster-ca')}"])
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.paused:
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()
        self.paused = False

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.paused:
            self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def fill_disk(self) -> None:
        """Fill the WAL's tmpfs: the next write fails with ENOSPC."""
        with open(self.wal_dir / "filler", "ab") as f:
            chunk = b"\0" * (1 << 20)
            try:
                while True:
                    f.write(chunk)
                    f.flush()
            except OSError:
                pass

    def free_disk(self) -> None:
        (self.wal_dir / "filler").unlink(missing_ok=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.wal_dir)], capture_output=True)

    def status(self) -> dict[str, Any]:
        return api_call(self.url, "GET", "/api/v3/cluster", timeout=2.0)

    def ready(self) -> bool:
        try:
            return bool(api_call(self.url, "GET", "/health", timeout=1.0).get("ready"))
        except ApiError:
            return False


@dataclass
class FaultRecord:
    name: str
    at: float
    healed: float = math.nan
    first_write_s: float | None = None  # from injection to the end of the first write that succeeded after it


@dataclass
class Report:
    cluster: str
    ok: int = 0
    failed: int = 0
    unknown: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    faults: list[FaultRecord] = field(default_factory=list)
    linearizable: bool = False
    partitions: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 1) if lat else None
        return {
            "cluster": self.cluster, "ops_ok": self.ok, "ops_failed": self.failed, "ops_unknown": self.unknown,
            "throughput_ops_s": round(self.ok / self.seconds, 1) if self.seconds else 0.0,
            "latency_p50_ms": pct(0.50), "latency_p99_ms": pct(0.99), "linearizable": self.linearizable,
            "real_partitions": self.partitions,
            "faults": [{"fault": f.name, "first_write_after_s": None if f.first_write_s is None
                        else round(f.first_write_s, 3)} for f in self.faults],
            **self.extra,
        }


class Workload:
    """Client threads; `history` is shared and appended under a lock."""

    def __init__(self, net: NemesisNet, nodes: list[Node], clients: int, vms: int, seed: int) -> None:
        self.net, self.nodes = net, nodes
        self.clients, self.vms, self.seed = clients, vms, seed
        self.history: list[Operation] = []
        self.failed = 0
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for c in range(self.clients):
            t = threading.Thread(target=self._client, args=(c,), daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(30)

    def _client(self, c: int) -> None:
        rng = random.Random(self.seed * 1000 + c)
        with self.net.enter_hub():
            while not self.stop_event.is_set():
                vm = f"vm-{rng.randrange(self.vms)}"
                host = rng.choice(["h1", "h2", "h3"])
                kind = rng.random()
                op: tuple[Any, ...]
                if kind < 0.3:
                    op = ("claim", host)
                elif kind < 0.55:
                    op = ("lease", host)
                elif kind < 0.75:
                    op = ("transfer", host, rng.choice(["h1", "h2", "h3"]), rng.randint(1, 6))
                else:
                    op = ("read",)
                node = rng.choice(self.nodes)
                call = time.monotonic()
                out = self._do(node, vm, op)
                if out is None:
                    with self.lock:
                        self.failed += 1
                    time.sleep(0.05)
                    continue
                ret = math.inf if out is UNKNOWN else time.monotonic()
                with self.lock:
                    self.history.append(Operation(vm, op, out, call, ret))

    @staticmethod
    def _do(node: Node, vm: str, op: tuple[Any, ...]) -> Any:
        """The outcome, UNKNOWN when it may or may not have happened, None when it surely did not."""
        try:
            if op[0] == "claim":
                r = api_call(node.url, "POST", f"/api/v3/vms/{vm}/claim", {"host": op[1]}, timeout=CLIENT_TIMEOUT_S)
                return ("ok", r["owner"])
            if op[0] == "lease":
                r = api_call(node.url, "POST", f"/api/v3/vms/{vm}/lease", {"holder": op[1], "ttl_s": 3600},
                             timeout=CLIENT_TIMEOUT_S)
                return ("ok", r["token"])
            if op[0] == "transfer":
                body = {"from_host": op[1], "to_host": op[2], "fencing_token": op[3]}
                r = api_call(node.url, "POST", f"/api/v3/vms/{vm}/transfer", body, timeout=CLIENT_TIMEOUT_S)
                return ("ok", r["owner"])
            return ("ok", api_call(node.url, "GET", f"/api/v3/vms/{vm}/owner", timeout=CLIENT_TIMEOUT_S)["owner"])
        except ApiError as exc:
            if exc.status == 409:
                return (str(exc).split(": ", 1)[-1],)
            if exc.status == 0 and "Connection refused" in str(exc):
                return None  # nothing listened: the request never reached the node
            return UNKNOWN


class Run:
    """A cluster in namespaces plus its workload; the test drives faults through `fault()`."""

    def __init__(self, root: Path, protocol: str, n: int, clients: int = 6, vms: int = 8, seed: int = 1) -> None:
        self.protocol, self.n = protocol, n
        self.cluster = f"{protocol}{n}"
        self.net = NemesisNet(n, self.cluster[0] + str(n))
        self.root = root
        psk = root / "psk"
        psk.write_text(os.urandom(32).hex())
        peers = ",".join(f"a{i + 1}={node_addr(i)}:{ACP_PORT}" for i in range(n))
        self.nodes = [Node(self.net, i, root, psk, peers, protocol) for i in range(n)]
        keys = ",".join(f"{node.name}={public_key_hex(node.state_dir)}" for node in self.nodes)
        for node in self.nodes:
            node.argv += ["--set", f"acp_peer_keys={keys}"]
        self.work = Workload(self.net, self.nodes, clients, vms, seed)
        self.report = Report(self.cluster)
        self.started = 0.0

    def __enter__(self) -> Run:
        self.net.__enter__()
        try:
            for node in self.nodes:
                node.start()
            for node in self.nodes:
                self.wait_ready(node)
            self.started = time.monotonic()
            self.work.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.work.stop()
        for node in self.nodes:
            node.stop()
            node.unmount()
        self.net.down()

    def wait_ready(self, node: Node, timeout: float = 60.0) -> float:
        """Seconds until `node` reports ready."""
        t0 = time.monotonic()
        with self.net.enter_hub():
            while time.monotonic() - t0 < timeout:
                if node.proc is not None and node.proc.poll() is not None:
                    raise RuntimeError(f"{node.name} exited with {node.proc.returncode}; see {node.log_path}")
                if node.ready():
                    return time.monotonic() - t0
                time.sleep(0.05)
        raise RuntimeError(f"{node.name} not ready after {timeout:.0f} s; see {node.log_path}")

    def in_hub(self, fn: Callable[[], Any]) -> Any:
        with self.net.enter_hub():
            return fn()

    def leader(self, among: list[Node] | None = None, timeout: float = 30.0) -> Node:
        """The node the others agree leads (Raft leader / PBFT primary)."""
        among = among or self.nodes
        deadline = time.monotonic() + timeout
        with self.net.enter_hub():
            while time.monotonic() < deadline:
                names = set()
                for node in among:
                    try:
                        names.add(node.status().get("leader") or "")
                    except ApiError:
                        names.add("")
                if len(names) == 1 and "" not in names:
                    name = names.pop()
                    return next(n for n in self.nodes if n.name == name)
                time.sleep(0.1)
        raise AssertionError(f"{self.cluster}: no agreed leader within {timeout} s")

    def fault(self, name: str, inject: Callable[[], None], heal: Callable[[], None], hold_s: float,
              settle_s: float = 2.0, partition: bool = False) -> FaultRecord:
        record = FaultRecord(name, time.monotonic())
        inject()
        time.sleep(hold_s)
        heal()
        record.healed = time.monotonic()
        time.sleep(settle_s)
        self.report.faults.append(record)
        self.report.partitions += int(partition)
        return record

    def finish(self, results_dir: Path | None = None) -> Report:
        self.work.stop()
        rep = self.report
        rep.seconds = time.monotonic() - self.started
        hist = self.work.history
        rep.failed = self.work.failed
        rep.unknown = sum(1 for op in hist if op.output is UNKNOWN)
        done = [op for op in hist if op.output is not UNKNOWN]
        rep.ok = len(done)
        rep.latencies = [op.ret - op.call for op in done]
        for f in rep.faults:
            writes = [op.ret for op in done if op.input[0] in WRITES and op.output[0] == "ok" and op.call >= f.at]
            f.first_write_s = (min(writes) - f.at) if writes else None
        result = check_per_key(hist, lease_model())
        rep.linearizable = result.ok
        if not result.ok:
            rep.extra["non_linearizable_key"] = result.key
        if results_dir is not None:
            results_dir.mkdir(parents=True, exist_ok=True)
            (results_dir / f"nemesis-{self.cluster}.json").write_text(json.dumps(rep.summary(), indent=2))
        return rep
