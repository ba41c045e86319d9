"""Seeded synthetic VM memory images with a realistic page mix, for demos, tests and benchmarks.

The same (size, profile, seed) always gives the same bytes. Pages are one of:
zero, duplicate (one of a small pool of common pages: page tables, zeroed-then-touched pages,
shared library pages), text (words, as in page cache of logs and configs), binary (pointer- and
small-integer-heavy, as in heap and code), random (encrypted or already compressed data).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PAGE = 4096
BLOCK_PAGES = 256  # generate 1 MiB at a time
KINDS = ("zero", "dup", "text", "binary", "random")


@dataclass(frozen=True)
class Profile:
    """Share of each page kind; the shares sum to 1."""

    zero: float
    dup: float
    text: float
    binary: float
    random: float

    def weights(self) -> np.ndarray:
        w = np.array([self.zero, self.dup, self.text, self.binary, self.random], dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError("page-kind shares must be non-negative and not all zero")
        return w / w.sum()


PROFILES = {
    "vm-mix": Profile(zero=0.35, dup=0.15, text=0.20, binary=0.15, random=0.15),
    "random": Profile(zero=0, dup=0, text=0, binary=0, random=1),
    "zero": Profile(zero=1, dup=0, text=0, binary=0, random=0),
    "idle-vm": Profile(zero=0.70, dup=0.10, text=0.10, binary=0.07, random=0.03),
}

_WORDS = (b"the migration kernel page memory host guest error info debug request response "
          b"connection timeout user session cache buffer network disk write read file system "
          b"service started stopped value key config update delete insert select from where").split()


def _corpora(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    words = rng.choice(len(_WORDS), size=300_000)
    text = np.frombuffer(b" ".join(_WORDS[i] for i in words)[: 1 << 20], dtype=np.uint8)
    ints = rng.integers(0, 4096, size=(1 << 20) // 8, dtype=np.uint64)
    pointers = (0x7F00_0000_0000 + rng.integers(0, 1 << 24, size=ints.shape[0], dtype=np.uint64) * 16)
    binary = np.where(rng.random(ints.shape[0]) < 0.5, ints, pointers).astype("<u8").view(np.uint8)
    pool = rng.integers(0, 256, size=(64, PAGE), dtype=np.uint8)
    pool[:, PAGE // 2:] = 0  # common pages are half-filled structures
    return text, binary, pool


def generate(path: str | os.PathLike[str], size: int, profile: str | Profile = "vm-mix", seed: int = 0) -> Path:
    """Write a `size`-byte image; returns its path. Writes to a temporary name, then renames."""
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    if size < 0:
        raise ValueError("size must be non-negative")
    rng = np.random.default_rng(seed)
    text, binary, pool = _corpora(rng)
    weights = prof.weights()
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    block = np.empty((BLOCK_PAGES, PAGE), dtype=np.uint8)
    with open(tmp, "wb") as f:
        written = 0
        while written < size:
            kinds = rng.choice(len(KINDS), size=BLOCK_PAGES, p=weights)
            block[kinds == 0] = 0
            dup = np.flatnonzero(kinds == 1)
            block[dup] = pool[rng.integers(0, len(pool), size=len(dup))]
            for kind, corpus in ((2, text), (3, binary)):
                idx = np.flatnonzero(kinds == kind)
                starts = rng.integers(0, len(corpus) - PAGE, size=len(idx))
                for row, start in zip(idx, starts, strict=True):
                    block[row] = corpus[start:start + PAGE]
            rand = np.flatnonzero(kinds == 4)
            block[rand] = rng.integers(0, 256, size=(len(rand), PAGE), dtype=np.uint8)
            n = min(size - written, block.nbytes)
            f.write(block.reshape(-1)[:n].tobytes())
            written += n
    os.replace(tmp, target)
    return target
