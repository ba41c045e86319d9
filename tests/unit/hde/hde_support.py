"""HDE test support: page-mix images and in-memory page readers."""

from __future__ import annotations

import numpy as np

from dwcp_agent.hde.codecs import CodecError

PAGE = 4096


def page_mix(pages: int, seed: int) -> np.ndarray:
    """Pages a VM holds: zero, repeated, text-like, and random, in a seeded order."""
    rng = np.random.default_rng(seed)
    out = np.zeros((pages, PAGE), np.uint8)
    words = rng.integers(97, 123, (64, 8), dtype=np.uint8)
    for i in range(pages):
        r = rng.random()
        if r < 0.25:
            continue
        if r < 0.45 and i:
            out[i] = out[rng.integers(0, i)]
        elif r < 0.8:
            out[i] = words[rng.integers(0, 64, PAGE // 8)].reshape(-1)
        else:
            out[i] = rng.integers(0, 256, PAGE, dtype=np.uint8)
    return out.reshape(-1)


class MemoryPages:
    """A destination-side file held in memory: what `read_page` / `read_baseline` see."""

    def __init__(self, data: np.ndarray | bytes) -> None:
        self.data = bytearray(bytes(data))
        self.calls = 0

    def __call__(self, offset: int, length: int) -> bytes:
        self.calls += 1
        if offset < 0 or offset + length > len(self.data):
            raise CodecError("reference beyond the end of the image")
        return bytes(self.data[offset: offset + length])

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.data[offset: offset + len(data)] = data
