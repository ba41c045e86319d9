"""The sparse have-list: rows for non-zero pages only, holes never read, the dense form still read."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from dwcp_agent.hde.baseline import HaveList, have_list, header_pages
from dwcp_agent.hde.codecs import CodecError

MiB, GiB = 1 << 20, 1 << 30


def test_a_sparse_baseline_costs_rows_for_its_data_only(tmp_path: Path) -> None:
    path = tmp_path / "base.img"
    with open(path, "wb") as f:
        f.truncate(16 * GiB)
        f.seek(8 * GiB)
        f.write(os.urandom(MiB) + bytes(MiB) + os.urandom(4096))
    have = have_list(path)
    assert have is not None
    assert have.pages == 16 * GiB // 4096
    assert have.entries == 257, "one row per non-zero page; zero pages and holes have none"
    assert have.index is not None and int(have.index[0]) == 8 * GiB // 4096
    blob = have.to_bytes()
    assert header_pages(blob) == 257
    assert len(blob) < 8 * 1024
    back = HaveList.from_bytes(blob, max_pages=1 << 24)
    assert back.pages == have.pages
    assert np.array_equal(back.index, have.index) and np.array_equal(back.hashes, have.hashes)
    assert have_list(path, max_entries=100) is None, "over the budget: no have-list"


def test_a_dense_have_list_round_trips_through_the_sparse_form() -> None:
    rng = np.random.default_rng(3)
    dense = rng.integers(1, 1 << 63, size=(64, 2), dtype=np.uint64)
    dense[10:20] = 0
    back = HaveList.from_bytes(HaveList(dense).to_bytes())
    index, rows = back.sparse()
    assert list(index) == [i for i in range(64) if not 10 <= i < 20]
    assert np.array_equal(rows, dense[index])


def test_malformed_sparse_have_lists_are_codec_errors() -> None:
    good = HaveList(np.arange(1, 9, dtype=np.uint64).reshape(4, 2)).to_bytes()
    for bad in (good[:10], good[:-3], good[:24] + b"\x00" * 8, b"DWHS" + bytes(40)):
        with pytest.raises(CodecError):
            HaveList.from_bytes(bad)
    with pytest.raises(CodecError):
        HaveList.from_bytes(good, max_pages=2)
