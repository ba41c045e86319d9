"""TCP_INFO decoding on real sockets, and per-interval aggregation of recorded per-stream counters."""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import replace

import pytest

from dwcp_agent.pba.probe import TCP_INFO_LEN, LinkMeter, TcpSample, parse_tcp_info, read_tcp_info
from dwcp_agent.telemetry.metrics import Metrics


@pytest.fixture
def pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    yield client, server
    client.close()
    server.close()


def _drain(sock: socket.socket, nbytes: int) -> None:
    got = 0
    while got < nbytes:
        got += len(sock.recv(1 << 20))


def test_read_tcp_info_counts_bytes_acked_after_a_real_transfer(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    reader = threading.Thread(target=_drain, args=(server, 4 << 20), daemon=True)
    reader.start()
    client.sendall(bytes(4 << 20))
    reader.join()
    deadline = time.monotonic() + 5
    info = read_tcp_info(client, 12.5)
    while info.bytes_acked < 4 << 20 and time.monotonic() < deadline:
        time.sleep(0.01)
        info = read_tcp_info(client, 12.5)
    assert info.t == 12.5
    assert info.state == 1  # TCP_ESTABLISHED
    assert info.bytes_acked >= 4 << 20
    assert info.bytes_sent >= info.bytes_acked - 1  # bytes_acked counts the SYN
    assert info.snd_mss > 0 and info.snd_cwnd > 0
    assert 0 < info.rtt_s < 1.0
    assert info.data_segs_out > 0


def test_parse_tcp_info_reads_fields_at_their_kernel_offsets() -> None:
    raw = bytearray(TCP_INFO_LEN)
    raw[0], raw[1], raw[7] = 1, 4, 1                       # state, ca_state (loss), app_limited bit
    struct.pack_into("=I", raw, 16, 1448)                  # snd_mss
    struct.pack_into("=II", raw, 68, 50_000, 2_500)        # rtt, rttvar (us)
    struct.pack_into("=I", raw, 80, 321)                   # snd_cwnd
    struct.pack_into("=I", raw, 100, 17)                   # total_retrans
    struct.pack_into("=Q", raw, 120, 123_456_789)          # bytes_acked
    struct.pack_into("=I", raw, 148, 49_000)               # min_rtt
    struct.pack_into("=I", raw, 156, 9_999)                # data_segs_out
    struct.pack_into("=Q", raw, 160, 125_000_000)          # delivery_rate
    struct.pack_into("=Q", raw, 208, 2_896)                # bytes_retrans
    s = parse_tcp_info(bytes(raw), 3.0)
    assert (s.state, s.ca_state, s.app_limited) == (1, 4, True)
    assert s.snd_mss == 1448 and s.snd_cwnd == 321 and s.total_retrans == 17
    assert s.rtt_s == pytest.approx(0.05) and s.rttvar_s == pytest.approx(0.0025)
    assert s.min_rtt_s == pytest.approx(0.049)
    assert s.bytes_acked == 123_456_789 and s.data_segs_out == 9_999 and s.bytes_retrans == 2_896
    assert s.delivery_rate == 125_000_000


def test_parse_tcp_info_accepts_the_shorter_struct_of_older_kernels() -> None:
    s = parse_tcp_info(bytes(104), 0.0)
    assert s.bytes_acked == 0 and s.delivery_rate == 0


def _sample(t: float, acked: int, retrans: int = 0, segs: int = 0, rtt: float = 0.05,
            rate: float = 0.0) -> TcpSample:
    base = parse_tcp_info(bytes(TCP_INFO_LEN), t)
    return replace(base, bytes_acked=acked, total_retrans=retrans, data_segs_out=segs, rtt_s=rtt,
                   min_rtt_s=rtt * 0.9, delivery_rate=rate)


def test_link_meter_sums_streams_and_estimates_loss_from_retransmits() -> None:
    metrics = Metrics()
    meter = LinkMeter(metrics)
    meter.add("s0", _sample(0.0, 0))
    meter.add("s1", _sample(0.0, 0))
    meter.observe("s0", _sample(1.0, 50_000_000, retrans=10, segs=10_000, rtt=0.050, rate=60e6))
    meter.observe("s1", _sample(1.0, 30_000_000, retrans=0, segs=10_000, rtt=0.060, rate=40e6))
    link = meter.close_interval(1.0)
    assert link is not None
    assert link.streams == 2
    assert link.bandwidth_bps == pytest.approx(80e6)
    assert link.capacity_bps == pytest.approx(100e6)
    assert link.loss == pytest.approx(10 / 20_000)
    assert link.rtt_s == pytest.approx((0.05 * 5 + 0.06 * 3) / 8)  # weighted by bytes acked
    assert link.retransmits == 10
    assert metrics.amst_throughput._value.get() == pytest.approx(80e6)
    assert metrics.amst_retransmits._value.get() == 10


def test_link_meter_new_stream_counts_from_its_first_sample_and_removed_ones_vanish() -> None:
    meter = LinkMeter()
    meter.add("s0", _sample(0.0, 0))
    meter.observe("s0", _sample(1.0, 1000))
    meter.observe("late", _sample(1.0, 10**9))  # a stream that ran before we saw it: baseline only
    first = meter.close_interval(1.0)
    assert first is not None and first.acked_bytes == 1000
    meter.remove("s0")
    meter.observe("late", _sample(2.0, 10**9 + 500))
    second = meter.close_interval(2.0)
    assert second is not None and second.acked_bytes == 500 and second.streams == 1


def test_link_meter_sample_sockets_on_real_streams(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    meter = LinkMeter()
    assert meter.sample_sockets([(0, client)], time.monotonic()) is None  # first call sets the baseline
    reader = threading.Thread(target=_drain, args=(server, 8 << 20), daemon=True)
    reader.start()
    client.sendall(bytes(8 << 20))
    reader.join()
    time.sleep(0.05)
    link = meter.sample_sockets([(0, client)], time.monotonic())
    assert link is not None and link.acked_bytes >= 8 << 20 and link.bandwidth_bps > 0
