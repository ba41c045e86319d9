"""Page kernels against plain numpy: zero scan, 128-bit page hashes, in-chunk dedupe."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dwcp_agent._native import pages

PAGE = 4096


def _edge_pages() -> list[np.ndarray]:
    zero = np.zeros(PAGE, np.uint8)
    ones = np.full(PAGE, 0xFF, np.uint8)
    first = zero.copy()
    first[0] = 1
    last = zero.copy()
    last[-1] = 1
    alternating = np.tile(np.repeat(np.array([0, 0xAA], np.uint8), 64), PAGE // 128)
    return [zero, ones, first, last, alternating]


def _scan(chunk: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    n = (len(chunk) + PAGE - 1) // PAGE
    zero = np.empty(n, np.uint8)
    hashes = np.empty((n, 2), np.uint64)
    count = pages.page_hashes(chunk, zero, hashes)
    return count, zero, hashes


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 17])
def test_zero_scan_matches_numpy_for_every_size(size: int) -> None:
    rng = np.random.default_rng(size)
    chunk = np.zeros(size, np.uint8)
    if size > 4096:
        chunk[4096 + int(rng.integers(0, min(4096, size - 4096)))] = 7
    count, zero, _ = _scan(chunk)
    expected = [not chunk[i:i + PAGE].any() for i in range(0, size, PAGE)]
    assert list(zero.astype(bool)) == expected
    assert count == sum(expected)
    mask = np.empty(len(expected), np.uint8)
    assert pages.zero_page_mask(chunk, mask) == count


def test_edge_pages_hash_apart_and_one_byte_changes_the_hash() -> None:
    chunk = np.concatenate(_edge_pages())
    count, zero, hashes = _scan(chunk)
    assert count == 1 and zero[0] == 1 and not zero[1:].any()
    nonzero = {tuple(h) for h in hashes[1:].tolist()}
    assert len(nonzero) == 4
    base = np.random.default_rng(1).integers(0, 256, PAGE, dtype=np.uint8)
    seen = {pages.hash128(base)}
    for pos in (0, 1, 63, 64, 2047, PAGE - 1):
        changed = base.copy()
        changed[pos] ^= 0x01
        seen.add(pages.hash128(changed))
    assert len(seen) == 7


def test_page_hashes_agree_with_hash128_per_page() -> None:
    chunk = np.random.default_rng(2).integers(0, 256, 3 * PAGE + 100, dtype=np.uint8)
    _, _, hashes = _scan(chunk)
    for p in range(4):
        assert tuple(hashes[p].tolist()) == pages.hash128(chunk[p * PAGE:(p + 1) * PAGE])


def test_swapping_two_stripes_changes_the_hash() -> None:
    page = np.random.default_rng(3).integers(0, 256, PAGE, dtype=np.uint8)
    swapped = page.copy()
    swapped[:64], swapped[64:128] = page[64:128], page[:64]
    assert pages.hash128(page) != pages.hash128(swapped)


def _reference_dedupe(chunk: np.ndarray) -> tuple[list[int], list[int]]:
    n = (len(chunk) + PAGE - 1) // PAGE
    full = len(chunk) // PAGE
    kinds, refs, first = [], [], {}
    for p in range(n):
        page = chunk[p * PAGE:(p + 1) * PAGE].tobytes()
        if not any(page):
            kinds.append(1)
            refs.append(0)
        elif p < full and page in first:
            kinds.append(2)
            refs.append(first[page])
        else:
            if p < full:
                first.setdefault(page, p)
            kinds.append(0)
            refs.append(0)
    return kinds, refs


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=24), st.integers(0, PAGE - 1))
def test_in_chunk_dedupe_matches_a_reference(choices: list[int], tail: int) -> None:
    templates = [*_edge_pages(), np.random.default_rng(9).integers(0, 256, PAGE, dtype=np.uint8)]
    chunk = np.concatenate([templates[c] for c in choices] + [templates[5][:tail]])
    _, zero, hashes = _scan(chunk)
    n = len(zero)
    kinds = np.empty(n, np.uint8)
    refs = np.empty(n, np.uint64)
    pages.dedupe_in_chunk(chunk, zero, hashes, kinds, refs)
    exp_kinds, exp_refs = _reference_dedupe(chunk)
    assert kinds.tolist() == exp_kinds
    assert refs.tolist() == exp_refs


def test_forced_fingerprint_collision_is_confirmed_byte_for_byte() -> None:
    rng = np.random.default_rng(4)
    distinct = rng.integers(0, 256, (8, PAGE), dtype=np.uint8)
    chunk = np.concatenate([distinct.reshape(-1), distinct[3]])
    old = pages.set_fingerprint_mask(0)
    try:
        _, zero, hashes = _scan(chunk)
        assert not hashes[:, 0].any()      # every fingerprint collides
        kinds = np.empty(9, np.uint8)
        refs = np.empty(9, np.uint64)
        dups = pages.dedupe_in_chunk(chunk, zero, hashes, kinds, refs)
    finally:
        pages.set_fingerprint_mask(old)
    assert dups == 0 and not kinds.any()   # all literal: no colliding page was trusted


def test_kernels_reject_short_output_buffers() -> None:
    chunk = np.zeros(2 * PAGE, np.uint8)
    with pytest.raises(ValueError):
        pages.page_hashes(chunk, np.empty(1, np.uint8), np.empty((2, 2), np.uint64))
    with pytest.raises(ValueError):
        pages.zero_page_mask(chunk, np.empty(1, np.uint8))
