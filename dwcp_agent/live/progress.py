"""The live-migration progress line and summary of `dwcp-agent migrate --vm`."""

from __future__ import annotations

from typing import Any

from dwcp_agent.progress import human_bytes, human_rate

__all__ = ["progress_line", "summary"]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def progress_line(m: dict[str, Any]) -> str:
    """Phase, iteration, remaining, dirty rate, predicted bandwidth, expected downtime, action,
    switchover, commit: what an operator watches while a VM moves."""
    predicted = m.get("predicted_bytes_per_s")
    return (f"{m['phase']:<10} iter {m['iteration']:>3}  remaining {human_bytes(m['remaining_bytes'])}  "
            f"dirty {human_rate(m['dirty_bytes_per_s'])}  "
            f"predicted {human_rate(predicted) if predicted else '-'}  "
            f"expected downtime {_ms(m['expected_downtime_ms'])}  "
            f"action {m['convergence_action'] or '-'}  "
            f"switchover {'yes' if m['switchover'] else 'no'}  commit {'yes' if m['committed'] else 'no'}")


def summary(m: dict[str, Any], guest_gap_ms: float | None = None) -> str:
    """Total time, downtime (QEMU's and, when known, the guest's), wire bytes, ratio, iterations,
    and whether postcopy or throttling was used."""
    lines = [
        f"live migration {m['id']} of {m['vm_id']}: {m['phase']}"
        + (f" ({m['error']})" if m.get("error") else ""),
        f"  total time      {m['duration_s']:.2f} s",
        f"  downtime        {_ms(m['downtime_ms'])} (QEMU)"
        + ("" if guest_gap_ms is None else f", {guest_gap_ms:.0f} ms (guest heartbeat gap)"),
        f"  wire bytes      {human_bytes(m['wire_bytes'])} for {human_bytes(m['stream_bytes'])} of stream "
        f"(ratio {m['ratio'] or 1.0:.2f})",
        f"  iterations      {m['iteration']}",
        f"  policy          {m['policy']}; postcopy {'used' if m['postcopy_used'] else 'not used'}, "
        f"throttling {'used' if m['throttle_used'] else 'not used'}",
        f"  ownership       {'committed to ' + m['destination_node'] if m['committed'] else 'unchanged (source)'}",
    ]
    actions = [a["action"] for a in m.get("actions", [])]
    if actions:
        lines.append(f"  actions         {', '.join(actions)}")
    return "\n".join(lines)
