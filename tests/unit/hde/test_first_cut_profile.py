"""The v1 (first-cut) profile: zero pages are dropped, everything else goes through one codec;
no fingerprints, no references, and the receiver decodes it like any other chunk."""

from __future__ import annotations

import numpy as np
import pytest

from dwcp_agent.hde.chunk import ChunkDecoder, ChunkEncoder, checksum
from dwcp_agent.hde.codecs import codec_by_name

PAGE = 4096


@pytest.mark.parametrize("codec", ["none", "lz4", "zstd", "snappy"])
def test_zero_pages_dropped_duplicates_sent_literally(codec: str) -> None:
    rng = np.random.default_rng(5)
    page = rng.integers(0, 256, PAGE, dtype=np.uint8)
    chunk = np.concatenate([page, np.zeros(PAGE, np.uint8), page, page, rng.integers(0, 256, 100, np.uint8)])
    data = chunk.tobytes()
    encoder = ChunkEncoder(codec_by_name(codec), dedupe=False)
    encoded = encoder.encode(memoryview(data))
    assert encoder.stats.pages["zero"] == 1 and encoder.stats.pages["dup"] == 0
    assert len(encoded.payload) <= len(data) - PAGE + 64  # the zero page is not on the wire
    out = bytearray(len(data))
    ChunkDecoder().decode(encoded.codec, encoded.flags, memoryview(encoded.payload), len(data), memoryview(out))
    assert bytes(out) == data and checksum(out) == encoded.checksum


def test_default_profile_still_finds_duplicates() -> None:
    page = np.random.default_rng(6).integers(0, 256, PAGE, dtype=np.uint8)
    data = np.concatenate([page, page, page]).tobytes()
    encoder = ChunkEncoder(codec_by_name("none"))
    encoder.encode(memoryview(data))
    assert encoder.stats.pages["dup"] == 2
