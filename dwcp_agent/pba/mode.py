"""Network mode detection: datacenter / internet / hybrid, stable enough to act on.

Ops-guide meaning: datacenter = RTT < 10 ms and >= 1 Gbit/s; internet = RTT > 50 ms, or
< 1 Gbit/s, or loss > 1 %; hybrid in between (see Thresholds for how the boundaries are read).
RTT is the path's propagation RTT (TCP min_rtt), not the queue-inflated smoothed RTT.
The mode switches codecs, stream counts and encryption, so flapping costs more than a late
switch: a new mode must hold for `confirm_s`, leaving the current mode needs the metric past
its threshold by `margin` (hysteresis), and after a switch the mode dwells at least
`min_dwell_s`. The very first decision only needs `first_s` of agreeing samples. Time comes in
with each observation; nothing here reads a clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from dwcp_agent.pba.probe import LinkSample
from dwcp_agent.telemetry.metrics import MODES, Metrics

__all__ = ["DATACENTER", "HYBRID", "INTERNET", "ModeDetector", "Thresholds", "classify"]

DATACENTER, INTERNET, HYBRID = "datacenter", "internet", "hybrid"
GBIT = 1e9 / 8  # bytes/s


@dataclass(frozen=True)
class Thresholds:
    """Rule thresholds (bytes/s, seconds, fraction) and the hysteresis margin.

    `bw_tolerance`: a nominal 1 Gbit/s path delivers ~94 % of that as TCP goodput, so capacity
    within this fraction below the threshold still counts as reaching it. `rtt_tolerance`: the
    same for the internet RTT bound, which is taken as inclusive: the ops guide's own internet
    profile is exactly 50 ms, 1 Gbit/s, 0.1 % loss, on every boundary of the literal rule, and
    a path measured at its nominal numbers belongs to the profile it was named for.
    """

    dc_max_rtt_s: float = 0.010
    dc_min_bps: float = GBIT
    inet_rtt_s: float = 0.050
    inet_max_bps: float = GBIT
    inet_loss: float = 0.01
    bw_tolerance: float = 0.10
    rtt_tolerance: float = 0.02
    margin: float = 0.20


def classify(rtt_s: float, capacity_bps: float | None, loss: float, current: str | None = None,
             th: Thresholds = Thresholds()) -> str:
    """The rule applied to one set of measurements; `current` widens the bounds of staying in it.

    `capacity_bps` None means unknown (no busy interval yet): RTT and loss decide alone.
    """
    def stay(mode: str) -> float:
        return th.margin if current == mode else 0.0

    # Internet: any one of its conditions; leaving it needs them all cleared by the margin.
    m = stay(INTERNET)
    bw_floor = th.inet_max_bps * (1 - th.bw_tolerance)
    if (rtt_s >= th.inet_rtt_s * (1 - th.rtt_tolerance) * (1 - m)
            or (capacity_bps is not None and capacity_bps < bw_floor * (1 + m))
            or loss > th.inet_loss * (1 - m)):
        return INTERNET
    m = stay(DATACENTER)
    dc_floor = th.dc_min_bps * (1 - th.bw_tolerance)
    if rtt_s < th.dc_max_rtt_s * (1 + m) and (capacity_bps is None or capacity_bps >= dc_floor * (1 - m)):
        return DATACENTER
    return HYBRID


class ModeDetector:
    """Feeds per-interval measurements through a sliding window into `classify`, with dwell."""

    def __init__(self, thresholds: Thresholds = Thresholds(), window_s: float = 3.0, confirm_s: float = 2.0,
                 first_s: float = 1.0, min_dwell_s: float = 60.0, min_busy_bytes: int = 256 * 1024,
                 initial: str | None = None, metrics: Metrics | None = None) -> None:
        self.th = thresholds
        self.window_s, self.confirm_s, self.first_s, self.min_dwell_s = window_s, confirm_s, first_s, min_dwell_s
        self.min_busy_bytes = min_busy_bytes
        self.metrics = metrics
        self.mode: str | None = None
        self.switches = 0
        self._last_switch = float("-inf")
        self._candidate: str | None = None
        self._provisional = False
        self._since = 0.0
        self._window: deque[tuple[float, float, float | None, float, float]] = deque()
        if initial is not None:
            self._set(initial, 0.0, count=False)

    def seed(self, rtt_s: float, now: float) -> str | None:
        """Name a first mode from the active probe's RTT alone (capacity unknown), so a migration
        is labelled by its path from its first byte; measurements under load confirm or change it."""
        if self.mode is None and rtt_s > 0:
            self._set(classify(rtt_s, None, 0.0, th=self.th), now, count=False)
            self._provisional = True  # the first measured decision may replace it without dwell
        return self.mode

    def update(self, sample: LinkSample) -> str | None:
        """Take one LinkSample (its `t` is the time); returns the mode after it.

        RTT here is the path's, TCP's min_rtt: under load the smoothed RTT mostly measures the
        queue our own streams build (a 5 ms path reads 20-90 ms at full speed on the test bed).
        """
        busy = sample.acked_bytes >= self.min_busy_bytes
        capacity = sample.capacity_bps if busy else None
        rtt = sample.min_rtt_s if sample.min_rtt_s > 0 else sample.rtt_s
        if sample.acked_bytes == 0:
            rtt = 0.0
        return self.observe(sample.t, rtt, capacity, sample.loss, float(sample.acked_bytes))

    def observe(self, now: float, rtt_s: float, capacity_bps: float | None, loss: float,
                weight: float = 1.0) -> str | None:
        """One interval's RTT (0 = no ack seen), capacity (None = unknown) and loss at time `now`."""
        if rtt_s > 0:
            self._window.append((now, rtt_s, capacity_bps, loss, max(weight, 1.0)))
        while self._window and self._window[0][0] < now - self.window_s:
            self._window.popleft()
        if not self._window:
            return self.mode
        raw = classify(*self._aggregate(), current=self.mode, th=self.th)
        if raw == self.mode:
            self._candidate = None
            self._provisional = False
            return self.mode
        if raw != self._candidate:
            self._candidate, self._since = raw, now
        first = self.mode is None or self._provisional
        needed = self.first_s if first else self.confirm_s
        dwell_ok = first or now - self._last_switch >= self.min_dwell_s
        if now - self._since >= needed and dwell_ok:
            self._set(raw, now, count=not first)
        return self.mode

    def _aggregate(self) -> tuple[float, float | None, float]:
        """Window RTT (least-queued interval), capacity (best busy interval), weighted loss."""
        rtt = min(r for _, r, _, _, _ in self._window)
        caps = [c for _, _, c, _, _ in self._window if c is not None]
        total = sum(w for *_, w in self._window)
        loss = sum(lo * w for _, _, _, lo, w in self._window) / total
        return rtt, (max(caps) if caps else None), loss

    def _set(self, mode: str, now: float, count: bool) -> None:
        if count and self.metrics is not None:
            self.metrics.mode_switches.labels(self.mode, mode).inc()
        if count:
            self.switches += 1
        self.mode, self._last_switch, self._candidate, self._provisional = mode, now, None, False
        if self.metrics is not None:
            for name in MODES:
                self.metrics.current_mode.labels(name).set(1 if name == mode else 0)
