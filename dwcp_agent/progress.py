"""Human-readable sizes, rates and the migrate command's progress bar and summary."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_rate(bytes_per_s: float) -> str:
    """Decimal units, as network rates are quoted (GB/s)."""
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bytes_per_s >= scale:
            return f"{bytes_per_s / scale:.2f} {unit}"
    return f"{bytes_per_s:.0f} B/s"


def human_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _streams_text(live: int, done: int, total: int) -> str:
    """The live stream count; with none open, why: not yet, all being replaced, or all data sent."""
    if live:
        return str(live)
    if not done:
        return "connecting"
    return "finishing" if total and done >= total else "reconnecting"


class ProgressBar:
    """Redraws one line on a terminal; prints a line per second otherwise (logs, CI)."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = self.stream.isatty()
        self._last_print = 0.0
        self._pending = ""  # a line not yet printed (non-terminal output is rate-limited)

    def update(self, m: dict[str, Any]) -> None:
        total = m.get("total_bytes") or 0
        done = m.get("done_bytes") or 0
        rate = m.get("throughput_bytes_per_second") or 0
        frac = done / total if total else 1.0
        filled = int(frac * self.width)
        eta = human_duration((total - done) / rate) if rate else "unknown"  # no rate yet, no guess
        streams = _streams_text(m.get("streams") or 0, done, total)
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {frac * 100:5.1f}%  "
                f"{human_bytes(done)} / {human_bytes(total)}  {human_rate(rate) if rate else '-'}  ETA {eta}"
                f"  streams {streams}")
        if m.get("mode"):
            line += f"  {m['mode']}"
        if m.get("attempts", 1) > 1:
            line += f"  attempt {m['attempts']}"
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()
        elif time.monotonic() - self._last_print >= 1.0:
            self.stream.write(line + "\n")
            self._last_print = time.monotonic()
            self._pending = ""
        else:
            self._pending = line

    def finish(self) -> None:
        """End the bar; the final state is always shown."""
        if self.tty:
            self.stream.write("\n")
        elif self._pending:
            self.stream.write(self._pending + "\n")
        self.stream.flush()


def summary(m: dict[str, Any]) -> str:
    """The end-of-migration report."""
    total = m.get("total_bytes", 0)
    wire = m.get("wire_bytes", 0)
    duration = m.get("duration_s", 0) or 0
    completed = m["state"] == "completed"
    used = m.get("streams_used") or {}
    streams = (f"peak {used['peak']}, final {used['final']}, mean {used['mean']:g}" if used
               else str(m.get("streams_configured", m.get("streams", ""))))
    lines = [
        f"migration {m['id']} {m['state']}",
        f"  vm:              {m.get('vm_id', '')}",
        f"  destination:     {m.get('destination', '')}:{m.get('dest_path', '')}",
        f"  logical bytes:   {human_bytes(total)} ({total} B)",
        f"  wire bytes:      {human_bytes(wire)} ({wire} B)",
        f"  ratio:           {total / wire:.2f}x" if wire and completed else "  ratio:           -",
        f"  duration:        {duration:.2f} s",
        # A throughput only for what arrived: a failed migration moved no image.
        f"  throughput:      {human_rate(total / duration) if duration and completed else '-'} (logical)",
        f"  streams:         {streams}  attempts: {m.get('attempts', 1)}",
    ]
    if m.get("mode"):
        lines.append(f"  network mode:    {m['mode']}{'' if m.get('mode_measured', True) else ' (not measured)'}")
    if m.get("tcp_congestion"):
        lines.append(f"  tcp congestion:  {m['tcp_congestion']} ({m.get('tcp_congestion_reason', '')})")
    for retry in m.get("retries") or []:
        lines.append(f"  retried:         {retry}")
    if m.get("skipped_bytes"):
        lines.append(f"  already at dest: {human_bytes(m['skipped_bytes'])} (resumed)")
    if m["state"] == "completed":
        lines.append(f"  digest verified: yes (xxh3-128 {m.get('digest', '')})")
    else:
        lines.append(f"  error:           {m.get('error', '')} [{m.get('error_type', '')}]")
        lines.append("  source image untouched; destination path unchanged")
    return "\n".join(lines)
