"""What one measurement interval saw of the path: produced by pba.probe, read by the stream
tuner (amst.tuning) and by PBA's predictor and mode detector. Kept apart from both so the
transport does not import the measurement package that configures it."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LinkSample"]


@dataclass(frozen=True)
class LinkSample:
    """The path as seen over one interval by all streams together.

    `bandwidth_bps` is goodput (bytes acknowledged per second); `capacity_bps` is the larger of
    that and the streams' summed delivery rates, a better guess of what the path could carry when
    the streams were not always busy. `loss` is retransmitted / sent data segments;
    `utilization` the share of the interval the streams had data queued (TCP busy time).
    """

    t: float
    interval_s: float
    streams: int
    bandwidth_bps: float
    capacity_bps: float
    rtt_s: float
    rttvar_s: float
    min_rtt_s: float
    loss: float
    retransmits: int
    acked_bytes: int
    app_limited: float
    utilization: float = 0.0
