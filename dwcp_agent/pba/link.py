"""One migration's view of its path: meter, predictor, mode detector and stream tuner wired together.

The data path owns sockets and threads; it calls `tick(sockets, now)` every `interval_s` and
applies the returned StreamPlan (open or retire streams, resize buffers). Everything PBA learns
is kept here so the agent can report it (`snapshot`) and HDE can ask for `mode` and `prediction`.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from dwcp_agent.amst.tcp import default_congestion_control, tune_socket
from dwcp_agent.amst.tuning import StreamPlan, StreamTuner, congestion_decision
from dwcp_agent.config import Config
from dwcp_agent.pba.mode import ModeDetector
from dwcp_agent.pba.predictor import Prediction, Predictor
from dwcp_agent.pba.probe import LinkMeter, LinkSample
from dwcp_agent.telemetry.metrics import Metrics

__all__ = ["LinkController", "LinkSnapshot"]

log = logging.getLogger("dwcp_agent.pba")


@dataclass(frozen=True)
class LinkSnapshot:
    """What PBA believes now, for logs, the admin API and the benchmarks."""

    sample: LinkSample | None
    prediction: Prediction | None
    mode: str | None
    plan: StreamPlan
    accuracy: float


class LinkController:
    """Meter -> predictor + mode detector -> tuner, fed once per interval from the data path."""

    interval_s = 0.5

    def __init__(self, config: Config, metrics: Metrics | None = None,
                 available_cc: list[str] | None = None) -> None:
        self.config = config
        self.meter = LinkMeter(metrics)
        self.predictor = Predictor(metrics=metrics)
        forced = None if config.network_mode == "auto" else config.network_mode
        self.detector = ModeDetector(initial=forced, metrics=metrics)
        self.forced_mode = forced is not None
        self.tuner = StreamTuner(config, available_cc)
        self.metrics = metrics
        self.congestion, self.congestion_reason = congestion_decision(
            config.tcp_congestion, self.tuner.congestion, default_congestion_control())
        self.last: LinkSample | None = None
        self.probe_rtt_s = 0.0
        self.probe_bandwidth_bps = 0.0
        self._lock = threading.Lock()
        self._applied: dict[Hashable, int] = {}

    @property
    def plan(self) -> StreamPlan:
        return self.tuner.plan

    @property
    def mode(self) -> str | None:
        return self.detector.mode

    def start(self, rtt_s: float, bandwidth_bps: float, now: float | None = None) -> StreamPlan:
        """Initial plan from an active probe (or from nothing: rtt 0, bandwidth 0); the probe's
        RTT also names a first mode, and its bandwidth stands in until PBA predicts one."""
        self.probe_rtt_s, self.probe_bandwidth_bps = rtt_s, bandwidth_bps
        self.publish_congestion()
        if not self.forced_mode:
            self.detector.seed(rtt_s, time.monotonic() if now is None else now)
        return self.tuner.initial(rtt_s, bandwidth_bps)

    def publish_congestion(self) -> None:
        """Say which congestion control the data streams run and why (log line and info metric)."""
        log.info("tcp congestion control: %s (%s)", self.congestion, {
            "config": "forced by tcp_congestion",
            "agent": "chosen by the agent: paces to the measured path instead of backing off on random loss",
            "kernel_default": "kernel default; BBR is not offered by this kernel"}[self.congestion_reason],
            extra={"component": "amst", "tcp_congestion": self.congestion, "reason": self.congestion_reason})
        if self.metrics is not None:
            self.metrics.tcp_congestion_info.clear()
            self.metrics.tcp_congestion_info.labels(self.congestion, self.congestion_reason).set(1)

    def bandwidth(self) -> float | None:
        """Bytes/s the codec selector should plan for: PBA's prediction, else the probe's estimate."""
        prediction = self.predictor.predict()
        if prediction is not None:
            return prediction.value
        return self.probe_bandwidth_bps or None

    def path_bandwidth(self) -> float | None:
        """Bytes/s the streams could carry now, for the codec selector: the larger of PBA's
        prediction (goodput) and the tuner's capacity (summed delivery rates). Goodput alone
        feeds back: a sender slowed by its own compression reads as a slow link, which then
        buys more compression."""
        predicted = self.bandwidth()
        capacity = self.tuner.capacity_bps
        if predicted is None:
            return capacity or None
        return max(predicted, capacity)

    def tick(self, sockets: Iterable[tuple[Hashable, socket.socket]], now: float) -> StreamPlan:
        """Measure every live data socket, learn, and return the plan to run from now on."""
        with self._lock:
            socks = list(sockets)
            sample = self.meter.sample_sockets(socks, now)
            if sample is None:
                return self.tuner.plan
            self.last = sample
            if sample.acked_bytes:
                self.predictor.observe(sample.bandwidth_bps)
            if not self.forced_mode:
                self.detector.update(sample)
            plan = self.tuner.step(sample)
            self._resize(socks, plan)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("pba tick", extra={
                    "streams": sample.streams, "mbit": round(sample.bandwidth_bps * 8e-6, 1),
                    "rtt_ms": round(sample.rtt_s * 1e3, 2), "loss": round(sample.loss, 5),
                    "utilization": round(sample.utilization, 3), "app_limited": round(sample.app_limited, 2),
                    "mode": self.detector.mode,
                    "plan_streams": plan.streams, "buffer": plan.buffer_bytes})
            return plan

    def configure(self, sock: socket.socket) -> None:
        """Options for a newly opened data socket under the current plan (call before connect)."""
        plan = self.tuner.plan
        tune_socket(sock, plan.buffer_bytes, plan.congestion, plan.pacing_rate)

    def _resize(self, socks: list[tuple[Hashable, socket.socket]], plan: StreamPlan) -> None:
        """Grow send buffers of live sockets when the plan's per-stream buffer grew."""
        if not plan.buffer_bytes:
            return
        for key, sock in socks:
            if self._applied.get(key, 0) < plan.buffer_bytes:
                try:
                    tune_socket(sock, plan.buffer_bytes)
                except OSError:
                    continue
                self._applied[key] = plan.buffer_bytes

    def snapshot(self) -> LinkSnapshot:
        with self._lock:
            return LinkSnapshot(self.last, self.predictor.predict(), self.detector.mode, self.tuner.plan,
                                self.predictor.accuracy)
