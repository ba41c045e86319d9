"""The metric contract: every series the agent exports, declared once.

Dashboards, alert rules and tests read names from here (`CONTRACT`), so a series the ops guide
queries cannot silently disappear. Labels are low-cardinality by rule: never a VM or migration id.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from dwcp_agent import __version__

MODES = ("datacenter", "internet", "hybrid")
COMPONENTS = ("amst", "hde", "pba", "acp", "migration", "agent")
DATA_PATH_COMPONENTS = ("amst", "hde", "pba", "migration")
PROTOCOLS = ("v1", "v3")
# `cancelled` is an operator's choice and does not count against availability; `interrupted` (agent
# shut down mid-transfer, destination resumable) does. See docs/operations.md.
MIGRATION_STATUSES = ("completed", "failed", "cancelled", "interrupted", "refused")
SLA_NAMES = ("availability", "latency", "error_rate", "throughput")
ROLLBACK_REASONS = ("sla_nogo", "manual")
# Refusals a client caused (bad request, path not allowed, VM owned elsewhere, refused by the
# destination's policy, cancel): counted in dwcp_v3_errors_total under their own error_type, never
# as component errors or failed migrations, so they cannot move the SLA guard or the SLI rules.
CLIENT_ERROR_TYPES = ("bad_request", "forbidden", "vm_owned_elsewhere", "policy", "cancelled", "conflict")
# Service failures, by component: created at 0 so rate()/increase() see the first one.
SERVICE_ERROR_TYPES: dict[str, tuple[str, ...]] = {
    "migration": ("connect", "disconnected", "digest_mismatch", "internal", "io", "no_space", "ownership",
                  "probe", "rdma", "retry", "source", "streams", "unwritable", "auth", "version", "busy",
                  "malformed", "resumed_chunk_mismatch", "config", "unexpected_message"),
    "amst": ("stream_lost", "disconnected", "unknown_session", "rdma_setup", "auth", "version", "bad_header",
             "bad_frame", "checksum", "unexpected_frame"),
    "hde": ("decode",),
    "pba": ("probe",),
}
# `_created` series double every counter's series count and no rule reads them.
disable_created_metrics()

# 10 ms ... 30 min: a migration of a small disk on loopback up to a large VM over the internet.
MIGRATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800)
# 50 us ... 10 s: one chunk encode up to a slow consensus round.
COMPONENT_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)
# 1 ms ... 60 s: postcopy's switch up to a pre-copy that could not converge.
DOWNTIME_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10, 30, 60)
CONVERGENCE_ACTIONS = ("set-downtime-limit", "set-max-bandwidth", "throttle", "start-postcopy")
CONSENSUS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    """All agent metrics on one registry; one instance per agent, passed to components."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # component -> (operations, latency, data-path latency or None): `operation` runs once per
        # chunk, and a labels() lookup costs about as much as the rest of it.
        self._operation_series: dict[str, tuple[Any, Any, Any]] = {}
        # CPU, memory, file descriptors and the Python runtime, as every exporter has them.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.build_info = Gauge(
            "dwcp_v3_build_info", "Agent build; value is always 1.", ["version", "python"], registry=r
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)

        # Migrations
        # Two meanings, two metrics: a migration's wall time grows with the VM's size; one operation
        # of its data path (a chunk encode, the probe, a stream send) has a latency SLO.
        self.migration_duration = Histogram(
            "dwcp_v3_migration_duration_seconds", "Wall time of a finished migration, start to commit.",
            ["mode", "protocol"], buckets=MIGRATION_BUCKETS, registry=r,
        )
        self.migration_latency = Histogram(
            "dwcp_v3_migration_latency_seconds",
            "Latency of one operation of the migration data path (amst, hde, pba, migration), by component.",
            ["component"], buckets=COMPONENT_BUCKETS, registry=r,
        )
        self.migrations = Counter(
            "dwcp_v3_migrations", "Migrations ended, by outcome (refused: a client's mistake, not an SLA failure).",
            ["status", "mode", "protocol"], registry=r,
        )
        self.active_migrations = Gauge("dwcp_v3_active_migrations", "Migrations in progress.", registry=r)
        self.ready = Gauge(
            "dwcp_v3_ready", "1 while the agent serves (started, not stopping, no component down): "
            "downtime is time this is 0 or the agent is not up.", registry=r,
        )
        self.bytes_transferred = Counter(
            "dwcp_v3_bytes_transferred", "Wire bytes of migration payload, by direction.",
            ["direction", "mode", "transport"], registry=r,
        )
        self.logical_bytes = Counter(
            "dwcp_v3_logical_bytes", "Image bytes moved (before encoding), by direction.",
            ["direction"], registry=r,
        )
        self.throughput = Gauge(
            "dwcp_v3_throughput_bytes_per_second",
            "Logical throughput of the most recent migration (bytes/s).", ["protocol"], registry=r,
        )
        self.errors = Counter(
            "dwcp_v3_errors", "Errors by component and kind.", ["component", "error_type"], registry=r
        )

        # Components
        self.component_operations = Counter(
            "dwcp_v3_component_operations", "Operations per component.", ["component"], registry=r
        )
        self.component_errors = Counter(
            "dwcp_v3_component_errors", "Failed operations per component.", ["component"], registry=r
        )
        self.component_latency = Histogram(
            "dwcp_v3_component_latency_seconds", "Latency of one component operation.", ["component"],
            buckets=COMPONENT_BUCKETS, registry=r,
        )

        # AMST
        self.active_streams = Gauge("dwcp_v3_active_streams", "Open AMST data streams.", registry=r)
        self.amst_active_streams = Gauge(
            "dwcp_v3_amst_active_streams", "Open AMST data streams (AMST-scoped alias).", registry=r
        )
        self.amst_stream_utilization = Gauge(
            "dwcp_v3_amst_stream_utilization", "Share of time streams had data queued (0..1).", registry=r
        )
        self.amst_throughput = Gauge(
            "dwcp_v3_amst_throughput_bytes_per_second", "Wire throughput over all streams.", registry=r
        )
        self.amst_rtt = Gauge(
            "dwcp_v3_amst_rtt_seconds", "Smoothed RTT of data streams (TCP_INFO).", registry=r
        )
        self.amst_retransmits = Counter(
            "dwcp_v3_amst_retransmits", "TCP segments retransmitted on data streams.", registry=r
        )
        self.tcp_congestion_info = Gauge(
            "dwcp_v3_tcp_congestion_info",
            "Congestion control of the latest migration's data streams: 1 for the one in effect; "
            "reason config (forced), agent (chosen by the agent) or kernel_default.",
            ["algorithm", "reason"], registry=r,
        )
        self.transport_info = Gauge(
            "dwcp_v3_transport_info", "Transport in use: 1 for the active one.", ["transport"], registry=r
        )
        self.rdma_posted = Counter(
            "dwcp_v3_rdma_work_requests_posted", "RDMA work requests posted.", registry=r
        )
        self.rdma_completions = Counter(
            "dwcp_v3_rdma_completions", "RDMA completions polled.", ["status"], registry=r
        )
        self.rdma_credit_stalls = Counter(
            "dwcp_v3_rdma_credit_stalls", "Times the sender waited for receiver credits.", registry=r
        )
        self.rdma_errors = Counter("dwcp_v3_rdma_errors", "RDMA errors.", ["error_type"], registry=r)

        # HDE
        self.hde_compression_ratio = Gauge(
            "dwcp_v3_hde_compression_ratio", "Logical bytes / wire bytes of the most recent migration.",
            registry=r,
        )
        self.hde_compression_latency = Histogram(
            "dwcp_v3_hde_compression_latency_seconds", "Time to encode one chunk.",
            buckets=COMPONENT_BUCKETS, registry=r,
        )
        self.hde_pages = Counter(
            "dwcp_v3_hde_pages", "Pages encoded, by how they were sent.", ["kind"], registry=r
        )
        self.hde_codec_chunks = Counter(
            "dwcp_v3_hde_codec_chunks", "Chunks encoded, by codec.", ["codec"], registry=r
        )

        # PBA
        self.prediction_accuracy = Gauge(
            "dwcp_v3_prediction_accuracy", "1 - MAPE of bandwidth predictions over a sliding window.",
            registry=r,
        )
        self.current_mode = Gauge(
            "dwcp_v3_current_mode", "Network mode: 1 for the current one.", ["mode"], registry=r
        )
        self.mode_switches = Counter(
            "dwcp_v3_mode_switches", "Network mode changes.", ["from", "to"], registry=r
        )

        # ACP
        self.acp_consensus_latency = Histogram(
            "dwcp_v3_acp_consensus_latency_seconds", "Proposal to commit.", ["protocol"],
            buckets=CONSENSUS_BUCKETS, registry=r,
        )
        self.acp_protocol = Gauge(
            "dwcp_v3_acp_protocol", "Consensus protocol: 1 for the running one.", ["protocol"], registry=r
        )
        self.acp_leader_changes = Counter("dwcp_v3_acp_leader_changes", "Raft leader changes.", registry=r)
        self.acp_view_changes = Counter("dwcp_v3_acp_view_changes", "PBFT view changes.", registry=r)
        self.acp_commits = Counter("dwcp_v3_acp_commits", "Commands committed.", ["protocol"], registry=r)
        self.acp_byzantine_detections = Counter(
            "dwcp_v3_acp_byzantine_detections", "Byzantine behaviour detected, by reason.", ["reason"],
            registry=r,
        )
        self.acp_refused = Counter(
            "dwcp_v3_acp_refused_connections", "ACP handshakes or frames refused, by reason "
            "(counted per source address, never against the name a peer claims).", ["reason"], registry=r,
        )

        # SLA and rollout
        self.sla_compliance = Gauge(
            "dwcp_v3_sla_compliance", "1 when the SLA is met over the guard window, else 0.", ["sla"],
            registry=r,
        )
        self.rollout_percentage = Gauge(
            "dwcp_v3_rollout_percentage", "Share of migrations using protocol profile v3.", registry=r
        )
        self.rollout_frozen = Gauge(
            "dwcp_v3_rollout_frozen", "1 when rollout is frozen by rollback.", registry=r
        )
        self.rollbacks = Counter(
            "dwcp_v3_rollbacks", "Automatic or manual rollbacks.", ["reason"], registry=r
        )
        self.sla_go = Gauge(
            "dwcp_v3_sla_go", "SLA guard decision over the 5 min window: 1 GO, 0 NO-GO.", registry=r
        )
        self.sla_error_budget_remaining = Gauge(
            "dwcp_v3_sla_error_budget_remaining",
            "Share of the 30 d availability error budget not yet spent (1 = untouched, 0 = spent).",
            registry=r,
        )
        self.migrated_bytes = Counter(
            "dwcp_v3_migrated_bytes",
            "Logical bytes of completed migrations, counted when each ends; over "
            "dwcp_v3_migration_duration_seconds_sum it gives the throughput SLI.",
            ["protocol", "mode"], registry=r,
        )

        self.slo_throughput = Gauge(
            "dwcp_v3_slo_throughput_bytes_per_second",
            "Throughput SLO per network mode (config sla_throughput_*): the alerts' thresholds.",
            ["mode"], registry=r,
        )
        self.slo_latency = Gauge(
            "dwcp_v3_slo_latency_p99_seconds",
            "P99 operation latency SLO per network mode (config sla_latency_p99_*): the alerts' thresholds.",
            ["mode"], registry=r,
        )
        self.runbook_info = Gauge(
            "dwcp_v3_runbook_info", "Base URL of the runbooks (config runbook_base_url); value 1.",
            ["base_url"], registry=r,
        )

        # Live migration of running QEMU VMs (dwcp_agent/live)
        self.live_migrations = Counter(
            "dwcp_v3_live_migrations", "Live VM migrations ended, by network mode and outcome.",
            ["mode", "status"], registry=r,
        )
        self.migration_downtime = Histogram(
            "dwcp_v3_migration_downtime_seconds", "Guest downtime of a completed live migration, as QEMU reports it.",
            ["mode"], buckets=DOWNTIME_BUCKETS, registry=r,
        )
        self.live_dirty_rate = Gauge(
            "dwcp_v3_live_dirty_rate_bytes_per_second", "Guest dirty rate QEMU measured in the latest poll.",
            registry=r,
        )
        self.live_iterations = Gauge(
            "dwcp_v3_live_precopy_iterations", "Pre-copy iterations of the latest live migration so far.",
            registry=r,
        )
        self.convergence_actions = Counter(
            "dwcp_v3_convergence_actions", "Convergence decisions carried out on live migrations.",
            ["action"], registry=r,
        )

        self._prime()

    def _prime(self) -> None:
        """Create label sets the dashboards query so series exist before the first event."""
        for mode in MODES:
            self.current_mode.labels(mode).set(0)
        for component in COMPONENTS:
            self.component_operations.labels(component)
            self.component_errors.labels(component)
        for component in DATA_PATH_COMPONENTS:
            self.migration_latency.labels(component)
        for direction in ("sent", "received"):
            self.logical_bytes.labels(direction)
        for protocol in PROTOCOLS:
            self.throughput.labels(protocol)
        for kind in ("zero", "dup", "baseline", "delta", "literal"):
            self.hde_pages.labels(kind)
        # rate() and increase() miss the first increment of a series that appears at 1, so the
        # series the SLA rules divide are created at 0 up front.
        for protocol in PROTOCOLS:
            for mode in MODES:
                self.migrated_bytes.labels(protocol, mode)
            for mode in MODES:
                self.migration_duration.labels(mode, protocol)
                for status in MIGRATION_STATUSES:
                    self.migrations.labels(status, mode, protocol)
        for sla in SLA_NAMES:
            self.sla_compliance.labels(sla)
        for reason in ROLLBACK_REASONS:
            self.rollbacks.labels(reason)
        for component, kinds in SERVICE_ERROR_TYPES.items():
            for kind in kinds:
                self.errors.labels(component, kind)
        for kind in CLIENT_ERROR_TYPES:
            self.errors.labels("migration", kind)
        for mode in MODES:
            self.migration_downtime.labels(mode)
            for status in MIGRATION_STATUSES:
                self.live_migrations.labels(mode, status)
        for action in CONVERGENCE_ACTIONS:
            self.convergence_actions.labels(action)

    def error(self, component: str, error_type: str) -> None:
        """Count one error by kind; service failures also count as the component's errors (the
        SLA's error rate), refusals a client caused (CLIENT_ERROR_TYPES) do not."""
        self.errors.labels(component, error_type).inc()
        if error_type not in CLIENT_ERROR_TYPES:
            self.component_errors.labels(component).inc()

    @contextmanager
    def operation(self, component: str) -> Iterator[None]:
        """Count and time one component operation; an exception counts as a component error."""
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.component_errors.labels(component).inc()
            raise
        finally:
            elapsed = time.perf_counter() - start
            series = self._operation_series.get(component)
            if series is None:
                series = self._operation_series[component] = (
                    self.component_operations.labels(component), self.component_latency.labels(component),
                    self.migration_latency.labels(component) if component in DATA_PATH_COMPONENTS else None)
            operations, latency, data_path = series
            operations.inc()
            latency.observe(elapsed)
            if data_path is not None:
                data_path.observe(elapsed)

    def exposition(self) -> bytes:
        """Prometheus text format of every series."""
        return generate_latest(self.registry)


def contract_names() -> list[str]:
    """Names of every metric family in the contract, as Prometheus exposes them (counters with _total)."""
    names: list[str] = []
    for family in Metrics().registry.collect():
        names.append(family.name + ("_total" if family.type == "counter" else ""))
    return sorted(names)
