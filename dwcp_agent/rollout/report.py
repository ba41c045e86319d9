"""Monthly SLA report (the ops guide's template) from the Prometheus HTTP API.

Every number comes from the recording rules in deploy/prometheus (`sla:*:5m`,
`instance:dwcp_v3_unavailable`) and the agents' counters, averaged or summed over the calendar
month (UTC) up to now if the month is still running. The report states the period its data
covers (first to last scrape of an agent) and never extrapolates beyond it; downtime is time an
agent was down or not ready, not a function of migration success. Incidents are the critical
alerts that fired in the month, read from Prometheus' own `ALERTS` series. A figure Prometheus
has no data for prints as "n/a" and is never guessed.
"""

from __future__ import annotations

import calendar
import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

__all__ = ["PrometheusError", "Report", "build_report", "month_range", "render"]

TARGETS = {"availability": 0.999, "latency_p99_s": 0.1, "error_rate": 0.01, "throughput": 2.4e9}


class PrometheusError(RuntimeError):
    """Prometheus could not be reached or refused a query."""


@dataclass(frozen=True)
class Report:
    """The report's numbers (`data`, JSON-able) and its markdown rendering."""

    data: dict[str, Any]
    markdown: str


def month_range(month: str) -> tuple[float, float]:
    """'2025-11' -> (start, end) Unix times of that UTC calendar month."""
    match = re.fullmatch(r"(\d{4})-(\d{2})", month)
    if not match or not 1 <= int(match.group(2)) <= 12:
        raise ValueError(f"expected YYYY-MM, got {month!r}")
    year, mon = int(match.group(1)), int(match.group(2))
    days = calendar.monthrange(year, mon)[1]
    start = calendar.timegm((year, mon, 1, 0, 0, 0))
    return float(start), float(start + days * 86400)


class Prometheus:
    """The two query endpoints of the Prometheus HTTP API."""

    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def _get(self, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("error", exc.reason)
            except ValueError:
                detail = exc.reason
            raise PrometheusError(f"Prometheus refused {params.get('query')!r}: {detail}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise PrometheusError(f"cannot query Prometheus at {self.url}: {getattr(exc, 'reason', exc)}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"Prometheus error for {params.get('query')!r}: {body.get('error')}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def scalar(self, query: str, at: float) -> float | None:
        """First sample's value of an instant query, None when empty or NaN."""
        result = self._get("/api/v1/query", {"query": query, "time": f"{at:.3f}"})
        if not result:
            return None
        value = float(result[0]["value"][1])
        return None if math.isnan(value) else value

    def range(self, query: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """Matrix result of a range query."""
        return self._get("/api/v1/query_range", {"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                                 "step": f"{step:.0f}"})


def _incidents(prom: Prometheus, start: float, end: float) -> list[dict[str, Any]]:
    """Firing periods of critical alerts: consecutive samples of ALERTS, split at gaps."""
    step = max(60.0, math.ceil((end - start) / 10000))
    found: list[dict[str, Any]] = []
    for series in prom.range('ALERTS{alertstate="firing",severity="critical"}', start, end, step):
        times = [float(t) for t, _ in series["values"]]
        run_start = prev = times[0]
        for t in [*times[1:], math.inf]:
            if t - prev > step * 1.5:
                found.append({"alertname": series["metric"].get("alertname", "?"), "start": run_start,
                              "duration_s": prev - run_start + step})
                run_start = t
            prev = t
    return sorted(found, key=lambda i: i["start"])


def build_report(url: str, start: float, end: float, now: float | None = None) -> Report:
    """Query Prometheus for the month [start, end) and render the report."""
    now = time.time() if now is None else now
    at = min(end, now)
    seconds = int(at - start)
    if seconds <= 0:
        raise PrometheusError("the month has not started yet")
    prom = Prometheus(url)
    window = f"[{seconds}s]"

    def avg(rule: str) -> float | None:
        return prom.scalar(f"avg_over_time({rule}{window})", at)

    def avg_max(rule: str) -> float | None:
        """The least available agent's average over the month."""
        return prom.scalar(f"max(avg_over_time({rule}{window}))", at)

    def total(series: str) -> float | None:
        return prom.scalar(f"sum(increase({series}{window}))", at)

    # The period the data covers: the first and last scrape of any agent inside the month. Every
    # figure is for that period only; nothing is extrapolated to the rest of the month.
    up = 'timestamp(up{job="dwcp-agent"})'
    data_from = prom.scalar(f"min(min_over_time({up}[{seconds}s:60s]))", at)
    data_to = prom.scalar(f"max(max_over_time({up}[{seconds}s:60s]))", at)
    covered = max(0.0, data_to - data_from) if data_from is not None and data_to is not None else 0.0
    unavailable = avg_max("instance:dwcp_v3_unavailable")
    availability = avg("sla:availability:5m")
    migration_seconds = total("dwcp_v3_migration_duration_seconds_sum")
    migrations_timed = total("dwcp_v3_migration_duration_seconds_count")
    data: dict[str, Any] = {
        "month": time.strftime("%Y-%m", time.gmtime(start)),
        "from": start, "to": at, "complete_month": at >= end,
        "data_from": data_from, "data_to": data_to, "covered_s": covered,
        "availability": availability,
        "latency_p99_s": avg("sla:latency_p99:5m"),
        "error_rate": avg("sla:error_rate:5m"),
        "throughput_bytes_per_second": avg("sla:throughput_bytes_per_second:5m"),
        # Time an agent was down or not ready (instance:dwcp_v3_unavailable), the worst agent's;
        # never derived from migration success.
        "downtime_s": None if unavailable is None or not covered else unavailable * covered,
        "allowed_downtime_s": covered * (1.0 - TARGETS["availability"]),
        "successful_migrations": total('dwcp_v3_migrations_total{status="completed"}'),
        "failed_migrations": total('dwcp_v3_migrations_total{status!~"completed|cancelled"}'),
        "bytes_migrated": total("dwcp_v3_migrated_bytes_total"),
        "average_migration_s": (migration_seconds / migrations_timed
                                if migration_seconds is not None and migrations_timed else None),
        "byzantine_events": total("dwcp_v3_acp_byzantine_detections_total"),
        "rollbacks": total("dwcp_v3_rollbacks_total"),
        "incidents": _incidents(prom, start, at),
    }
    return Report(data, render(data))


def _fmt(value: float | None, spec: str, scale: float = 1.0, unit: str = "") -> str:
    return "n/a (no data)" if value is None else f"{value * scale:{spec}}{unit}"


def _compliance(data: dict[str, Any]) -> dict[str, bool | None]:
    def check(value: float | None, ok: bool) -> bool | None:
        return None if value is None else ok

    a, p, e, t = (data["availability"], data["latency_p99_s"], data["error_rate"],
                  data["throughput_bytes_per_second"])
    return {
        "Availability": check(a, a is not None and a >= TARGETS["availability"]),
        "Latency": check(p, p is not None and p <= TARGETS["latency_p99_s"]),
        "Error Rate": check(e, e is not None and e <= TARGETS["error_rate"]),
        "Throughput": check(t, t is not None and t >= TARGETS["throughput"]),
    }


def _recommendations(data: dict[str, Any], compliance: dict[str, bool | None]) -> list[str]:
    out: list[str] = []
    if compliance["Availability"] is False:
        out.append("Availability missed the 99.9% target: review the failed migrations "
                   "(`{job=\"dwcp-v3-logs\"} | json | migration_status=\"failed\"`) and their error types.")
    if compliance["Latency"] is False:
        out.append("P99 operation latency exceeded 100ms: check the Component Latency Heatmap for the slow "
                   "component and its resource saturation.")
    if compliance["Error Rate"] is False:
        out.append("Error rate exceeded 1%: break errors down with "
                   "`sum by (component,error_type) (increase(dwcp_v3_errors_total[30d]))`.")
    if compliance["Throughput"] is False:
        out.append("Throughput stayed under 2.4 GB/s: compare AMST stream counts and compression settings "
                   "with the datacenter baseline.")
    if data["byzantine_events"]:
        out.append("Byzantine behaviour was detected: confirm every flagged node was investigated.")
    if data["rollbacks"]:
        out.append("The rollout was rolled back this month: check it was unfrozen deliberately.")
    if None in compliance.values():
        out.append("Some SLIs had no data: check that Prometheus loads deploy/prometheus/rules and scrapes "
                   "every agent (job dwcp-agent).")
    return out or ["All SLAs met; no action required."]


def render(data: dict[str, Any]) -> str:
    """The ops guide's monthly report template, filled in."""
    year, mon = map(int, data["month"].split("-"))
    compliance = _compliance(data)
    mark = {True: ("✓", "COMPLIANT"), False: ("✗", "VIOLATION"), None: ("?", "NO DATA")}
    downtime = data["downtime_s"]
    allowed = data["allowed_downtime_s"]
    lines = [
        f"# DWCP v3 Monthly SLA Report - {calendar.month_name[mon]} {year}",
        "",
    ]
    def stamp(t: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))

    if data["data_from"] is None:
        lines += ["_Period: Prometheus holds no agent data for this month._", ""]
    else:
        lines += [f"_Period: data from {stamp(data['data_from'])} to {stamp(data['data_to'])} "
                  f"({data['covered_s'] / 86400:.1f} days"
                  f"{'' if data['complete_month'] else '; month in progress'}). Every figure covers this "
                  "period only and is not extrapolated to the month._", ""]
    lines += [
        "## Executive Summary",
        f"- **Availability**: {_fmt(data['availability'], '.3f', 100, '%')} (Target: 99.9%)",
        f"- **P99 Latency**: {_fmt(data['latency_p99_s'], '.1f', 1000, 'ms')} (Target: <100ms)",
        f"- **Error Rate**: {_fmt(data['error_rate'], '.3f', 100, '%')} (Target: <1%)",
        f"- **Throughput**: {_fmt(data['throughput_bytes_per_second'], '.0f', 1e-6, ' MB/s')} (Target: 2400 MB/s)",
        "",
        "## SLA Compliance",
        *(f"- [{mark[v][0]}] {name}: {mark[v][1]}" for name, v in compliance.items()),
        "",
        "## Downtime Analysis",
        f"- **Total Downtime**: {_fmt(downtime, '.1f', 1 / 60, ' minutes')} ({_fmt(downtime, '.0f', 1, ' seconds')})",
        f"- **Allowed Downtime**: {allowed / 60:.1f} minutes (99.9% of the period covered)",
        f"- **Remaining Budget**: {_fmt(None if downtime is None else allowed - downtime, '.1f', 1 / 60, ' minutes')}",
        "",
        "### Incidents",
    ]
    if data["incidents"]:
        for n, inc in enumerate(data["incidents"], 1):
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(inc["start"]))
            lines.append(f"{n}. {when} - {inc['duration_s'] / 60:.0f} min - {inc['alertname']}")
    else:
        lines.append("No critical alert fired.")
    tb = None if data["bytes_migrated"] is None else data["bytes_migrated"] / 1e12
    lines += [
        "",
        "## Performance Highlights",
        f"- **Successful Migrations**: {_fmt(data['successful_migrations'], '.0f')}",
        f"- **Failed Migrations**: {_fmt(data['failed_migrations'], '.0f')}",
        f"- **Total Bytes Transferred**: {_fmt(tb, '.3f', 1, ' TB')}",
        f"- **Average Migration Time**: {_fmt(data['average_migration_s'], '.2f', 1, ' seconds')}",
        f"- **Byzantine Events Detected**: {_fmt(data['byzantine_events'], '.0f')}",
        "",
        "## Recommendations",
        *(f"{n}. {text}" for n, text in enumerate(_recommendations(data, compliance), 1)),
        "",
    ]
    return "\n".join(lines)
