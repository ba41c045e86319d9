"""Codec selection: the model picks what maximises delivered logical bytes per second."""

from __future__ import annotations

import numpy as np

from dwcp_agent.hde.codecs import CodecId
from dwcp_agent.hde.selector import CodecSelector, CodecSpeed, HostProfile, host_cpu_share

# A fixed host profile, so the tests do not depend on this machine's speed.
PROFILE = HostProfile({
    CodecId.LZ4: CodecSpeed(2e9, 4e9),
    CodecId.SNAPPY: CodecSpeed(1.5e9, 3e9),
    CodecId.ZSTD: CodecSpeed(4e8, 1.2e9),
})
_rng = np.random.default_rng(1)
_WORDS = [bytes(_rng.integers(97, 123, _rng.integers(2, 10), dtype=np.uint8)) for _ in range(3000)]
# Text-like bytes: lz4 gets about 2x, zstd noticeably more.
TEXT = memoryview(np.frombuffer(b" ".join(_WORDS[i] for i in _rng.integers(0, 3000, 200000))[: 1 << 20],
                                np.uint8).copy())
RANDOM = memoryview(np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8))


def _pick(link: float, data: memoryview, threads: int = 2) -> str:
    return CodecSelector(1, link=link, threads=threads, profile=PROFILE).choose(data).codec.name


def test_incompressible_data_goes_uncompressed() -> None:
    assert _pick(1e8, RANDOM) == "none"
    assert _pick(1e10, RANDOM) == "none"


def test_slow_link_buys_the_best_ratio() -> None:
    assert _pick(5e7, TEXT) == "zstd"


def test_link_faster_than_the_codecs_prefers_the_fastest_codec_or_none() -> None:
    assert _pick(1e11, TEXT) == "none"
    assert _pick(3e9, TEXT, threads=4) == "lz4"


def test_link_may_be_a_callable_and_unknown_means_the_default() -> None:
    readings = iter([5e7, None])
    selector = CodecSelector(1, link=lambda: next(readings), threads=2, profile=PROFILE)
    assert selector.choose(TEXT).codec.name == "zstd"
    assert selector.link_bytes_per_s() == 1.25e9


def test_forced_codec_is_always_used() -> None:
    selector = CodecSelector(3, forced="snappy", profile=PROFILE)
    assert selector.choose(RANDOM).codec.name == "snappy"


def test_observed_speed_moves_the_estimate() -> None:
    selector = CodecSelector(1, threads=1, profile=HostProfile(dict(PROFILE.speeds)))
    before = selector.profile.speeds[CodecId.LZ4].compress
    selector.observe(selector.candidates[1], 1 << 20, (1 << 20) / 1e8)
    assert selector.profile.speeds[CodecId.LZ4].compress < before


def test_a_busy_host_buys_cheaper_compression() -> None:
    # 200 MB/s link: on idle cores zstd's CPU time hides behind the wire; with an eighth of a
    # core per thread it does not, and the cheaper lz4 delivers more.
    idle = CodecSelector(1, link=2e8, threads=2, profile=PROFILE, cpu_share=lambda: 1.0)
    busy = CodecSelector(1, link=2e8, threads=2, profile=PROFILE, cpu_share=lambda: 0.125)
    assert idle.choose(TEXT).codec.name == "zstd"
    assert busy.choose(TEXT).codec.name == "lz4"
    assert busy.effective_threads() == 0.25


def test_host_cpu_share_is_a_fraction_of_a_core() -> None:
    assert 0.5 <= host_cpu_share() <= 1.0
