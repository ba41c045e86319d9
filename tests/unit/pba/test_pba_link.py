"""LinkController: the link the codec selector plans for is the path's, not the sender's goodput."""

from __future__ import annotations

from dwcp_agent.config import load_config
from dwcp_agent.hde.codecs import CodecId
from dwcp_agent.hde.selector import CodecSelector, CodecSpeed, HostProfile
from dwcp_agent.pba.link import LinkController
from dwcp_agent.pba.probe import LinkSample

# zstd a little slower than lz4 per thread, better ratio: which wins depends on the link.
PROFILE = HostProfile({
    CodecId.LZ4: CodecSpeed(4e8, 1e9),
    CodecId.SNAPPY: CodecSpeed(3e8, 8e8),
    CodecId.ZSTD: CodecSpeed(1.5e8, 5e8),
})
TEXT = b" ".join(b"w%dx%d" % (i % 97, i % 13) for i in range(300_000))[: 1 << 20]


def _sample(t: float, goodput: float, capacity: float) -> LinkSample:
    return LinkSample(t=t, interval_s=0.5, streams=64, bandwidth_bps=goodput, capacity_bps=capacity, rtt_s=0.05,
                      rttvar_s=0.005, min_rtt_s=0.05, loss=0.001, retransmits=0, acked_bytes=int(goodput / 2),
                      app_limited=1.0, utilization=0.5)


def _controller() -> LinkController:
    return LinkController(load_config(environ={}, overrides={"stream_count": 0, "tcp_congestion": "cubic"}),
                          available_cc=["reno", "cubic", "bbr"])


def test_before_any_measurement_the_probe_stands_in() -> None:
    link = _controller()
    assert link.path_bandwidth() is None
    link.start(0.05, 3e6)
    assert link.path_bandwidth() == 3e6


def test_a_compression_bound_sender_does_not_read_as_a_slow_link() -> None:
    # The streams deliver at 100 MB/s whenever they have data; the sender, busy compressing,
    # keeps them fed at 20 MB/s. Goodput would buy more compression; the path buys less.
    link = _controller()
    link.start(0.05, 3e6)
    for i in range(10):
        link.predictor.observe(20e6)
        link.tuner.step(_sample(i * 0.5, 20e6, 100e6))
    assert (link.bandwidth() or 0) < 25e6
    assert (link.path_bandwidth() or 0) > 80e6
    chosen = CodecSelector(1, link=link.path_bandwidth, threads=1, profile=PROFILE).choose(memoryview(TEXT))
    on_goodput = CodecSelector(1, link=link.bandwidth, threads=1, profile=PROFILE).choose(memoryview(TEXT))
    assert on_goodput.codec.id is CodecId.ZSTD
    assert chosen.codec.id is not CodecId.ZSTD


def test_the_probe_of_an_internet_like_path_opens_the_ceiling_of_cubic_streams_at_once() -> None:
    # What the sender gets back from the probe of the WAN bed's internet profile (50 ms, a slow-start
    # burst of ~40 Mbit/s): with CUBIC it opens max_streams at once; on loopback it opens few.
    assert _controller().start(0.0504, 5e6).streams == 64  # 65 connections per source, one is control
    assert _controller().start(0.00005, 2e9).streams == 2
    bbr = LinkController(load_config(environ={}, overrides={"stream_count": 0, "tcp_congestion": "bbr"}),
                         available_cc=["reno", "cubic", "bbr"])
    assert bbr.start(0.0504, 5e6).streams == 2
