"""Stream tuning: how many AMST streams, how big their buffers, which congestion control, what chunk.

One loss-based TCP flow cannot fill a long lossy path (CUBIC at 50 ms and 0.1 % loss carries
~10 Mbit/s); N flows carry roughly N times that until the path is full. The tuner starts from the
bandwidth-delay product and then climbs: it multiplies the stream count while the added streams
bring their share of goodput, steps back when they did not, and sheds streams when loss or RTT
climbs without a gain. It is a pure state machine in the style of etcd's raft: the data path feeds
it `LinkSample`s (time inside) and applies the `StreamPlan` it returns; it never touches a socket.
`apply_socket_options` is the one helper that does, for the data path to call per socket.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from dwcp_agent.config import PAGE_SIZE, Config, KiB, MiB
from dwcp_agent.pba.probe import LinkSample

__all__ = [
    "SO_MAX_PACING_RATE", "StreamPlan", "StreamTuner", "TuningLimits", "apply_socket_options",
    "available_congestion_controls", "choose_congestion", "loss_limited_rate",
]

SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
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
    settle_s: float = 1.0                 # after a change, ignore this long (new flows ramp up)
    measure_s: float = 1.5                # then average goodput over this long
    hold_s: float = 10.0                  # after a failed climb, wait before trying again
    gain_pays: float = 0.5                # added streams must bring this share of their fair share
    rtt_climb: float = 1.5                # RTT above min RTT times this (plus 5 ms) means queueing
    loss_climb: float = 0.02              # loss above this with no gain means too many flows


@dataclass(frozen=True)
class StreamPlan:
    """What the data path should run now. `buffer_bytes` and `pacing_rate` are per stream."""

    streams: int
    buffer_bytes: int
    congestion: str
    pacing_rate: int
    chunk_size: int
    reason: str


def available_congestion_controls() -> list[str]:
    """Congestion control algorithms this kernel offers (empty if unknown)."""
    try:
        return Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()
    except OSError:
        return []


def choose_congestion(requested: str, available: Sequence[str]) -> str:
    """The configured algorithm (must be offered), else BBR where offered, else the kernel default ('')."""
    if requested:
        if available and requested not in available:
            raise ValueError(f"tcp_congestion {requested!r} is not available (kernel offers: {' '.join(available)})")
        return requested
    return "bbr" if "bbr" in available else ""


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
        self.limits = limits
        cc = available_congestion_controls() if available_cc is None else list(available_cc)
        self.congestion = choose_congestion(config.tcp_congestion, cc)
        self.pinned = config.stream_count > 0
        self.rtt_s = 0.0
        self.min_rtt_s = math.inf
        self.capacity_bps = 0.0
        self.plan = self._make(config.stream_count or limits.min_streams, "default")
        # Climb state: goodput at the previous count, the phase and when it began.
        self._phase = "settle"
        self._phase_t: float | None = None
        self._acc: list[tuple[float, float]] = []   # (interval_s, bytes) in the measuring window
        self._base: tuple[int, float] | None = None  # (streams, goodput) before the last change
        self._losses: list[float] = []
        self._base_loss = 0.0

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
        return self._commit(self._make(n, f"initial: bdp {bdp / MiB:.2f} MiB, loss {loss:.4f}"))

    def step(self, sample: LinkSample) -> StreamPlan:
        """Feed one interval of measurements; returns the plan to run from now on."""
        now = sample.t
        if sample.rtt_s > 0:
            self.rtt_s = sample.rtt_s
            if sample.min_rtt_s > 0:
                self.min_rtt_s = min(self.min_rtt_s, sample.min_rtt_s)
        self.capacity_bps = max(self.capacity_bps * 0.9, sample.capacity_bps)
        if self._phase_t is None:
            self._phase_t = now
        if self.buffer_for(self.plan.streams) > self.plan.buffer_bytes * 1.25:
            self._commit(replace(self.plan, buffer_bytes=self.buffer_for(self.plan.streams)))
        if self.pinned:
            return self.plan
        lim = self.limits
        elapsed = now - self._phase_t
        if self._phase == "settle":
            if elapsed >= lim.settle_s:
                self._phase, self._phase_t, self._acc, self._losses = "measure", now, [], []
            return self.plan
        if self._phase == "hold":
            if elapsed >= lim.hold_s:
                self._phase, self._phase_t, self._acc, self._losses = "measure", now, [], []
                self._base = None
            return self.plan
        self._acc.append((sample.interval_s, float(sample.acked_bytes)))
        self._losses.append(sample.loss)
        if elapsed < lim.measure_s:
            return self.plan
        span = sum(i for i, _ in self._acc)
        goodput = sum(b for _, b in self._acc) / span if span > 0 else 0.0
        loss = sum(self._losses) / len(self._losses)
        return self._decide(now, goodput, loss)

    def _decide(self, now: float, goodput: float, loss: float) -> StreamPlan:
        lim = self.limits
        n = self.plan.streams
        queueing = self.rtt_s > self.min_rtt_s * lim.rtt_climb + 0.005
        if self._base is None:
            # First measurement at this count: try more streams unless the path is already full.
            self._base_loss = loss
            if queueing or n >= lim.max_streams:
                return self._hold(now, f"holding {n}: goodput {goodput * 8 / 1e6:.0f} Mbit/s")
            return self._grow(now, n, goodput, "probing for more streams")
        base_n, base_goodput = self._base
        gained = goodput - base_goodput
        fair_share = base_goodput / base_n * (n - base_n) if base_n else 0.0
        mbit = goodput * 8 / 1e6
        loss_climbed = loss > max(lim.loss_climb, 2 * self._base_loss)
        if n > base_n:
            if gained >= lim.gain_pays * fair_share and not loss_climbed and not (
                    queueing and gained < 0.05 * base_goodput):
                if n >= lim.max_streams:
                    return self._hold(now, f"at max {n} streams: {mbit:.0f} Mbit/s")
                self._base_loss = max(self._base_loss, loss)
                return self._grow(now, n, goodput, f"+{n - base_n} streams paid ({mbit:.0f} Mbit/s)")
            back = max(lim.min_streams, base_n if gained <= 0.05 * base_goodput else (n + base_n) // 2)
            return self._change(now, back, "hold", f"+{n - base_n} streams did not pay ({mbit:.0f} Mbit/s)")
        return self._hold(now, f"holding {n}: {mbit:.0f} Mbit/s")

    def _grow(self, now: float, n: int, goodput: float, reason: str) -> StreamPlan:
        """Double below 16 streams, then grow by half: flows ramp fast, the path fills slowly."""
        nxt = min(self.limits.max_streams, n * 2 if n < 16 else n + max(1, n // 2))
        self._base = (n, goodput)
        return self._change(now, nxt, "settle", reason)

    def _hold(self, now: float, reason: str) -> StreamPlan:
        self._base = None
        return self._change(now, self.plan.streams, "hold", reason)

    def _change(self, now: float, n: int, phase: str, reason: str) -> StreamPlan:
        self._phase, self._phase_t, self._acc, self._losses = phase, now, [], []
        if phase == "hold":
            self._base = None
        return self._commit(self._make(n, reason))

    def observe_loss_spike(self, now: float) -> StreamPlan:
        """Shed a quarter of the streams at once (the data path saw timeouts or mass retransmits)."""
        n = max(self.limits.min_streams, self.plan.streams * 3 // 4)
        return self._change(now, n, "hold", "loss spike") if not self.pinned else self.plan

    # --- plan details ----------------------------------------------------------------------
    def _make(self, n: int, reason: str) -> StreamPlan:
        lim = self.limits
        if not self.pinned:
            n = max(lim.min_streams, min(lim.max_streams, n))
        return StreamPlan(n, self.buffer_for(n), self.congestion, self.pacing_for(n),
                          self.chunk_for(n if self.pinned else max(n, self.stream_ceiling)), reason)

    @property
    def stream_ceiling(self) -> int:
        """Streams the climb may reach: chunks are fixed per attempt, so they are sized for this many."""
        loss_based = self.congestion in LOSS_BASED or not self.congestion
        return self.limits.max_streams if loss_based else min(self.limits.max_streams, 16)

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

    def chunk_for(self, n: int) -> int:
        """Chunk size: a few chunks per stream fit in max_inflight_bytes, whole pages, a power of two."""
        lim = self.limits
        budget = self.config.max_inflight_bytes // max(1, n * lim.chunks_in_flight)
        size = 1 << max(0, budget.bit_length() - 1)
        size = max(lim.min_chunk, min(lim.max_chunk, size, self.config.max_inflight_bytes))
        return max(PAGE_SIZE, size - size % PAGE_SIZE)

    def _commit(self, plan: StreamPlan) -> StreamPlan:
        if self.config.chunk_size and plan.chunk_size == 0:
            plan = replace(plan, chunk_size=self.config.chunk_size)
        self.plan = plan
        return plan


def apply_socket_options(sock: socket.socket, buffer_bytes: int = 0, congestion: str = "",
                         pacing_rate: int = 0, receive_buffer: int = 0) -> None:
    """Set one sending stream's buffer, congestion control and pacing; works on live sockets.

    Only SO_SNDBUF is set by default: the receive window scale is fixed at connect time, so a
    receiver is better served by kernel autotuning (or `receive_buffer` before connect/listen).
    Sizes above net.core.[rw]mem_max use the *BUFFORCE options where the process may (CAP_NET_ADMIN).
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for size, force, plain in ((buffer_bytes, SO_SNDBUFFORCE, socket.SO_SNDBUF),
                               (receive_buffer, SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        if size:
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, size)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, plain, size)
    if congestion:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
        except OSError as exc:
            offered = " ".join(available_congestion_controls()) or "unknown"
            raise ValueError(f"tcp_congestion {congestion!r} is not available (kernel offers: {offered})") from exc
    if pacing_rate:
        sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, pacing_rate)
