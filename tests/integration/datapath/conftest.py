"""Fixtures for data-path tests: a receiver on loopback, a source directory, a migrate helper."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
from datapath_support import Migrate, Receiver, run_migration


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(tmp_path)
    yield r
    r.stop()


@pytest.fixture
def src_dir(tmp_path: Path) -> Path:
    d = tmp_path / "src"
    d.mkdir(exist_ok=True)
    return d


@pytest.fixture
def migrate(tmp_path: Path) -> Migrate:
    return functools.partial(run_migration, tmp_path)
