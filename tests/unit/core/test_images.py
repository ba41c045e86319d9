"""Synthetic VM images: deterministic, sized exactly, with the page mix they claim."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dwcp_agent.migration.images import PROFILES, generate


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", 3 << 20, "vm-mix", seed=1).read_bytes()
    b = generate(tmp_path / "b", 3 << 20, "vm-mix", seed=1).read_bytes()
    c = generate(tmp_path / "c", 3 << 20, "vm-mix", seed=2).read_bytes()
    assert a == b != c


@pytest.mark.parametrize("size", [0, 1, 4097, (1 << 20) + 5])
def test_exact_size(tmp_path: Path, size: int) -> None:
    assert generate(tmp_path / "x", size, "vm-mix", 0).stat().st_size == size


def test_vm_mix_has_its_page_kinds(tmp_path: Path) -> None:
    data = np.frombuffer(generate(tmp_path / "m", 16 << 20, "vm-mix", 3).read_bytes(), np.uint8).reshape(-1, 4096)
    zero = float((~data.any(axis=1)).mean())
    unique = len({bytes(p) for p in data})
    assert abs(zero - PROFILES["vm-mix"].zero) < 0.05
    assert unique < 0.9 * len(data)  # duplicates and zero pages repeat
