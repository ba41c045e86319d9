"""The sparse have-list: rows for non-zero pages only, holes never read, the dense form still read."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from dwcp_agent.hde.baseline import HaveList, have_list, have_list_blob, header_pages
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


def test_the_have_list_built_while_reading_is_the_one_built_whole(tmp_path: Path) -> None:
    """The destination streams its baseline's page indexes into the compressor as it reads (only
    the hash rows wait for the end); what the source decodes is the same have-list, and the
    budget still refuses a baseline with too many rows."""
    path = tmp_path / "base.img"
    rng = np.random.default_rng(5)
    with open(path, "wb") as f:
        f.truncate(4 * GiB + 12345)
        for offset in (0, 9 * MiB + 4096, GiB, 3 * GiB + 7 * MiB):  # blocks across READ_BLOCK edges
            f.seek(offset)
            page = rng.integers(0, 256, size=(3 * MiB) // 4096 * 4096, dtype=np.uint8)
            page[4096:3 * 4096] = 0  # zero pages inside the data get no row
            f.write(page.tobytes())
    whole = have_list(path)
    streamed = have_list_blob(path)
    assert whole is not None and streamed is not None
    assert header_pages(streamed) == whole.entries == 4 * (768 - 2)
    back = HaveList.from_bytes(streamed, max_pages=1 << 24)
    assert back.pages == whole.pages
    assert np.array_equal(back.index, whole.index) and np.array_equal(back.hashes, whole.hashes)
    assert have_list_blob(path, max_entries=whole.entries - 1) is None
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    blob = have_list_blob(empty)
    assert blob is not None and HaveList.from_bytes(blob).entries == 0
