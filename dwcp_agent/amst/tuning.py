"""Stream tuning: how many AMST streams, how big their buffers, which congestion control, what chunk.

One loss-based TCP flow cannot fill a long lossy path (CUBIC at 50 ms and 0.1 % loss carries
~10 Mbit/s); N flows carry roughly N times that until the path is full. The tuner starts from the
bandwidth-delay product and then climbs: it multiplies the stream count while the added streams
bring their share of goodput, steps back when they did not, and sheds streams when loss or RTT
climbs without a gain. Loss-based flows on a long path start at the ceiling instead (the climb
would end there, two or three windows later) and halve while the path is full and the fewer
streams keep the goodput. It is a pure state machine in the style of etcd's raft: the data path feeds
it `LinkSample`s (time inside) and applies the `StreamPlan` it returns; it never touches a socket.
`amst.tcp.tune_socket` is the one helper that does, for the data path to call per socket.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from dwcp_agent.amst.samples import LinkSample
from dwcp_agent.amst.tcp import available_congestion_controls
from dwcp_agent.config import PAGE_SIZE, Config, KiB, MiB

__all__ = ["StreamPlan", "StreamTuner", "TuningLimits", "choose_congestion", "congestion_decision",
           "loss_limited_rate"]

LOSS_BASED = ("cubic", "reno", "htcp", "illinois", "westwood", "scalable", "highspeed")


@dataclass(frozen=True)
class TuningLimits:
    """Bounds and pacing of the climb; defaults suit one migration on a shared host."""

    min_streams: int = 2
    max_streams: int = 64
    min_buffer: int = 1 * MiB
    max_buffer: int = 64 * MiB
    min_chunk: int = 256 * KiB
    max_chunk: int = 4 * MiB
    window_per_stream: int = 1 * MiB      # initial count: one stream per this much BDP
    chunks_in_flight: int = 4             # per stream, within max_inflight_bytes
    # ... but loss-based flows sized for the full ceiling: each carries ~1 MB/s on a long path,
    # so two chunks keep it busy, and the per-chunk cost (codec sample, frame, checksum, journal,
    # ack) of 4096 chunks per GiB was ~2 s of CPU over 1024 on the internet bed.
    loss_based_chunks_in_flight: int = 2
    settle_s: float = 0.5                 # after a change, ignore this long (new flows connect, ramp)
    measure_s: float = 1.0                # then measure over this long
    settle_rtts: float = 10.0             # ... and at least this many RTTs each (slow paths ramp slowly)
    # Settling counts from when every planned stream is live (connected and handshaken: on a busy
    # host 48 TLS handshakes take seconds, and a window measured before they end sees no gain),
    # waiting at most this long for them.
    connect_wait_s: float = 5.0
    hold_s: float = 10.0                  # after a climb stopped, wait before probing again
    min_gain: float = 0.05                # more streams must raise goodput by this fraction
    rtt_climb: float = 1.25               # median RTT above min RTT x this (+ rtt_slack_s) = a queue
    rtt_slack_s: float = 0.002
    loss_climb: float = 0.02              # loss above this and 3x the loss at fewer streams = overflow
    # A loss-based flow on a long path is loss-limited to tens of Mbit/s (CUBIC at 50 ms, 0.1 %:
    # ~10, so ~110 fill 1 Gbit/s), and the probe's burst, still in slow start, cannot show the
    # path's rate. Such a path starts at the stream ceiling instead of climbing to it (each
    # climbing step costs a settle and a measuring window at a fraction of the rate), and steps
    # down (halving) while the path shows overflow and the fewer streams keep the goodput.
    long_path_rtt_s: float = 0.020


@dataclass(frozen=True)
class StreamPlan:
    """What the data path should run now. `buffer_bytes` and `pacing_rate` are per stream."""

    streams: int
    buffer_bytes: int
    congestion: str
    pacing_rate: int
    chunk_size: int
    reason: str


def choose_congestion(requested: str, available: Sequence[str]) -> str:
    """The configured algorithm (must be offered), else BBR where offered, else the kernel default ('')."""
    if requested:
        if available and requested not in available:
            raise ValueError(f"tcp_congestion {requested!r} is not available (kernel offers: {' '.join(available)})")
        return requested
    return "bbr" if "bbr" in available else ""


def congestion_decision(requested: str, chosen: str, host_default: str) -> tuple[str, str]:
    """(algorithm in effect, why) for logs, `--json` and `dwcp_v3_tcp_congestion_info`.

    BBR is preferred because it paces to the measured bottleneck instead of backing off on every
    random loss: one CUBIC flow carries ~10 Mbit/s at 50 ms and 0.1 % loss, one BBR flow fills the
    path. `tcp_congestion` in the config forces a choice either way.
    """
    if requested:
        return requested, "config"
    if chosen:
        return chosen, "agent"
    return host_default or "unknown", "kernel_default"


def loss_limited_rate(rtt_s: float, loss: float, mss: int = 1448, congestion: str = "cubic") -> float:
    """Bytes/s one loss-based flow sustains (Mathis et al., C = 1.22); inf for BBR or no loss."""
    if congestion not in LOSS_BASED or loss <= 0 or rtt_s <= 0:
        return math.inf
    return mss / rtt_s * 1.22 / math.sqrt(loss)


class StreamTuner:
    """Online stream count, buffers, congestion control and chunk size for one migration."""

    def __init__(self, config: Config, available_cc: Sequence[str] | None = None,
                 limits: TuningLimits = TuningLimits()) -> None:
        self.config = config
        # A destination with our defaults serves max_connections_per_source connections from one
        # address, the control connection among them: a stream beyond that is refused, and a plan
        # counting it would wait for it at every settle.
        ceiling = min(limits.max_streams, config.max_streams, max(1, config.max_connections_per_source - 1))
        self.limits = replace(limits, max_streams=ceiling, min_streams=min(limits.min_streams, ceiling))
        cc = available_congestion_controls() if available_cc is None else list(available_cc)
        self.congestion = choose_congestion(config.tcp_congestion, cc)
        self.pinned = config.stream_count > 0
        self.rtt_s = 0.0
        self.min_rtt_s = math.inf
        self.capacity_bps = 0.0
        self.plan = self._make(config.stream_count or limits.min_streams, "default")
        # Climb state: the phase and when it began, samples of the measuring window, and
        # (streams, goodput, loss) measured before the last increase.
        self._phase = "settle"
        self._phase_t: float | None = None
        self._changed_t: float | None = None
        self._window: list[LinkSample] = []
        self._base: tuple[int, float, float, float] | None = None
        self._stepping_down = False  # the last change removed streams (a downward probe)

    # --- decisions -------------------------------------------------------------------------
    def initial(self, rtt_s: float, bandwidth_bps: float, loss: float = 0.0) -> StreamPlan:
        """First plan from the active probe: streams from the BDP (and loss), buffers from the BDP."""
        self.rtt_s, self.min_rtt_s = rtt_s, min(self.min_rtt_s, rtt_s) if rtt_s > 0 else self.min_rtt_s
        self.capacity_bps = max(self.capacity_bps, bandwidth_bps)
        if self.pinned:
            return self._commit(self._make(self.config.stream_count, "pinned by stream_count"))
        lim = self.limits
        bdp = bandwidth_bps * rtt_s
        n = math.ceil(bdp / lim.window_per_stream) if bdp > 0 else lim.min_streams
        per_flow = loss_limited_rate(rtt_s, loss, congestion=self.congestion or "cubic")
        if math.isfinite(per_flow) and bandwidth_bps > 0:
            n = max(n, math.ceil(bandwidth_bps / per_flow))
        reason = f"initial: bdp {bdp / MiB:.2f} MiB, loss {loss:.4f}"
        if self.loss_based and rtt_s >= lim.long_path_rtt_s and n < self.stream_ceiling:
            n = self.stream_ceiling
            reason += f", loss-based flows on a {rtt_s * 1e3:.0f} ms path: from the ceiling, down if it overflows"
        return self._commit(self._make(n, reason))

    def step(self, sample: LinkSample) -> StreamPlan:
        """Feed one interval of measurements; returns the plan to run from now on."""
        now = sample.t
        if sample.rtt_s > 0:
            self.rtt_s = sample.rtt_s
            if sample.min_rtt_s > 0:
                self.min_rtt_s = min(self.min_rtt_s, sample.min_rtt_s)
        self.capacity_bps = max(self.capacity_bps * 0.9, sample.capacity_bps)
        if self.buffer_for(self.plan.streams) > self.plan.buffer_bytes * 1.25:
            self._commit(replace(self.plan, buffer_bytes=self.buffer_for(self.plan.streams)))
        if self._phase_t is None:
            self._phase_t = self._changed_t = now
        if self.pinned:
            return self.plan
        lim = self.limits
        elapsed = now - self._phase_t
        # The path's RTT, not the smoothed one: a queue (ours, or a busy host's) can inflate the
        # latter tenfold, and each settle/measure window with it.
        path_rtt = self._path_rtt()
        per_rtt = lim.settle_rtts * path_rtt
        if self._phase == "settle":
            waited = now - (self._changed_t if self._changed_t is not None else now)
            if sample.streams != self.plan.streams and waited < lim.connect_wait_s:
                # New streams still connecting, or retired ones still draining what they had sent:
                # the settle starts when the plan's count is what runs.
                self._phase_t = now
                return self.plan
            if elapsed >= max(lim.settle_s, per_rtt):
                self._start_measure(now)
            return self.plan
        if self._phase == "hold":
            if elapsed >= lim.hold_s:
                self._base = None
                self._start_measure(now)
            return self.plan
        self._window.append(sample)
        if elapsed < max(lim.measure_s, per_rtt):
            return self.plan
        return self._decide(now)

    def _start_measure(self, now: float) -> None:
        self._phase, self._phase_t, self._window = "measure", now, []

    def _decide(self, now: float) -> StreamPlan:
        """One measuring window is complete: grow, step back, or hold.

        New flows start in slow start and overshoot, so goodput right after a change is inflated;
        the decision therefore leans on what a full path does to every flow (a standing queue
        raises the median RTT, overflow raises loss) and uses goodput only to see a gain at all.
        """
        lim = self.limits
        n = self.plan.streams
        span = sum(w.interval_s for w in self._window)
        goodput = sum(w.acked_bytes for w in self._window) / span if span > 0 else 0.0
        segs_loss = [w.loss for w in self._window]
        loss = sum(segs_loss) / len(segs_loss)
        rtts = sorted(w.rtt_s for w in self._window if w.rtt_s > 0)
        median_rtt = rtts[len(rtts) // 2] if rtts else 0.0
        queueing = bool(rtts) and median_rtt > self.min_rtt_s * lim.rtt_climb + lim.rtt_slack_s
        mbit = goodput * 8 / 1e6
        app_limited = sum(w.app_limited for w in self._window) / len(self._window)
        overflow = self._path_full(n, goodput, loss, median_rtt, queueing, app_limited)
        if self._base is None:
            if overflow and n > lim.min_streams:
                return self._shrink(now, n, goodput, loss, f"path full at {n} streams: {mbit:.0f} Mbit/s, "
                                    f"rtt {median_rtt * 1e3:.1f} ms, loss {loss:.4f}", median_rtt)
            if n >= lim.max_streams:
                return self._hold(now, f"at max {n} streams: {mbit:.0f} Mbit/s, rtt {median_rtt * 1e3:.1f} ms")
            if queueing and not self._flows_add_up(n, goodput, loss):
                return self._hold(now, f"holding {n}: {mbit:.0f} Mbit/s, rtt {median_rtt * 1e3:.1f} ms")
            # Loss-limited flows with a raised RTT: the delay may be a busy host's, not a queue at
            # the bottleneck. Try more; the next window steps back if the RTT climbs further.
            return self._grow(now, n, goodput, loss, "probing for more streams", median_rtt)
        base_n, base_goodput, base_loss, base_rtt = self._base
        if self._stepping_down:
            if goodput < base_goodput * (1 - lim.min_gain):
                return self._change(now, base_n, "hold", f"-{base_n - n} streams lost goodput ({mbit:.0f} Mbit/s)")
            if overflow and n > lim.min_streams:
                return self._shrink(now, n, goodput, loss, f"-{base_n - n} streams kept {mbit:.0f} Mbit/s, "
                                    f"still full", median_rtt)
            return self._hold(now, f"-{base_n - n} streams kept {mbit:.0f} Mbit/s")
        # A queue the added streams built: RTT above the path's and above what it was before them
        # (a busy host inflates both windows alike; only the rise is the new streams' doing).
        queueing = queueing and median_rtt > base_rtt * lim.rtt_climb + lim.rtt_slack_s
        if queueing:
            return self._change(now, base_n, "hold", f"rtt climbed to {median_rtt * 1e3:.1f} ms at {n} streams")
        if loss > max(lim.loss_climb, 3 * base_loss):
            return self._change(now, base_n, "hold", f"loss climbed to {loss:.4f} at {n} streams")
        if goodput < base_goodput * (1 + lim.min_gain):
            return self._change(now, base_n, "hold", f"+{n - base_n} streams did not pay ({mbit:.0f} Mbit/s)")
        if n >= lim.max_streams:
            return self._hold(now, f"at max {n} streams: {mbit:.0f} Mbit/s")
        return self._grow(now, n, goodput, loss, f"+{n - base_n} streams paid ({mbit:.0f} Mbit/s)", median_rtt)

    def _path_full(self, n: int, goodput: float, loss: float, rtt_s: float, queueing: bool,
                   app_limited: float) -> bool:
        """Loss-based flows fill the bottleneck: a standing queue, and either loss well above random
        (overflow) or flows the sender keeps busy carrying under half what loss alone allows
        (Mathis at the measured RTT and loss: the bottleneck's rate, not random loss, limits them).
        A busy host's inflated RTT lowers that allowance with it, so it does not read as full.
        Only on long paths, where the count started at the ceiling; shorter ones climb to theirs."""
        lim = self.limits
        if not (self.loss_based and queueing and self._path_rtt() >= lim.long_path_rtt_s):
            return False
        if loss > lim.loss_climb:
            return True
        per_flow = loss_limited_rate(rtt_s or self._path_rtt(), loss, congestion=self.congestion or "cubic")
        return app_limited < 0.5 and goodput / max(1, n) < 0.5 * per_flow

    def _flows_add_up(self, n: int, goodput: float, loss: float) -> bool:
        """More flows should add linearly: loss-based flows on a long path (each backs off on every
        random loss for a whole RTT; CUBIC at 50 ms and 0.1 % carries ~10 Mbit/s), or any flow
        carrying no more than ~3x what Mathis' formula allows at the measured loss and RTT.

        The long-path rule does not lean on the measured RTT and loss: on a busy host the
        smoothed RTT inflates and the formula's rate with it falls below what CUBIC really gets.
        """
        if self.loss_based and self._path_rtt() >= self.limits.long_path_rtt_s:
            return True
        per_flow = loss_limited_rate(self.rtt_s, loss, congestion=self.congestion or "cubic")
        return math.isfinite(per_flow) and goodput / max(1, n) <= 3 * per_flow

    def _path_rtt(self) -> float:
        return self.min_rtt_s if math.isfinite(self.min_rtt_s) else self.rtt_s

    def _grow(self, now: float, n: int, goodput: float, loss: float, reason: str, rtt_s: float) -> StreamPlan:
        """Double the streams; quadruple while more flows add linearly."""
        if self._flows_add_up(n, goodput, loss):
            nxt = n * 4
            reason += f", loss-limited ({goodput / max(1, n) * 8 / 1e6:.1f} Mbit/s per stream)"
        else:
            nxt = n * 2
        self._base = (n, goodput, loss, rtt_s or self.rtt_s)
        self._stepping_down = False
        return self._change(now, min(self.limits.max_streams, nxt), "settle", reason)

    def _shrink(self, now: float, n: int, goodput: float, loss: float, reason: str, rtt_s: float) -> StreamPlan:
        """Halve the streams; the next window keeps the fewer if they carry (nearly) as much."""
        self._base = (n, goodput, loss, rtt_s or self.rtt_s)
        self._stepping_down = True
        return self._change(now, max(self.limits.min_streams, n // 2), "settle", reason)

    def _hold(self, now: float, reason: str) -> StreamPlan:
        return self._change(now, self.plan.streams, "hold", reason)

    def _change(self, now: float, n: int, phase: str, reason: str) -> StreamPlan:
        self._phase, self._phase_t, self._changed_t, self._window = phase, now, now, []
        if phase == "hold":
            self._base, self._stepping_down = None, False
        return self._commit(self._make(n, reason))

    # --- plan details ----------------------------------------------------------------------
    def _make(self, n: int, reason: str) -> StreamPlan:
        lim = self.limits
        if not self.pinned:
            n = max(lim.min_streams, min(lim.max_streams, n))
        return StreamPlan(n, self.buffer_for(n), self.congestion, self.pacing_for(n),
                          self.chunk_for(n) if self.pinned else self.ceiling_chunk(), reason)

    @property
    def loss_based(self) -> bool:
        """The streams back off on every loss (CUBIC, Reno, ... or the kernel default)."""
        return self.congestion in LOSS_BASED or not self.congestion

    @property
    def stream_ceiling(self) -> int:
        """Streams the climb may reach: chunks are fixed per attempt, so they are sized for this many."""
        return self.limits.max_streams if self.loss_based else min(self.limits.max_streams, 16)

    def buffer_for(self, n: int) -> int:
        """Per-stream send buffer: configured, else twice this stream's share of the BDP.

        The capacity estimate can only grow as fast as the buffers let traffic through; twice the
        share lets it double every interval until the path, not the buffer, is the limit.
        """
        if self.config.socket_buffer_bytes:
            return self.config.socket_buffer_bytes
        if self.capacity_bps <= 0 or self.rtt_s <= 0:
            return 0
        bdp = self.capacity_bps * max(self.rtt_s, self.min_rtt_s if math.isfinite(self.min_rtt_s) else 0)
        share = 2 * bdp / max(1, n)
        return int(max(self.limits.min_buffer, min(self.limits.max_buffer, share)))

    def pacing_for(self, n: int) -> int:
        """Per-stream SO_MAX_PACING_RATE: the configured total split evenly (0 = off)."""
        total = self.config.pacing_rate_bytes
        return max(1, total // max(1, n)) if total else 0

    def ceiling_chunk(self) -> int:
        """The tuned chunk size: fixed per attempt, so sized for the streams the climb may reach."""
        per_stream = self.limits.loss_based_chunks_in_flight if self.loss_based else None
        return self.chunk_for(self.stream_ceiling, per_stream)

    def chunk_for(self, n: int, per_stream: int | None = None) -> int:
        """Chunk size: a few chunks per stream fit in max_inflight_bytes, whole pages, a power of two."""
        lim = self.limits
        budget = self.config.max_inflight_bytes // max(1, n * (per_stream or lim.chunks_in_flight))
        size = 1 << max(0, budget.bit_length() - 1)
        size = max(lim.min_chunk, min(lim.max_chunk, size, self.config.max_inflight_bytes))
        return max(PAGE_SIZE, size - size % PAGE_SIZE)

    def _commit(self, plan: StreamPlan) -> StreamPlan:
        if self.config.chunk_size and plan.chunk_size == 0:
            plan = replace(plan, chunk_size=self.config.chunk_size)
        self.plan = plan
        return plan
