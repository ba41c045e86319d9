"""Nemesis runs need root, network namespaces, iptables and tools/nfq-delay: skip with the reason."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tools"))
sys.path.insert(0, str(HERE))

import wanbed  # noqa: E402 (tools/ is not a package)


@pytest.fixture(scope="session")
def nemesis_supported() -> None:
    reason = wanbed.unsupported_reason()
    if reason:
        pytest.skip(reason.replace("WAN test bed", "nemesis run"))
