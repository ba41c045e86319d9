"""The sender's per-page index keeps to its budget: holes cost nothing, and past the budget the
least recently used blocks are evicted, which only loses references, never correctness."""

from __future__ import annotations

import os

import numpy as np

from dwcp_agent._native import index, pages
from dwcp_agent.hde.chunk import ChunkDecoder, ChunkEncoder
from dwcp_agent.hde.codecs import codec_by_name

PAGE = 4096
BLOCK_PAGES = 1 << 14


def _hashes(chunk: bytes) -> tuple[np.ndarray, np.ndarray]:
    n = len(chunk) // PAGE
    zero = np.empty(n, dtype=np.uint8)
    hashes = np.empty((n, 2), dtype=np.uint64)
    pages.page_hashes(np.frombuffer(chunk, dtype=np.uint8), zero, hashes)
    return hashes, np.zeros(n, dtype=np.uint8)


def test_pages_far_apart_take_one_block_each_and_evict_the_oldest() -> None:
    block_bytes = 17 * BLOCK_PAGES
    idx = index.PeerIndex(1 << 10, 0, 4 * block_bytes)
    assert idx.slots == 4
    chunk = os.urandom(16 * PAGE)
    hashes, kinds = _hashes(chunk)
    tib_pages = (1 << 40) // PAGE
    for i in range(4):  # four blocks spread over a terabyte: four slots, no growth
        idx.commit(i * (tib_pages // 4), np.frombuffer(chunk, dtype=np.uint8), hashes, kinds)
        idx.ack(i * (tib_pages // 4), 16)
    assert idx.evictions == 0
    assert idx.page_state(0) == 2
    idx.commit(tib_pages - 16, np.frombuffer(chunk, dtype=np.uint8), hashes, kinds)  # a fifth block
    assert idx.evictions == 1
    assert idx.page_state(0) == 0, "the least recently used block is forgotten"
    assert idx.page_state(tib_pages // 4) == 2
    assert idx.page_state(tib_pages - 16) == 1


def test_an_encoder_over_its_budget_still_round_trips() -> None:
    """Budget of 4 blocks, 8 blocks of image sent twice: references to evicted pages are never
    made, so every chunk decodes to its bytes."""
    enc = ChunkEncoder(codec_by_name("lz4"), index_budget_bytes=2 * 4 * 17 * BLOCK_PAGES)
    image: dict[int, bytes] = {}
    stride = BLOCK_PAGES * PAGE
    common = os.urandom(PAGE)
    for rnd in range(2):
        for b in range(8):
            offset = b * stride
            chunk = common * 4 + os.urandom(4 * PAGE) if rnd == 0 else image[offset][: 4 * PAGE] + common * 4
            encoded = enc.encode(chunk, offset)

            def read_page(off: int, length: int) -> bytes:
                base = off - off % stride
                return image[base][off - base: off - base + length]

            out = bytearray(len(chunk))
            ChunkDecoder(read_page=read_page).decode(encoded.codec, encoded.flags, encoded.payload, len(chunk),
                                                     memoryview(out))
            assert bytes(out) == chunk
            image[offset] = chunk
            enc.acked(offset, len(chunk), encoded.checksum)
    assert enc._index.evictions > 0
