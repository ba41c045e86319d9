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


# The page hash spelled out in Python (native/pages.pyx): the stripe loop is compiled once per
# vector width and picked at load time, and every clone must give these same values, or a
# have-list computed on one host would not match the pages of another.
_M64 = (1 << 64) - 1
_SEED = [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
         0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x27D4EB2F165667C5, 0x94D049BB133111EB]
_KEY = [0xBE4BA423396CFEB8, 0x1CAD21F72C81017C, 0xDB979083E96DD4DE, 0x1F67B3B7A4A44072,
        0x78E5C0CC4EE679CB, 0x2172FFCC7DD05A82, 0x8E2443F7744608B8, 0x4C263A81E69035E0]
_STEP, _FIN_LO, _FIN_HI = 0xA0761D6478BD642F, 0xE7037ED1A0B428DB, 0x8EBC6AF09C88C6E3


def _fold_mul(a: int, b: int) -> int:
    p = a * b
    return (p & _M64) ^ (p >> 64)


def _avalanche(h: int) -> int:
    h ^= h >> 33
    h = h * 0xFF51AFD7ED558CCD & _M64
    h ^= h >> 29
    h = h * 0xC4CEB9FE1A85EC53 & _M64
    return h ^ (h >> 32)


def _reference_hash128(data: bytes) -> tuple[int, int]:
    acc = list(_SEED)
    stripes = -(-len(data) // 64)
    padded = data + bytes(stripes * 64 - len(data))
    for s in range(stripes):
        w = [int.from_bytes(padded[64 * s + 8 * i: 64 * s + 8 * i + 8], "little") for i in range(8)]
        pos = s * _STEP & _M64
        for i in range(0, 8, 2):
            k0, k1 = w[i] ^ (_KEY[i] + pos & _M64), w[i + 1] ^ (_KEY[i + 1] + pos & _M64)
            acc[i] = acc[i] + (k0 & 0xFFFFFFFF) * (k0 >> 32) + w[i + 1] & _M64
            acc[i + 1] = acc[i + 1] + (k1 & 0xFFFFFFFF) * (k1 >> 32) + w[i] & _M64
    n = len(data)
    lo, hi = n * _FIN_LO & _M64, n * _FIN_HI + 1 & _M64
    for i in range(4):
        lo = lo + _fold_mul(acc[2 * i] ^ _KEY[2 * i + 1], acc[2 * i + 1] ^ _FIN_LO) & _M64
        hi = hi + _fold_mul(acc[i] ^ _FIN_HI, acc[i + 4] ^ _KEY[i]) & _M64
    return _avalanche(lo), _avalanche(hi ^ (lo >> 7))


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("length", [1, 63, 64, 65, 100, 127, 128, 129, 4095, 4096, 8192 + 17])
def test_page_hash_matches_the_python_reference(length: int, portable: bool) -> None:
    """Both stripe loops (AVX-512 where the CPU has it, the portable C loop) give the reference's
    hashes, through hash128 and through page_hashes."""
    data = np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8)
    was = pages.use_portable_stripes(portable)
    try:
        assert pages.hash128(data) == _reference_hash128(data.tobytes())
        n = (length + PAGE - 1) // PAGE
        zero, hashes = np.empty(n, np.uint8), np.empty((n, 2), np.uint64)
        pages.page_hashes(data, zero, hashes)
        assert [tuple(row) for row in hashes.tolist()] == [
            _reference_hash128(data[p * PAGE: (p + 1) * PAGE].tobytes()) for p in range(n)]
    finally:
        pages.use_portable_stripes(was)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=40), st.integers(1, PAGE), st.integers(0, 2**32 - 1))
def test_gather_literals_copies_the_literal_pages_in_order(kinds: list[int], last_page: int, seed: int) -> None:
    """Any kind map, a short or full last page: the literal pages (kind 0), in page order, and nothing
    else; the last page as long as it is. The bytes after them in `out` are left as they were."""
    raw_len = (len(kinds) - 1) * PAGE + last_page
    chunk = np.random.default_rng(seed).integers(0, 256, raw_len, dtype=np.uint8)
    kind_arr = np.array(kinds, np.uint8)
    expected = b"".join(chunk[p * PAGE: (p + 1) * PAGE].tobytes() for p, k in enumerate(kinds) if k == 0)
    out = np.full(len(kinds) * PAGE + 8, 0xEE, np.uint8)
    assert pages.gather_literals(chunk, kind_arr, out) == len(expected)
    assert out[: len(expected)].tobytes() == expected
    assert (out[len(expected):] == 0xEE).all()


def test_gather_literals_refuses_a_short_output_or_kind_map() -> None:
    chunk = np.ones(3 * PAGE, np.uint8)
    with pytest.raises(ValueError, match="cannot hold"):
        pages.gather_literals(chunk, np.zeros(3, np.uint8), np.empty(3 * PAGE - 1, np.uint8))
    with pytest.raises(ValueError, match="kinds"):
        pages.gather_literals(chunk, np.zeros(2, np.uint8), np.empty(3 * PAGE, np.uint8))
    assert pages.gather_literals(chunk, np.ones(3, np.uint8), np.empty(0, np.uint8)) == 0  # no literal page
