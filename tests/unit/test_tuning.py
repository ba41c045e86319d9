"""StreamTuner on a closed-loop path model and on real sockets (no root needed)."""

from __future__ import annotations

import math
import socket
from dataclasses import replace

import pytest

from dwcp_agent.amst.tcp import tune_socket
from dwcp_agent.amst.tuning import (
    StreamTuner,
    TuningLimits,
    available_congestion_controls,
    choose_congestion,
    loss_limited_rate,
)
from dwcp_agent.config import PAGE_SIZE, MiB, load_config
from dwcp_agent.pba.probe import LinkSample

CC = ["reno", "cubic", "bbr"]
# max_streams (64); the destination's max_connections_per_source (65) leaves room for the control connection.
CEILING = 64


def cfg(**kw: object) -> object:
    return load_config(environ={}, overrides={"stream_count": 0, **kw})


class PathModel:
    """A bottleneck of `capacity` bytes/s with base RTT and random loss.

    Loss-limited flows each carry Mathis' rate; BBR flows share the capacity. Past capacity a
    queue builds (RTT up by `queue_s`) and overflow adds loss, as tbf does on the test bed.
    """

    def __init__(self, capacity: float, rtt: float, loss: float, cc: str) -> None:
        self.capacity, self.rtt, self.loss, self.cc = capacity, rtt, loss, cc

    def sample(self, t: float, n: int, dt: float = 0.5) -> LinkSample:
        per_flow = loss_limited_rate(self.rtt, self.loss, congestion=self.cc)
        demand = n * per_flow if math.isfinite(per_flow) else self.capacity
        full = demand >= self.capacity
        rate = min(demand, self.capacity)
        rtt = self.rtt * (1.5 if full else 1.02) + 0.0001
        loss = self.loss + (0.03 if full and self.cc != "bbr" else 0.0)
        acked = int(rate * dt)
        return LinkSample(t=t, interval_s=dt, streams=n, bandwidth_bps=rate, capacity_bps=rate, rtt_s=rtt,
                          rttvar_s=rtt / 10, min_rtt_s=self.rtt, loss=loss, retransmits=int(loss * acked / 1448),
                          acked_bytes=acked, app_limited=0.0, utilization=1.0)


def run_model(tuner: StreamTuner, model: PathModel, seconds: float) -> list[int]:
    counts, t = [], 0.0
    while t < seconds:
        t += 0.5
        counts.append(tuner.step(model.sample(t, tuner.plan.streams)).streams)
    return counts


def test_cubic_on_a_lossy_long_path_climbs_to_fill_it() -> None:
    # internet-like: 50 ms, 0.1 % loss, 1 Gbit/s; one CUBIC flow ~1.1 MB/s, so ~110 would fill it.
    tuner = StreamTuner(cfg(tcp_congestion="cubic"), CC)
    counts = run_model(tuner, PathModel(125e6, 0.050, 0.001, "cubic"), 30)
    assert max(counts) == CEILING                # climbs to the ceiling: every stream still pays
    assert counts.index(CEILING) <= 20           # within 10 s (0.5 s steps)


def test_climb_stops_and_steps_back_when_the_path_is_full() -> None:
    # 40 Mbit/s path, per-flow ~1.1 MB/s: ~4-5 flows fill it; more only build a queue.
    tuner = StreamTuner(cfg(tcp_congestion="cubic"), CC)
    counts = run_model(tuner, PathModel(5e6, 0.050, 0.001, "cubic"), 60)
    assert counts[-1] <= 8
    assert max(counts) <= 32


def test_bbr_stays_at_few_streams() -> None:
    tuner = StreamTuner(cfg(), CC)
    assert tuner.congestion == "bbr"
    counts = run_model(tuner, PathModel(125e6, 0.050, 0.001, "bbr"), 60)
    assert counts[-1] == TuningLimits().min_streams


class BusyHostPath(PathModel):
    """A path seen from a loaded host: the flows live with `rtt` (a slow receiver, a starved
    delayer), but the path's own minimum RTT is `path_rtt`, at any stream count."""

    def __init__(self, capacity: float, rtt: float, loss: float, cc: str, path_rtt: float) -> None:
        super().__init__(capacity, rtt, loss, cc)
        self.path_rtt = path_rtt

    def sample(self, t: float, n: int, dt: float = 0.5) -> LinkSample:
        return replace(super().sample(t, n, dt), min_rtt_s=self.path_rtt)


def test_a_busy_hosts_rtt_does_not_stop_the_climb_of_loss_limited_flows() -> None:
    path = BusyHostPath(125e6, 0.200, 0.001, "cubic", path_rtt=0.050)
    climbing = StreamTuner(cfg(tcp_congestion="cubic"), CC)  # no probe: climbs from min_streams
    counts = run_model(climbing, path, 20)
    assert counts[0] == 2 and counts[-1] == CEILING
    # ... nor make a tuner that started at the ceiling step down: the delay came without overflow.
    started = StreamTuner(cfg(tcp_congestion="cubic"), CC)
    started.initial(0.050, 3e6, loss=0.001)
    assert set(run_model(started, path, 20)) == {CEILING}


def test_settling_waits_for_the_new_streams_to_be_live() -> None:
    tuner = StreamTuner(cfg(tcp_congestion="cubic"), CC)  # no probe: climbs from min_streams
    model = PathModel(125e6, 0.050, 0.001, "cubic")
    t, counts = 0.0, []
    start = tuner.plan.streams
    while tuner.plan.streams == start:    # climb once
        t += 0.5
        tuner.step(model.sample(t, start))
    grown = tuner.plan.streams
    assert grown > start
    # The new streams take 3 s to connect: samples still show the old count carrying its
    # goodput, which must not read as "the added streams did not pay".
    for _ in range(6):
        t += 0.5
        counts.append(tuner.step(model.sample(t, start)).streams)
    assert set(counts) == {grown}
    for _ in range(8):
        t += 0.5
        counts.append(tuner.step(model.sample(t, grown)).streams)
    assert min(counts) >= grown           # once live, they paid: kept (or grown further)


def test_stream_count_pins_the_count_but_buffers_still_follow_the_bdp() -> None:
    tuner = StreamTuner(cfg(stream_count=8, tcp_congestion="bbr"), CC)
    counts = run_model(tuner, PathModel(125e6, 0.050, 0.001, "bbr"), 20)
    assert set(counts) == {8}
    assert tuner.plan.buffer_bytes >= 2 * 125e6 * 0.05 / 8 * 0.9  # twice each stream's BDP share


def test_initial_plan_from_bdp_and_loss() -> None:
    tuner = StreamTuner(cfg(tcp_congestion="cubic"), CC)
    plan = tuner.initial(rtt_s=0.005, bandwidth_bps=1.25e9)       # 6.25 MB BDP, 1 MiB per stream
    assert plan.streams == 6
    # Loss-based flows on a short lossy path: as many as Mathis' per-flow rate needs.
    lossy = StreamTuner(cfg(tcp_congestion="cubic"), CC).initial(0.015, 25e6, loss=0.001)
    assert lossy.streams == math.ceil(25e6 / loss_limited_rate(0.015, 0.001)) > 6
    # BBR on a long path starts from the BDP and climbs only if more streams pay.
    assert StreamTuner(cfg(tcp_congestion="bbr"), CC).initial(0.05, 7e6).streams == 2


def test_internet_like_path_starts_at_the_ceiling_datacenter_keeps_its_start() -> None:
    # 50 ms with CUBIC: the probe's slow-start burst shows a few MB/s, but ~110 flows would fill
    # 1 Gbit/s at 0.1 % loss; the first plan is the ceiling, bounded by the config's max_streams.
    for probe_bps in (3e6, 30e6):
        assert StreamTuner(cfg(tcp_congestion="cubic"), CC).initial(0.05, probe_bps).streams == CEILING
    assert StreamTuner(cfg(tcp_congestion="cubic", max_streams=24), CC).initial(0.05, 30e6).streams == 24
    assert StreamTuner(cfg(tcp_congestion="cubic", max_streams=256, max_connections_per_source=9),
                       CC).initial(0.05, 30e6).streams == 8
    assert StreamTuner(cfg(tcp_congestion="cubic", stream_count=8), CC).initial(0.05, 30e6).streams == 8
    # Datacenter-like (0.2 ms, 10 Gbit/s) and metro-like (5 ms) paths start from their BDP.
    assert StreamTuner(cfg(tcp_congestion="cubic"), CC).initial(0.0002, 1.25e9).streams == 2
    assert StreamTuner(cfg(tcp_congestion="cubic"), CC).initial(0.005, 1.25e9).streams == 6


def test_started_at_the_ceiling_it_stays_while_the_path_has_room() -> None:
    tuner = StreamTuner(cfg(tcp_congestion="cubic"), CC)
    tuner.initial(0.050, 3e6)
    counts = run_model(tuner, PathModel(125e6, 0.050, 0.001, "cubic"), 30)
    assert set(counts) == {CEILING}


def test_started_at_the_ceiling_on_a_small_path_it_steps_down() -> None:
    # 40 Mbit/s at 50 ms: 64 CUBIC flows only overflow the bottleneck (queue + loss); halving
    # keeps the goodput until ~5 flows, where one more halving loses it and is undone.
    model = PathModel(5e6, 0.050, 0.001, "cubic")
    tuner = StreamTuner(cfg(tcp_congestion="cubic"), CC)
    tuner.initial(0.050, 3e6)
    counts = run_model(tuner, model, 60)
    assert counts[0] == CEILING and counts[-1] <= 8
    assert model.sample(0, counts[-1]).bandwidth_bps == model.capacity  # still fills the path


def test_buffers_chunks_and_pacing() -> None:
    tuner = StreamTuner(cfg(tcp_congestion="cubic", pacing_rate_bytes=100 * MiB), CC)
    tuner.initial(0.05, 125e6)
    n = tuner.plan.streams
    assert tuner.plan.buffer_bytes == pytest.approx(max(MiB, 2 * 125e6 * 0.05 / n), rel=0.01)
    assert tuner.plan.pacing_rate == 100 * MiB // n
    for streams in (1, 4, 16, 64, 256):
        chunk = tuner.chunk_for(streams)
        assert chunk % PAGE_SIZE == 0 and chunk & (chunk - 1) == 0
        assert 256 * 1024 <= chunk <= 4 * MiB
    assert tuner.chunk_for(64) < tuner.chunk_for(4)             # more streams, smaller chunks
    # Sized for the CUBIC ceiling, two chunks per stream: 64 streams x 2 x 512 KiB = max_inflight_bytes.
    assert tuner.plan.chunk_size == tuner.chunk_for(64, 2) == 512 * 1024
    # BBR's ceiling is 16 streams, four chunks each.
    assert StreamTuner(cfg(tcp_congestion="bbr"), CC).plan.chunk_size == tuner.chunk_for(16) == MiB


def test_choose_congestion() -> None:
    assert choose_congestion("", CC) == "bbr"
    assert choose_congestion("", ["reno", "cubic"]) == ""
    assert choose_congestion("cubic", CC) == "cubic"
    with pytest.raises(ValueError, match="kernel offers: reno cubic bbr"):
        choose_congestion("vegas", CC)


def test_tune_socket_on_a_real_socket() -> None:
    offered = available_congestion_controls()
    cc = "cubic" if "cubic" in offered else (offered[0] if offered else "")
    with socket.socket() as sock:
        tune_socket(sock, buffer_bytes=2 * MiB, congestion=cc, pacing_rate=10 * MiB)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 2 * MiB  # kernel doubles it
        if cc:
            got = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
            assert got.rstrip(b"\0").decode() == cc
        with pytest.raises(ValueError, match="not available"):
            tune_socket(sock, congestion="no-such-cc")


class QueuedPath(PathModel):
    """A bottleneck with a deep queue (tbf on the bed at 40 Mbit/s): past capacity the RTT doubles
    but loss stays random, so only the flows' small share of Mathis' rate shows the path full.
    `app_limited`: the sender, not the path, keeps the flows short of data."""

    def __init__(self, capacity: float, rtt: float, loss: float, app_limited: float = 0.0) -> None:
        super().__init__(capacity, rtt, loss, "cubic")
        self.app_limited = app_limited

    def sample(self, t: float, n: int, dt: float = 0.5) -> LinkSample:
        full = n * loss_limited_rate(self.rtt, self.loss) >= self.capacity
        rtt = self.rtt * (2.0 if full else 1.02)
        rate = min(n * loss_limited_rate(rtt, self.loss), self.capacity)
        acked = int(rate * dt)
        return LinkSample(t=t, interval_s=dt, streams=n, bandwidth_bps=rate, capacity_bps=rate, rtt_s=rtt,
                          rttvar_s=rtt / 10, min_rtt_s=self.rtt, loss=self.loss,
                          retransmits=int(self.loss * acked / 1448), acked_bytes=acked,
                          app_limited=self.app_limited, utilization=1.0)


def test_a_standing_queue_without_overflow_loss_still_steps_down() -> None:
    model = QueuedPath(5e6, 0.050, 0.001)
    tuner = StreamTuner(cfg(tcp_congestion="cubic"), CC)
    tuner.initial(0.050, 3e6)
    counts = run_model(tuner, model, 40)
    assert counts[0] == CEILING and counts[-1] <= 16
    assert model.sample(0, counts[-1]).bandwidth_bps == model.capacity


def test_an_app_limited_sender_behind_a_queue_is_not_read_as_a_full_path() -> None:
    tuner = StreamTuner(cfg(tcp_congestion="cubic"), CC)
    tuner.initial(0.050, 3e6)
    assert set(run_model(tuner, QueuedPath(5e6, 0.050, 0.001, app_limited=1.0), 30)) == {CEILING}


def test_settling_waits_for_retired_streams_to_drain() -> None:
    model = PathModel(5e6, 0.050, 0.001, "cubic")
    tuner = StreamTuner(cfg(tcp_congestion="cubic"), CC)
    tuner.initial(0.050, 3e6)
    t = 0.0
    while tuner.plan.streams == CEILING:
        t += 0.5
        tuner.step(model.sample(t, CEILING))
    halved = tuner.plan.streams
    assert halved < CEILING
    # The retired streams drain their sent chunks for 3 s: still the old count on the wire, which
    # must not read as "the fewer streams kept the goodput".
    counts = []
    for _ in range(6):
        t += 0.5
        counts.append(tuner.step(model.sample(t, CEILING)).streams)
    assert set(counts) == {halved}


def test_a_short_path_with_a_queue_holds_instead_of_stepping_down() -> None:
    # 5 ms, CUBIC forced, a queue but no loss (a busy loopback): as before, hold the count reached.
    tuner = StreamTuner(cfg(tcp_congestion="cubic"), CC)
    tuner.initial(0.005, 1.25e9)
    start = tuner.plan.streams
    counts = run_model(tuner, QueuedPath(5e6, 0.005, 0.0), 20)
    assert min(counts) >= start
