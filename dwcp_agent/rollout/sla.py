"""SLA guard: SLIs over rolling windows, error budget, GO/NO-GO, automatic rollback.

A pure state machine in the style of etcd's raft: it never reads the wall clock, starts no
thread and touches no socket. The agent feeds it

* `record_migration(status, duration_s, logical_bytes, protocol)` for every ended migration,
* `tick()` about once a second: it reads the component operation and error counters from the
  metrics registry (components count errors with `Metrics.error`),

and reads `decision`, `snapshot()` and `summary()`. Time comes from the injected `clock`.

The SLIs are defined exactly as the Prometheus recording rules in deploy/prometheus (see
docs/operations.md), so the agent's own verdict and the dashboards agree:

* availability = completed / (completed + failed) migrations (cancelled and refused ones, a
  client's doing, do not count; refusals are counted under their own error_type);
* latency p99 = 99th percentile of component operation latency (`dwcp_v3_component_latency_
  seconds`: chunk encodes, stream sends, consensus rounds), the ops guide's "all operation
  latencies". Migration wall time grows with the VM's size, so a fixed 100 ms target only makes
  sense per operation; migration wall time is reported separately (`migration_duration_*`) and
  used to compare v3 with v1. Quantiles come from the same histogram buckets Prometheus has,
  interpolated the way `histogram_quantile` does;
* error rate = (failed migrations + component errors) / (component operations + ended
  migrations, cancelled excluded), clamped to 0..1;
* throughput = logical bytes of completed migrations / their summed wall time.

Statuses other than `completed` and `cancelled` (`failed`, `interrupted` by a shutdown) count as
failures.

GO needs availability, p99 and error rate within the configured thresholds over the 5 min
window (the ops guide's GO/NO-GO query), and profile v3 not regressing against v1: v3 failure
ratio above 1.5x v1's or v3 p99 more than 30 % above v1's, each also beyond the SLA threshold
and with at least `MIN_COMPARE` migrations of each profile. An SLI with fewer than
`config.sla_min_samples` samples in the window counts as no data, and no data is GO. NO-GO held
for `config.sla_nogo_hold_s` rolls the rollout back to 0 % and freezes it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dwcp_agent.config import Config
from dwcp_agent.rollout.controller import RolloutController
from dwcp_agent.telemetry.metrics import COMPONENT_BUCKETS, MIGRATION_BUCKETS, PROTOCOLS, Metrics

__all__ = ["WINDOWS", "SlaGuard", "Tally", "histogram_quantile"]

log = logging.getLogger("dwcp_agent.rollout.sla")

# name -> (length, slice) in seconds. A window is its whole slices plus the current partial one,
# so memory stays bounded (under 200 slices per window) however many migrations run.
WINDOWS: dict[str, tuple[float, float]] = {
    "5m": (300.0, 10.0),
    "1h": (3600.0, 60.0),
    "24h": (86400.0, 900.0),
    "7d": (604800.0, 3600.0),
    "30d": (2592000.0, 14400.0),
}
DECISION_WINDOW = "5m"
BUDGET_WINDOW = "30d"
MIN_COMPARE = 10
V3_FAILURE_FACTOR = 1.5
V3_LATENCY_FACTOR = 1.3


def histogram_quantile(q: float, bounds: Iterable[float], counts: list[int] | list[float]) -> float | None:
    """Quantile of a histogram with per-bucket (non-cumulative) `counts`, the last one +Inf.

    Same linear interpolation as Prometheus' `histogram_quantile`, so the guard's p99 equals the
    recording rule's over the same migrations; None when the histogram is empty.
    """
    uppers = [*bounds, math.inf]
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    cumulative = 0.0
    for i, count in enumerate(counts):
        if cumulative + count >= rank and count > 0:
            upper = uppers[i]
            if math.isinf(upper):
                return uppers[i - 1] if i > 0 else None
            lower = uppers[i - 1] if i > 0 else 0.0
            return lower + (upper - lower) * (rank - cumulative) / count
        cumulative += count
    return uppers[-2]


def _new_counts() -> list[int]:
    return [0] * (len(MIGRATION_BUCKETS) + 1)


def _new_op_counts() -> list[float]:
    return [0.0] * (len(COMPONENT_BUCKETS) + 1)


@dataclass
class ProfileTally:
    """Ended migrations of one protocol profile within a slice."""

    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    refused: int = 0
    logical_bytes: int = 0
    seconds: float = 0.0
    latency: list[int] = field(default_factory=_new_counts)

    def add(self, other: ProfileTally) -> None:
        """Accumulate `other` into this tally."""
        self.completed += other.completed
        self.failed += other.failed
        self.cancelled += other.cancelled
        self.refused += other.refused
        self.logical_bytes += other.logical_bytes
        self.seconds += other.seconds
        self.latency = [a + b for a, b in zip(self.latency, other.latency, strict=True)]

    @property
    def ended(self) -> int:
        """Migrations that count for availability: completed or failed."""
        return self.completed + self.failed

    def failure_ratio(self) -> float | None:
        """failed / (completed + failed), None without migrations."""
        return self.failed / self.ended if self.ended else None

    def p(self, q: float) -> float | None:
        """Latency quantile in seconds."""
        return histogram_quantile(q, MIGRATION_BUCKETS, self.latency)


@dataclass
class Tally:
    """Everything the SLIs need for one slice of time, or for a whole window once summed."""

    profiles: dict[str, ProfileTally] = field(
        default_factory=lambda: {p: ProfileTally() for p in PROTOCOLS}
    )
    errors: float = 0.0
    operations: float = 0.0
    op_latency: list[float] = field(default_factory=_new_op_counts)

    def add(self, other: Tally) -> None:
        """Accumulate `other` into this tally."""
        for name, tally in other.profiles.items():
            self.profiles.setdefault(name, ProfileTally()).add(tally)
        self.errors += other.errors
        self.operations += other.operations
        self.op_latency = [a + b for a, b in zip(self.op_latency, other.op_latency, strict=True)]

    @property
    def all(self) -> ProfileTally:
        """Both profiles together."""
        total = ProfileTally()
        for tally in self.profiles.values():
            total.add(tally)
        return total

    def slis(self) -> dict[str, float | None]:
        """The four SLIs plus latency quantiles; None where there is nothing to measure."""
        every = self.all
        denominator = self.operations + every.ended
        error_rate = None
        if denominator > 0:
            error_rate = min(1.0, max(0.0, (every.failed + self.errors) / denominator))
        return {
            "availability": every.completed / every.ended if every.ended else None,
            "latency_p50_s": histogram_quantile(0.5, COMPONENT_BUCKETS, self.op_latency),
            "latency_p95_s": histogram_quantile(0.95, COMPONENT_BUCKETS, self.op_latency),
            "latency_p99_s": histogram_quantile(0.99, COMPONENT_BUCKETS, self.op_latency),
            "migration_duration_p50_s": every.p(0.5),
            "migration_duration_p95_s": every.p(0.95),
            "migration_duration_p99_s": every.p(0.99),
            "error_rate": error_rate,
            "throughput_bytes_per_second": every.logical_bytes / every.seconds if every.seconds > 0 else None,
        }


class Window:
    """A rolling window made of fixed slices."""

    def __init__(self, length: float, slice_s: float) -> None:
        self.length = length
        self.slice_s = slice_s
        self._slices: deque[tuple[float, Tally]] = deque()

    def current(self, now: float) -> Tally:
        """The slice `now` falls in, created on demand; slices older than the window drop."""
        start = math.floor(now / self.slice_s) * self.slice_s
        if not self._slices or self._slices[-1][0] < start:
            self._slices.append((start, Tally()))
        while self._slices and self._slices[0][0] <= now - self.length - self.slice_s:
            self._slices.popleft()
        return self._slices[-1][1]

    def total(self, now: float) -> Tally:
        """Sum of the slices that overlap (now - length, now]."""
        total = Tally()
        for start, tally in self._slices:
            if start + self.slice_s > now - self.length:
                total.add(tally)
        return total


class SlaGuard:
    """SLIs, error budget and GO/NO-GO; rolls the rollout back on a held NO-GO."""

    def __init__(self, config: Config, metrics: Metrics, clock: Callable[[], float] = time.time,
                 rollout: RolloutController | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self._clock = clock
        self.rollout = rollout if rollout is not None else RolloutController(config, metrics, clock)
        self.windows = {name: Window(length, step) for name, (length, step) in WINDOWS.items()}
        self.events: deque[dict[str, Any]] = deque(maxlen=200)
        self.decision = "GO"
        self.violations: list[str] = []
        self.nogo_since: float | None = None
        self._counter_totals: dict[str, float] | None = None
        self._lock = threading.RLock()
        self.publish_slos()
        self.tick()

    # -- inputs ---------------------------------------------------------------------------

    def record_migration(self, status: str, duration_s: float, logical_bytes: int,
                         protocol: str = "v3", mode: str = "datacenter") -> None:
        """Account one ended migration (`completed`, `cancelled`; anything else is a failure).

        For a completed one also counts `dwcp_v3_migrated_bytes_total` (the throughput SLI's
        numerator). `dwcp_v3_migrations_total` and the latency histogram are the caller's: the
        migration manager observes latency for completed migrations only, and so does the guard.
        Thread-safe: the manager calls it from migration threads.
        """
        with self._lock:
            now = self._clock()
            self._sample_counters(now)
            completed = status == "completed"
            duration_s = max(0.0, duration_s)
            index = next((i for i, b in enumerate(MIGRATION_BUCKETS) if duration_s <= b), len(MIGRATION_BUCKETS))
            for window in self.windows.values():
                tally = window.current(now).profiles.setdefault(protocol, ProfileTally())
                if completed:
                    tally.completed += 1
                    tally.logical_bytes += logical_bytes
                    tally.seconds += duration_s
                    tally.latency[index] += 1
                elif status == "cancelled":
                    tally.cancelled += 1
                elif status == "refused":
                    tally.refused += 1
                else:
                    tally.failed += 1
            if completed:
                self.metrics.migrated_bytes.labels(protocol, mode).inc(logical_bytes)
            self._evaluate(now)

    def tick(self) -> None:
        """Advance time: read the counters, re-evaluate, roll back on a held NO-GO."""
        with self._lock:
            now = self._clock()
            self._sample_counters(now)
            self._evaluate(now)

    # -- outputs --------------------------------------------------------------------------

    def window_slis(self, name: str = DECISION_WINDOW) -> dict[str, float | None]:
        """SLIs of one window (`5m`, `1h`, `24h`, `7d`, `30d`)."""
        with self._lock:
            return self.windows[name].total(self._clock()).slis()

    def compliance(self, slis: dict[str, float | None], tally: Tally | None = None) -> dict[str, str]:
        """`met`, `violated` or `no_data` per SLA for the given SLIs; with the window's `tally`, an
        SLI with fewer than `sla_min_samples` samples is `no_data` (3 failures of 6 say little)."""
        c = self.config
        if tally is not None:
            every = tally.all
            samples = {"availability": every.ended, "error_rate": every.ended + tally.operations,
                       "latency_p99_s": sum(tally.op_latency), "throughput_bytes_per_second": every.completed}
            slis = {k: (None if k in samples and samples[k] < c.sla_min_samples else v) for k, v in slis.items()}

        def judge(value: float | None, ok: Callable[[float], bool]) -> str:
            if value is None:
                return "no_data"
            return "met" if ok(value) else "violated"

        return {
            "availability": judge(slis["availability"], lambda v: v >= c.sla_availability),
            "latency": judge(slis["latency_p99_s"], lambda v: v <= c.sla_latency_p99_s),
            "error_rate": judge(slis["error_rate"], lambda v: v <= c.sla_error_rate),
            "throughput": judge(slis["throughput_bytes_per_second"], lambda v: v >= c.sla_throughput_bytes),
        }

    def error_budget(self) -> dict[str, Any]:
        """Availability budget over 30 days: failures allowed by the target vs. failures seen."""
        with self._lock:
            every = self.windows[BUDGET_WINDOW].total(self._clock()).all
        allowed = (1.0 - self.config.sla_availability) * every.ended
        if every.ended == 0:
            remaining = 1.0
        elif allowed <= 0:
            remaining = 0.0 if every.failed else 1.0
        else:
            remaining = max(0.0, 1.0 - every.failed / allowed)
        return {"window": BUDGET_WINDOW, "migrations": every.ended, "failures": every.failed,
                "allowed_failures": allowed, "remaining": remaining}

    def snapshot(self) -> dict[str, Any]:
        """Everything `/api/v3/sla` shows: windows, decision, budget, rollout, events."""
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> dict[str, Any]:
        now = self._clock()
        windows: dict[str, Any] = {}
        for name, window in self.windows.items():
            tally = window.total(now)
            slis = tally.slis()
            every = tally.all
            windows[name] = {
                **slis,
                "completed": every.completed, "failed": every.failed, "cancelled": every.cancelled,
                "refused": every.refused, "errors": tally.errors, "operations": tally.operations,
                "compliance": self.compliance(slis, tally),
            }
        hold = self.config.sla_nogo_hold_s
        return {
            "decision": self.decision,
            "violations": list(self.violations),
            "nogo_since": self.nogo_since,
            "rollback_in_s": max(0.0, self.nogo_since + hold - now) if self.nogo_since is not None else None,
            "thresholds": {
                "availability": self.config.sla_availability,
                "latency_p99_s": self.config.sla_latency_p99_s,
                "error_rate": self.config.sla_error_rate,
                "throughput_bytes_per_second": self.config.sla_throughput_bytes,
                "nogo_hold_s": hold,
                "min_samples": self.config.sla_min_samples,
            },
            "windows": windows,
            "error_budget": self.error_budget(),
            "rollout": self.rollout.state.to_dict(),
            "events": sorted([*self.events, *self.rollout.events], key=lambda e: e["ts"]),
        }

    def summary(self) -> dict[str, Any]:
        """The `/metrics/summary` body: 5 min latency (ms), throughput, error rate, SLA status."""
        with self._lock:
            tally = self.windows[DECISION_WINDOW].total(self._clock())
        slis = tally.slis()
        compliance = self.compliance(slis, tally)
        statuses = set(compliance.values())
        status = "violated" if "violated" in statuses else ("met" if "met" in statuses else "no_data")

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000.0, 3)

        return {
            "window": DECISION_WINDOW,
            "latency_ms": {"p50": ms(slis["latency_p50_s"]), "p95": ms(slis["latency_p95_s"]),
                           "p99": ms(slis["latency_p99_s"])},
            "migration_duration_ms": {"p50": ms(slis["migration_duration_p50_s"]),
                                     "p95": ms(slis["migration_duration_p95_s"]),
                                     "p99": ms(slis["migration_duration_p99_s"])},
            "throughput_bytes_per_second": slis["throughput_bytes_per_second"],
            "error_rate": slis["error_rate"],
            "availability": slis["availability"],
            "sla_status": status,
            "compliance": compliance,
            "decision": self.decision,
            "error_budget_remaining": self.error_budget()["remaining"],
            "rollout_percentage": self.rollout.state.percentage,
        }

    # -- internals ------------------------------------------------------------------------

    def _sample_counters(self, now: float) -> None:
        """Turn the registry's operation, error and operation-latency counters into deltas."""
        totals = {
            "operations": _family_sum(self.metrics.component_operations.collect()),
            "errors": _family_sum(self.metrics.component_errors.collect()),
        }
        buckets = _bucket_counts(self.metrics.component_latency.collect())
        previous = self._counter_totals
        self._counter_totals = {**totals, **{f"le{i}": v for i, v in enumerate(buckets)}}
        if previous is None:
            return
        deltas = {key: _delta(value, previous[key]) for key, value in totals.items()}
        latency = [_delta(v, previous[f"le{i}"]) for i, v in enumerate(buckets)]
        if not any(deltas.values()) and not any(latency):
            return
        for window in self.windows.values():
            tally = window.current(now)
            tally.operations += deltas["operations"]
            tally.errors += deltas["errors"]
            tally.op_latency = [a + b for a, b in zip(tally.op_latency, latency, strict=True)]

    def _violations(self, tally: Tally) -> list[str]:
        slis = tally.slis()
        found = [name for name, verdict in self.compliance(slis, tally).items()
                 if verdict == "violated" and name != "throughput"]
        v1, v3 = tally.profiles.get("v1"), tally.profiles.get("v3")
        if v1 and v3 and v1.ended >= MIN_COMPARE and v3.ended >= MIN_COMPARE:
            r1, r3 = v1.failure_ratio() or 0.0, v3.failure_ratio() or 0.0
            if r3 > self.config.sla_error_rate and r3 > V3_FAILURE_FACTOR * r1:
                found.append("v3_failure_regression")
            p1, p3 = v1.p(0.99), v3.p(0.99)
            if p1 is not None and p3 is not None and p3 > V3_LATENCY_FACTOR * p1:
                found.append("v3_latency_regression")
        return found

    def _evaluate(self, now: float) -> None:
        tally = self.windows[DECISION_WINDOW].total(now)
        violations = self._violations(tally)
        decision = "NO-GO" if violations else "GO"
        if decision != self.decision or violations != self.violations:
            self.events.append({"ts": now, "event": "decision", "decision": decision,
                                "violations": violations})
            if decision != self.decision:
                level = logging.WARNING if decision == "NO-GO" else logging.INFO
                log.log(level, "SLA guard: %s (%s)", decision, ", ".join(violations) or "all SLAs met",
                        extra={"component": "sla", "event": "decision", "decision": decision,
                               "violations": violations})
        self.decision, self.violations = decision, violations
        if decision == "GO":
            self.nogo_since = None
        elif self.nogo_since is None:
            self.nogo_since = now
        self._export(tally)
        state = self.rollout.state
        if (self.nogo_since is not None and now - self.nogo_since >= self.config.sla_nogo_hold_s
                and state.enable_v3 and state.percentage > 0 and not state.frozen):
            self.rollout.rollback("sla_nogo", by=self.config.node_id,
                                  detail=f"after NO-GO held {now - self.nogo_since:.0f}s: "
                                         + ", ".join(violations))
        self.rollout.sync_metrics()

    def publish_slos(self) -> None:
        """The per-mode throughput and latency SLOs and the runbook base URL, for the alert rules."""
        c = self.config
        for mode, value in (("datacenter", c.sla_throughput_bytes), ("internet", c.sla_throughput_internet_bytes),
                            ("hybrid", c.sla_throughput_hybrid_bytes)):
            self.metrics.slo_throughput.labels(mode).set(value)
        for mode, value in (("datacenter", c.sla_latency_p99_s), ("internet", c.sla_latency_p99_internet_s),
                            ("hybrid", c.sla_latency_p99_hybrid_s)):
            self.metrics.slo_latency.labels(mode).set(value)
        self.metrics.runbook_info.clear()
        self.metrics.runbook_info.labels(c.runbook_base_url.rstrip("/")).set(1)

    def _export(self, tally: Tally) -> None:
        for name, verdict in self.compliance(tally.slis(), tally).items():
            self.metrics.sla_compliance.labels(name).set(0 if verdict == "violated" else 1)
        self.metrics.sla_go.set(1 if self.decision == "GO" else 0)
        self.metrics.sla_error_budget_remaining.set(self.error_budget()["remaining"])


def _family_sum(families: Iterable[Any]) -> float:
    """Sum of a counter's `_total` samples over all label sets."""
    return sum(s.value for fam in families for s in fam.samples if s.name.endswith("_total"))


def _bucket_counts(families: Iterable[Any]) -> list[float]:
    """Per-bucket (non-cumulative) counts of a histogram, summed over all label sets."""
    bounds = [*COMPONENT_BUCKETS, math.inf]
    cumulative = [0.0] * len(bounds)
    for fam in families:
        for sample in fam.samples:
            if sample.name.endswith("_bucket"):
                cumulative[bounds.index(float(sample.labels["le"]))] += sample.value
    return [c - (cumulative[i - 1] if i else 0.0) for i, c in enumerate(cumulative)]


def _delta(value: float, previous: float) -> float:
    """Counter increase; after a reset (the registry was replaced) count from zero, as rate() does."""
    return value - previous if value >= previous else value
