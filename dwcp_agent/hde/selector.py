"""Codec per chunk: the one that delivers the most logical bytes per second on this link.

For each candidate the selector predicts the time one chunk costs in each pipeline stage that
runs in parallel (compressing on the encoder threads, sending over the link, decompressing on
the receiver's threads) and picks the codec whose slowest stage is fastest:

    time(c) = max(body / (compress_speed(c) * threads), wire(c) / link, body / (decompress_speed(c) * threads))
    wire(c) = meta + body / ratio(c)

`threads` is the encoder threads scaled by the share of the host's CPU they can expect
(`host_cpu_share`: cores / runnable tasks, from the load average). Timing a compression shows
the codec's speed on one core, not how often a thread gets a core: a 256 KiB compression
finishes inside one time slice, and on a host with eight runnable tasks per core the threads
still wait most of the time between chunks.

`ratio` comes from compressing a small sample of the chunk's literal bytes (two 4 KiB pages),
so an incompressible chunk costs two tiny compressions, not one big wasted one. Speeds are
measured on this host when the selector starts and then follow what real chunks achieve (an
exponential moving average), so a busy host drifts towards cheaper codecs by itself. When the
link is faster than a codec can compress, that codec only loses time, which is what the max()
says. Ties within 3 % go to the smaller wire size.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dwcp_agent.hde.codecs import Codec, CodecId, codec_by_id, codec_by_name

# When nobody tells us the link speed: 10 Gbit/s, the common datacenter NIC.
DEFAULT_LINK_BYTES_PER_S = 1.25e9
SAMPLE_PAGE = 4096
SAMPLE_PAGES = 2
EWMA = 0.1
TIE = 0.03

LinkSource = float | Callable[[], float | None] | None
CPU_SHARE_TTL_S = 1.0
# The load average counts every task that was runnable, most of them briefly, so cores / load
# overstates a thread's wait: on the 2-core bed at load 18-24 a migration's threads still got
# about a core, and a floor of a quarter had the selector send half the chunks uncompressed
# (wire ratio 2.3 where lz4 alone gets 2.6). Half a core per thread is the floor.
MIN_CPU_SHARE = 0.5


def host_cpu_share() -> float:
    """Share of a core each runnable task gets on this host now: cores / 1-minute load, in [0.5, 1]."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return 1.0
    cores = os.cpu_count() or 1
    return max(MIN_CPU_SHARE, min(1.0, cores / load)) if load > 0 else 1.0


def _calibration_data() -> bytes:
    """256 KiB mixing what VM pages hold: text-like, structured binary, and random bytes."""
    rng = np.random.default_rng(7)
    words = [bytes(rng.integers(97, 123, rng.integers(2, 9), dtype=np.uint8)) for _ in range(400)]
    text = b" ".join(words[i] for i in rng.integers(0, len(words), 20000))[: 96 * 1024]
    table = np.arange(96 * 1024 // 8, dtype=np.uint64) * 0x10001
    noise = rng.integers(0, 256, 64 * 1024, dtype=np.uint8).tobytes()
    return text + table.tobytes() + noise


@dataclass
class CodecSpeed:
    """Measured bytes per second of one codec on this host (per thread)."""

    compress: float
    decompress: float


@dataclass
class HostProfile:
    """Per-codec speeds on this host; `measure` runs once per process (about 20 ms)."""

    speeds: dict[CodecId, CodecSpeed] = field(default_factory=dict)

    @classmethod
    def measure(cls, zstd_level: int) -> HostProfile:
        data = _calibration_data()
        profile = cls()
        for cid in (CodecId.LZ4, CodecId.SNAPPY, CodecId.ZSTD):
            codec = codec_by_id(cid, zstd_level)
            packed = codec.compress(data)
            t_c = _best_time(codec.compress, data)
            t_d = _best_time(codec.decompress, packed, len(data))
            profile.speeds[cid] = CodecSpeed(len(data) / t_c, len(data) / t_d)
        return profile


def _best_time(fn: Callable[..., object], *args: object, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


_profiles: dict[int, HostProfile] = {}
_profiles_lock = threading.Lock()


def host_profile(zstd_level: int) -> HostProfile:
    """The process-wide profile for this zstd level, measured on first use."""
    with _profiles_lock:
        if zstd_level not in _profiles:
            _profiles[zstd_level] = HostProfile.measure(zstd_level)
        return _profiles[zstd_level]


@dataclass(frozen=True)
class Choice:
    """The codec picked for a chunk and the throughput the model expected from it."""

    codec: Codec
    expected_bytes_per_s: float


class CodecSelector:
    """Chooses the codec of each chunk; `forced` (a config name) disables the choice."""

    def __init__(self, zstd_level: int = 1, link: LinkSource = None, threads: int | None = None,
                 forced: str | None = None, profile: HostProfile | None = None,
                 candidates: tuple[str, ...] = ("none", "lz4", "snappy", "zstd"),
                 cpu_share: Callable[[], float] | None = None) -> None:
        self.zstd_level = zstd_level
        self.link = link
        self.threads = max(1, threads or os.cpu_count() or 1)
        self.cpu_share = cpu_share  # None: the threads have their cores to themselves
        self._share = (1.0, -CPU_SHARE_TTL_S)  # (value, when read)
        self.forced = codec_by_name(forced, zstd_level) if forced and forced != "auto" else None
        self._profile = profile
        self.candidates = tuple(codec_by_name(name, zstd_level) for name in candidates)
        self._lock = threading.Lock()

    @property
    def profile(self) -> HostProfile:
        if self._profile is None:
            self._profile = host_profile(self.zstd_level)
        return self._profile

    def link_bytes_per_s(self) -> float:
        """Current link bandwidth from the configured source; the default when unknown."""
        value = self.link() if callable(self.link) else self.link
        return float(value) if value and value > 0 else DEFAULT_LINK_BYTES_PER_S

    def effective_threads(self) -> float:
        """Encoder threads times the share of a core each can expect (re-read at most once a second)."""
        if self.cpu_share is None:
            return float(self.threads)
        value, read_at = self._share
        now = time.monotonic()
        if now - read_at >= CPU_SHARE_TTL_S:
            value = self.cpu_share()
            self._share = (value, now)
        return self.threads * value

    def choose(self, body: memoryview, meta_len: int = 0) -> Choice:
        """The codec for a chunk whose compressible part is `body` (meta_len bytes go as they are)."""
        if self.forced is not None or not len(body):
            return self.choose_sampled(b"", len(body), meta_len)
        return self.choose_sampled(_sample(body), len(body), meta_len)

    def choose_sampled(self, sample: bytes, n: int, meta_len: int = 0) -> Choice:
        """The codec for `n` compressible bytes of which `sample` is representative."""
        if self.forced is not None:
            return Choice(self.forced, 0.0)
        if n == 0 or not sample:
            return Choice(codec_by_id(CodecId.NONE), float("inf"))
        link = self.link_bytes_per_s()
        threads = self.effective_threads()
        lz4_ratio = _ratio(codec_by_id(CodecId.LZ4), sample)
        best: tuple[float, float, Codec] | None = None
        for codec in self.candidates:
            if codec.id is CodecId.NONE:
                ratio, cpu, dec = 1.0, 0.0, 0.0
            else:
                speed = self.profile.speeds[codec.id]
                cpu = n / (speed.compress * threads)
                dec = n / (speed.decompress * self.threads)  # the receiver's cores, not ours
                if codec.id is CodecId.ZSTD:
                    # Only worth sampling zstd when its CPU time could beat lz4's wire time.
                    if cpu > (meta_len + n / max(lz4_ratio, 1.0)) / link:
                        continue
                    ratio = _ratio(codec, sample)
                else:
                    ratio = lz4_ratio
                if ratio < 1.0:
                    continue
            wire = meta_len + n / ratio
            cost = max(cpu, wire / link, dec)
            if best is None or cost < best[0] * (1 - TIE) or (cost <= best[0] * (1 + TIE) and wire < best[1]):
                best = (cost, wire, codec)
        assert best is not None
        return Choice(best[2], (meta_len + n) / max(best[0], 1e-12))

    def observe(self, codec: Codec, nbytes: int, seconds: float) -> None:
        """Fold a real compression time into this host's speed estimate for that codec."""
        if codec.id is CodecId.NONE or nbytes < 64 * 1024 or seconds <= 0:
            return
        with self._lock:
            speed = self.profile.speeds[codec.id]
            speed.compress += EWMA * (nbytes / seconds - speed.compress)


def _sample(body: memoryview) -> bytes:
    """Up to two pages spread over the body: cheap, and representative of a mixed chunk."""
    n = len(body)
    if n <= SAMPLE_PAGE * SAMPLE_PAGES:
        return bytes(body)
    step = n // SAMPLE_PAGES
    return b"".join(bytes(body[i * step: i * step + SAMPLE_PAGE]) for i in range(SAMPLE_PAGES))


def spread_pages(view: memoryview, starts: list[int], ends: list[int], total: int, count: int) -> list[memoryview]:
    """`count` pages (fewer when `total` holds fewer) spread evenly over the `total` bytes of the
    runs [starts[i], ends[i]) of `view`, taken in order as if the runs were one buffer, each page
    cut at its run's end: the samples of the selector's estimate and of a forced codec's
    incompressibility check (hde/chunk.py), without gathering the runs first."""
    if total <= 0 or count <= 0:
        return []
    last = (total - 1) // SAMPLE_PAGE
    wanted = list(dict.fromkeys(i * last // max(count - 1, 1) * SAMPLE_PAGE for i in range(count)))
    samples: list[memoryview] = []
    before = 0
    for start, end in zip(starts, ends, strict=True):
        while wanted and wanted[0] < before + end - start:
            at = start + wanted.pop(0) - before
            samples.append(view[at: min(at + SAMPLE_PAGE, end)])
        if not wanted:
            break
        before += end - start
    return samples


def _ratio(codec: Codec, sample: bytes) -> float:
    return len(sample) / max(len(codec.compress(sample)), 1)
