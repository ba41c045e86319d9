"""Passive link measurement from the data sockets themselves (Linux TCP_INFO).

Every AMST stream already carries the traffic we want to measure, so PBA reads what the kernel
knows about each one (smoothed RTT, retransmits, delivery rate, cwnd, bytes acknowledged) instead
of sending extra traffic. `LinkMeter` turns per-socket counters into one `LinkSample` per interval:
goodput from bytes_acked deltas, RTT across streams, loss from retransmitted / sent segments.
Time is passed in, so recorded samples replay identically in tests.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Protocol

from dwcp_agent.amst.samples import LinkSample
from dwcp_agent.telemetry.metrics import Metrics

__all__ = ["TCP_INFO_LEN", "LinkMeter", "LinkSample", "TcpSample", "parse_tcp_info", "read_tcp_info"]

# struct tcp_info (include/uapi/linux/tcp.h) up to tcpi_reord_seen, native alignment.
_TCP_INFO = struct.Struct(
    "=8B"    # state, ca_state, retransmits, probes, backoff, options, wscale, app_limited bits
    "24I"    # rto .. total_retrans
    "4Q"     # pacing_rate, max_pacing_rate, bytes_acked, bytes_received
    "6I"     # segs_out, segs_in, notsent_bytes, min_rtt, data_segs_in, data_segs_out
    "4Q"     # delivery_rate, busy_time, rwnd_limited, sndbuf_limited
    "2I"     # delivered, delivered_ce
    "2Q"     # bytes_sent, bytes_retrans
    "2I"     # dsack_dups, reord_seen
)
TCP_INFO_LEN = _TCP_INFO.size
_TCP_INFO_OPT = getattr(socket, "TCP_INFO", 11)


@dataclass(frozen=True)
class TcpSample:
    """One socket's TCP_INFO at time `t` (seconds on the caller's clock); rates in bytes/s."""

    t: float
    state: int
    ca_state: int
    rtt_s: float
    rttvar_s: float
    min_rtt_s: float
    snd_cwnd: int
    snd_mss: int
    unacked: int
    lost: int
    total_retrans: int
    segs_out: int
    data_segs_out: int
    bytes_acked: int
    bytes_received: int
    bytes_sent: int
    bytes_retrans: int
    delivery_rate: float
    pacing_rate: float
    app_limited: bool
    notsent_bytes: int
    busy_s: float
    rwnd_limited_s: float
    sndbuf_limited_s: float


class _HasFileno(Protocol):
    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...


def parse_tcp_info(raw: bytes, t: float) -> TcpSample:
    """Decode a TCP_INFO buffer; a shorter buffer (older kernel) leaves the newer fields 0."""
    f = _TCP_INFO.unpack(raw[:TCP_INFO_LEN].ljust(TCP_INFO_LEN, b"\0"))
    # Offsets into the flat tuple: 8 bytes, then 24 u32 starting at index 8.
    u32 = f[8:32]
    pacing_rate, _max_pacing, bytes_acked, bytes_received = f[32:36]
    segs_out, _segs_in, notsent, min_rtt, _dsi, data_segs_out = f[36:42]
    delivery_rate, busy, rwnd_limited, sndbuf_limited = f[42:46]
    bytes_sent, bytes_retrans = f[48:50]
    return TcpSample(
        t=t,
        state=f[0],
        ca_state=f[1],
        rtt_s=u32[15] / 1e6,
        rttvar_s=u32[16] / 1e6,
        min_rtt_s=min_rtt / 1e6,
        snd_cwnd=u32[18],
        snd_mss=u32[2],
        unacked=u32[4],
        lost=u32[6],
        total_retrans=u32[23],
        segs_out=segs_out,
        data_segs_out=data_segs_out,
        bytes_acked=bytes_acked,
        bytes_received=bytes_received,
        bytes_sent=bytes_sent,
        bytes_retrans=bytes_retrans,
        delivery_rate=float(delivery_rate),
        pacing_rate=float(pacing_rate),
        app_limited=bool(f[7] & 1),
        notsent_bytes=notsent,
        busy_s=busy / 1e6,
        rwnd_limited_s=rwnd_limited / 1e6,
        sndbuf_limited_s=sndbuf_limited / 1e6,
    )


def read_tcp_info(sock: _HasFileno | socket.socket, t: float) -> TcpSample:
    """TCP_INFO of a connected TCP socket, stamped with the caller's time `t`."""
    return parse_tcp_info(sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO_OPT, TCP_INFO_LEN), t)


class LinkMeter:
    """Per-interval aggregation of TcpSamples from N streams (streams may come and go).

    Call `observe(key, sample)` for every stream, then `close_interval(now)`. A stream seen for
    the first time contributes from its next sample on, unless `add(key, sample)` gave its
    baseline at connect time.
    """

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self._last: dict[Hashable, TcpSample] = {}
        self._pending: dict[Hashable, TcpSample] = {}
        self._t0: float | None = None

    def add(self, key: Hashable, baseline: TcpSample) -> None:
        """Register a stream with its counters at connect time (deltas start from here)."""
        self._last[key] = baseline
        if self._t0 is None:
            self._t0 = baseline.t

    def remove(self, key: Hashable) -> None:
        """Forget a closed stream."""
        self._last.pop(key, None)
        self._pending.pop(key, None)

    def observe(self, key: Hashable, sample: TcpSample) -> None:
        """Record the current counters of stream `key` for the interval being closed."""
        self._pending[key] = sample

    def sample_sockets(self, socks: Iterable[tuple[Hashable, socket.socket]], now: float) -> LinkSample | None:
        """Read TCP_INFO from every (key, socket) and close the interval; closed sockets are skipped."""
        for key, sock in socks:
            try:
                self.observe(key, read_tcp_info(sock, now))
            except OSError:
                self.remove(key)
        return self.close_interval(now)

    def close_interval(self, now: float) -> LinkSample | None:
        """Aggregate the interval ending at `now`; None until a first baseline exists."""
        if self._t0 is None:
            self._t0 = now
            self._last.update(self._pending)
            self._pending.clear()
            return None
        interval = now - self._t0
        if interval <= 0:
            return None
        acked = retrans = segs = 0
        delivery = 0.0
        rtts: list[tuple[float, float, float, float]] = []
        limited = 0
        busy = 0.0
        for key, cur in self._pending.items():
            prev = self._last.get(key)
            self._last[key] = cur
            if prev is None:
                continue
            acked += max(0, cur.bytes_acked - prev.bytes_acked)
            retrans += max(0, cur.total_retrans - prev.total_retrans)
            segs += max(0, cur.data_segs_out - prev.data_segs_out)
            busy += max(0.0, cur.busy_s - prev.busy_s)
            if cur.bytes_acked > prev.bytes_acked:
                delivery += cur.delivery_rate
                weight = float(cur.bytes_acked - prev.bytes_acked)
                rtts.append((weight, cur.rtt_s, cur.rttvar_s, cur.min_rtt_s))
                limited += cur.app_limited
        streams = len(self._pending)
        self._pending.clear()
        self._t0 = now
        bandwidth = acked / interval
        total_w = sum(r[0] for r in rtts)
        if total_w:
            rtt = sum(w * r for w, r, _, _ in rtts) / total_w
            rttvar = sum(w * v for w, _, v, _ in rtts) / total_w
            min_rtt = min(m for _, _, _, m in rtts if m > 0) if any(m > 0 for *_, m in rtts) else rtt
        else:
            rtt = rttvar = min_rtt = 0.0
        link = LinkSample(
            t=now, interval_s=interval, streams=streams, bandwidth_bps=bandwidth,
            capacity_bps=max(bandwidth, delivery), rtt_s=rtt, rttvar_s=rttvar, min_rtt_s=min_rtt,
            loss=retrans / segs if segs else 0.0, retransmits=retrans, acked_bytes=acked,
            app_limited=limited / len(rtts) if rtts else 0.0,
            utilization=min(1.0, busy / (interval * streams)) if streams else 0.0,
        )
        if self.metrics is not None:
            self.metrics.amst_throughput.set(bandwidth)
            self.metrics.amst_stream_utilization.set(link.utilization)
            if rtt:
                self.metrics.amst_rtt.set(rtt)
            if retrans:
                self.metrics.amst_retransmits.inc(retrans)
        return link
