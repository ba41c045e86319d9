"""WAN test bed fixtures: two shaped namespaces per test, removed afterwards even on failure.

Tests that use `wan_bed` skip with the exact reason when root, netns, tc/iptables or the
nfq-delay program are missing (tools/wanbed.py: unsupported_reason).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import wanbed


@pytest.fixture(scope="session")
def wan_supported() -> None:
    reason = wanbed.unsupported_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def wan_bed(wan_supported: None) -> Iterator[Callable[[wanbed.Profile | str], wanbed.WanBed]]:
    """Factory: `wan_bed("internet")` returns a running bed; all beds are torn down at teardown."""
    beds: list[wanbed.WanBed] = []

    def make(profile: wanbed.Profile | str) -> wanbed.WanBed:
        bed = wanbed.WanBed(profile)
        beds.append(bed)
        bed.__enter__()
        return bed

    try:
        yield make
    finally:
        for bed in beds:
            bed.down()
