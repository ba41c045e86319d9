"""One typed configuration: defaults < YAML file < environment < command-line flags.

Every key is a field of `Config` with its type and allowed range, so a typo, a wrong type or an
out-of-range value is caught at start-up with the key's name (the CLI exits with status 2).
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
PAGE_SIZE = 4096

# Environment names the ops guide uses directly; every other key is DWCP_<KEY>.
ENV_ALIASES = {
    "STREAM_COUNT": "stream_count",
    "COMPRESSION_ALGO": "compression_algo",
    "TRANSPORT_MODE": "transport_mode",
    "TRACE_SAMPLING": "trace_sampling",
    "FEATURE_FLAG_ROLLOUT": "feature_flag_rollout",
    "ENABLE_V3": "enable_v3",
}


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or out of range; `key` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key '{key}': {message}")
        self.key = key


def _spec(default: Any, *, lo: float | None = None, hi: float | None = None,
          choices: tuple[str, ...] | None = None, size: bool = False, doc: str = "") -> Any:
    meta = {"lo": lo, "hi": hi, "choices": choices, "size": size, "doc": doc}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Config:
    """Agent settings. Sizes accept integers or strings like '1MiB'; times are in seconds."""

    node_id: str = _spec(socket.gethostname(), doc="Name of this agent in logs and the cluster.")
    listen_host: str = _spec("0.0.0.0", doc="Address of the data listener.")
    data_port: int = _spec(9876, lo=0, hi=65535, doc="Data listener port (0 = any free port).")
    admin_host: str = _spec("127.0.0.1", doc="Address of the admin HTTP server (loopback: it can move VMs).")
    admin_port: int = _spec(8080, lo=0, hi=65535, doc="Admin HTTP port (0 = any free port).")
    admin_token_file: str = _spec("", doc="Admin bearer token; created if missing ('' = state_dir/admin.token).")
    admin_auth_health: bool = _spec(False, doc="Require the admin token on /health and /metrics too.")
    admin_allowed_hosts: list[str] = _spec([], doc="Host names accepted in the Host header besides IPs, "
                                                   "localhost and node_id ('*' = any).")
    metrics_host: str = _spec("0.0.0.0", doc="Address of the metrics listener (/health, /metrics only).")
    metrics_port: int = _spec(-1, lo=-1, hi=65535, doc="Metrics listener port (-1 = none: served on the "
                                                       "admin port; 0 = any free port).")
    acp_port: int = _spec(9877, lo=0, hi=65535, doc="Consensus port between agents.")
    state_dir: str = _spec("/var/lib/dwcp-agent", doc="Journals, WAL and runtime state.")
    dest_dirs: list[str] = _spec([], doc="Directories incoming images may be written to ([] = state_dir/images).")
    source_dirs: list[str] = _spec([], doc="Directories images may be migrated from ([] = state_dir/images).")
    psk: str = _spec("", doc="Pre-shared key authenticating peers (prefer psk_file).")
    psk_file: str = _spec("", doc="File holding the pre-shared key.")
    stream_count: int = _spec(0, lo=0, hi=256, doc="AMST data streams per migration: 0 or 'auto' (default) = "
                              "tuned online by PBA up to max_streams; N = exactly N (PBA still measures).")
    max_streams: int = _spec(64, lo=1, hi=256, doc="Ceiling of the online stream tuner.")
    chunk_size: int = _spec(1 * MiB, lo=4 * KiB, hi=64 * MiB, size=True, doc="Chunk size, whole pages.")
    compression_algo: str = _spec(
        "auto", choices=("auto", "none", "lz4", "zstd", "snappy"), doc="Codec; auto = chosen per chunk."
    )
    zstd_level: int = _spec(1, lo=-5, hi=22, doc="zstd level when zstd is used.")
    transport_mode: str = _spec("auto", choices=("auto", "tcp", "rdma_only"), doc="Data transport.")
    rdma_device: str = _spec("", doc="RDMA device to use, e.g. mlx5_0 ('' = first with an active port).")
    rdma_slots: int = _spec(8, lo=1, hi=256, doc="Registered chunk slots per RDMA stream (credits in flight).")
    rdma_gid_index: int = _spec(-1, lo=-1, hi=255, doc="RoCE GID table index (-1 = first RoCE v2 IPv4 GID, else 0).")
    rdma_hop_limit: int = _spec(64, lo=1, hi=255, doc="RoCE v2 IP hop limit (TTL); 1 stops at the first router.")
    network_mode: str = _spec(
        "auto", choices=("auto", "datacenter", "internet", "hybrid"), doc="Force a mode, or detect it."
    )
    max_inflight_bytes: int = _spec(64 * MiB, lo=1 * MiB, hi=64 * GiB, size=True,
                                    doc="Encoded bytes queued or on the wire per migration.")
    encode_threads: int = _spec(0, lo=0, hi=256, doc="Encoder threads (0 = one per core).")
    socket_buffer_bytes: int = _spec(0, lo=0, hi=1 * GiB, size=True, doc="SO_SNDBUF/SO_RCVBUF (0 = kernel).")
    tcp_congestion: str = _spec("", doc="TCP_CONGESTION for data streams ('' = kernel default).")
    pacing_rate_bytes: int = _spec(0, lo=0, hi=1 << 40, size=True, doc="SO_MAX_PACING_RATE (0 = off).")
    delta_cache_bytes: int = _spec(64 * MiB, lo=0, hi=64 * GiB, size=True, doc="XOR-delta page cache.")
    connect_timeout_s: float = _spec(5.0, lo=0.1, hi=600, doc="Connecting to a peer agent.")
    io_timeout_s: float = _spec(30.0, lo=0.5, hi=3600, doc="A stalled stream is declared dead after this.")
    retry_limit: int = _spec(5, lo=0, hi=1000, doc="Reconnect attempts before a migration fails.")
    shutdown_timeout_s: float = _spec(10.0, lo=0.1, hi=600, doc="Graceful stop bound on SIGTERM.")
    log_level: str = _spec("info", choices=("debug", "info", "warning", "error"), doc="Log threshold.")
    trace_sampling: float = _spec(1.0, lo=0.0, hi=100.0, doc="Percent of migrations traced.")
    feature_flag_rollout: int = _spec(100, lo=0, hi=100, doc="Percent of migrations on protocol v3.")
    enable_v3: bool = _spec(True, doc="Master switch for protocol profile v3.")
    sla_availability: float = _spec(0.999, lo=0.0, hi=1.0, doc="GO needs at least this availability.")
    sla_latency_p99_s: float = _spec(0.1, lo=0.0, hi=3600, doc="GO needs P99 latency at most this.")
    sla_latency_p99_internet_s: float = _spec(0.5, lo=0.0, hi=3600, doc="P99 operation latency SLO in internet mode.")
    sla_latency_p99_hybrid_s: float = _spec(0.25, lo=0.0, hi=3600, doc="P99 operation latency SLO in hybrid mode.")
    sla_error_rate: float = _spec(0.01, lo=0.0, hi=1.0, doc="GO needs error rate at most this.")
    sla_throughput_bytes: float = _spec(2.4e9, lo=0.0, hi=1e13, doc="Throughput SLA in datacenter mode (bytes/s).")
    sla_throughput_internet_bytes: float = _spec(12.5e6, lo=0.0, hi=1e13,
                                                 doc="Throughput SLO in internet mode (bytes/s; 100 Mbit/s).")
    sla_throughput_hybrid_bytes: float = _spec(125e6, lo=0.0, hi=1e13,
                                               doc="Throughput SLO in hybrid mode (bytes/s; 1 Gbit/s).")
    runbook_base_url: str = _spec("docs/runbooks", doc="Where alert runbook_url links point (base URL).")
    sla_nogo_hold_s: float = _spec(30.0, lo=0.0, hi=86400, doc="NO-GO held this long rolls back.")
    sla_min_samples: int = _spec(20, lo=1, hi=1_000_000,
                                 doc="An SLI needs this many samples in the 5 min window to call NO-GO.")
    history_max_entries: int = _spec(1000, lo=1, hi=1_000_000,
                                     doc="Ended migrations remembered across restarts (state_dir/migrations.jsonl).")
    history_max_age_s: float = _spec(7 * 86400.0, lo=60, hi=365 * 86400.0,
                                     doc="Remembered migrations older than this are forgotten.")
    acp_protocol: str = _spec("auto", choices=("auto", "raft", "pbft"), doc="Consensus protocol.")
    acp_peers: list[str] = _spec([], doc="Cluster members as id=host:port (empty = single node).")
    acp_peer_keys: list[str] = _spec([], doc="Pinned member signing keys as id=<64 hex digits> (Ed25519 public "
                                             "key; `dwcp-agent cluster key` prints this node's).")
    acp_snapshot_entries: int = _spec(2000, lo=8, hi=10_000_000, doc="Raft log entries between snapshots.")
    tls_dir: str = _spec("", doc="Holds this node's TLS node.pem, node.key and CA bundle ca.pem ('' = state_dir/tls).")
    tls_ca_file: str = _spec("", doc="Cluster CA bundle peers are verified against ('' = tls_dir/ca.pem).")
    tls_auto_issue_ca_dir: str = _spec("", doc="CA directory (pki init) to issue this node's certificate from "
                                               "at start when missing or expiring (demo/tests; '' = never).")
    insecure_datacenter_plaintext: bool = _spec(False, doc="Data and consensus traffic unencrypted, PSK only "
                                                           "(trusted networks only; warned and shown in /health).")
    max_connections: int = _spec(512, lo=1, hi=65536, doc="Data-port connections served at once (worker pool size).")
    max_connections_per_source: int = _spec(
        65, lo=1, hi=65536, doc="Data-port connections from one address: 64 data streams and their control.")
    # Files and outgoing limits (sparse: issue 13 items 5-6, issue 16)
    partial_ttl_s: float = _spec(86400.0, lo=1.0, hi=365 * 86400,
                                 doc="Abandoned partial images and journals are removed after this.")
    migration_targets: list[str] = _spec(
        ["127.0.0.1:*", "[::1]:*", "localhost:*"],
        doc="HOST:PORT patterns (fnmatch) a migration may be sent to, besides cluster members' hosts.")
    max_outgoing_migrations: int = _spec(4, lo=1, hi=1024, doc="Outgoing migrations running at once.")
    finished_record_ttl_s: float = _spec(3600.0, lo=1.0, hi=30 * 86400,
                                         doc="Finished migration records are forgotten after this.")
    index_budget_bytes: int = _spec(256 * MiB, lo=16 * MiB, hi=64 * GiB, size=True,
                                    doc="Memory of the dedupe index and baseline have-list per migration.")
    # Live migration of running QEMU VMs (dwcp_agent/live, docs/live-migration.md).
    qmp_dir: str = _spec("/run/dwcp-agent/qmp", doc="QMP sockets of local VMs, as <vm_id>.sock.")
    live_qemu_command: str = _spec(
        "", doc="Destination QEMU command template ({vm_id} substituted); the agent adds QMP and "
                "'-incoming defer -S'. '' = the management layer starts it and passes dest_qmp.")
    live_downtime_ms: int = _spec(300, lo=1, hi=600_000, doc="Live migration downtime target (ms).")
    live_policy: str = _spec(
        "auto-converge", doc="Convergence: precopy | auto-converge | postcopy-after:<N>s|<N>i. "
                             "Once postcopy starts the destination runs: a broken link then means "
                             "postcopy recovery or a lost VM, never a rollback.")

    @property
    def allowed_dest_dirs(self) -> list[Path]:
        """Where peers may write images: dest_dirs, or state_dir/images when none are set."""
        return _dirs(self.dest_dirs, self.state_dir)

    @property
    def allowed_source_dirs(self) -> list[Path]:
        """What the admin API may send away: source_dirs, or state_dir/images when none are set."""
        return _dirs(self.source_dirs, self.state_dir)

    @property
    def psk_bytes(self) -> bytes:
        """The pre-shared key, read from psk_file when that is set."""
        if self.psk_file:
            try:
                return Path(self.psk_file).read_bytes().strip()
            except OSError as exc:
                raise ConfigError("psk_file", f"cannot read {self.psk_file}: {exc.strerror}") from exc
        return self.psk.encode()


def _dirs(configured: list[str], state_dir: str) -> list[Path]:
    return [Path(d).resolve() for d in (configured or [str(Path(state_dir) / "images")])]


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}


def parse_size(text: str) -> int:
    """'1MiB', '512k', '4096' -> bytes (binary units)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r}")
    unit = (match.group(2) or "").lower()[:1]
    return int(float(match.group(1)) * _UNITS[unit])


def _coerce(key: str, value: Any) -> Any:
    spec = FIELDS[key]
    meta = spec.metadata
    if key == "stream_count" and isinstance(value, str) and value.strip().lower() == "auto":
        value = "0"  # the documented spelling of "tuned online"
    kind = spec.type
    try:
        if kind == "bool":
            if isinstance(value, bool):
                result: Any = value
            elif isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                result = True
            elif isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                result = False
            else:
                raise ValueError(f"expected a boolean, got {value!r}")
        elif kind == "int":
            if isinstance(value, (bool, float)):
                raise ValueError(f"expected an integer, got {value!r}")
            if isinstance(value, str):
                result = parse_size(value) if meta["size"] else int(value.strip())
            elif isinstance(value, int):
                result = value
            else:
                raise ValueError(f"expected an integer, got {type(value).__name__}")
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ValueError(f"expected a number, got {value!r}")
            result = float(value)
        elif kind == "list[str]":
            if isinstance(value, str):
                result = [item.strip() for item in value.split(",") if item.strip()]
            elif isinstance(value, list) and all(isinstance(item, str) for item in value):
                result = list(value)
            else:
                raise ValueError(f"expected a list of strings, got {value!r}")
        else:
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {type(value).__name__}")
            result = value
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None
    if meta["choices"] and result not in meta["choices"]:
        raise ConfigError(key, f"{result!r} is not one of {', '.join(meta['choices'])}")
    if meta["lo"] is not None and result < meta["lo"]:
        raise ConfigError(key, f"{result} is below the minimum {meta['lo']}")
    if meta["hi"] is not None and result > meta["hi"]:
        raise ConfigError(key, f"{result} is above the maximum {meta['hi']}")
    return result


def _validate(config: Config) -> Config:
    if config.chunk_size % PAGE_SIZE:
        raise ConfigError("chunk_size", f"{config.chunk_size} is not a whole number of {PAGE_SIZE}-byte pages")
    if config.max_inflight_bytes < config.chunk_size:
        raise ConfigError("max_inflight_bytes", "must hold at least one chunk")
    return config


def env_overrides(environ: Mapping[str, str]) -> dict[str, str]:
    """Keys set through the environment: the ops-guide names and DWCP_<KEY>."""
    found: dict[str, str] = {}
    for name, value in environ.items():
        if name in ENV_ALIASES:
            found[ENV_ALIASES[name]] = value
        elif name.startswith("DWCP_") and name != "DWCP_CONFIG":
            key = name[5:].lower()
            if key not in FIELDS:
                raise ConfigError(key, f"unknown key (from environment variable {name})")
            found[key] = value
    return found


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Keys of a YAML config file; anything but a mapping is an error."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("config", f"{path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping of keys to values")
    return {str(k): v for k, v in data.items()}


def load_config(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults < YAML (`path` or $DWCP_CONFIG) < environment < `overrides` (flags)."""
    environ = os.environ if environ is None else environ
    layers: list[dict[str, Any]] = []
    path = path or environ.get("DWCP_CONFIG") or None
    if path:
        layers.append(read_yaml(path))
    layers.append(env_overrides(environ))
    layers.append({k: v for k, v in (overrides or {}).items() if v is not None})
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key not in FIELDS:
                raise ConfigError(key, "unknown key")
            values[key] = _coerce(key, value)
    return _validate(Config(**values))
