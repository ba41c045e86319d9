"""XOR + zero-run delta: round trips on edge pages, size limit, and strict decoding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dwcp_agent._native import delta

PAGE = 4096


def _roundtrip(new: np.ndarray, old: np.ndarray) -> int:
    out = np.empty(2 * len(new) + 16, np.uint8)
    n = delta.xor_encode(new, old, out)
    assert n >= 0
    page = old.copy()
    delta.xor_decode(out[:n], page)
    assert np.array_equal(page, new)
    return n


def _reference_decode(stream: bytes, old: bytes) -> bytes:
    """Straight-line reading of the format in native/delta.pyx, for cross-checking."""
    page, i, pos = bytearray(old), 0, 0

    def varint() -> int:
        nonlocal i
        value, shift = 0, 0
        while True:
            b = stream[i]
            i += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7

    while i < len(stream):
        pos += varint()
        run = varint()
        for j in range(run):
            page[pos + j] ^= stream[i + j]
        i += run
        pos += run
    return bytes(page)


EDGE = {
    "zero": np.zeros(PAGE, np.uint8),
    "ones": np.full(PAGE, 0xFF, np.uint8),
    "alternating": np.tile(np.repeat(np.array([0, 0x5A], np.uint8), 16), PAGE // 32),
    "random": np.random.default_rng(0).integers(0, 256, PAGE, dtype=np.uint8),
}


@pytest.mark.parametrize("old_name", list(EDGE))
@pytest.mark.parametrize("new_name", list(EDGE))
def test_edge_pages_roundtrip_against_each_other(old_name: str, new_name: str) -> None:
    _roundtrip(EDGE[new_name], EDGE[old_name])


@pytest.mark.parametrize("pos", [0, 1, 7, 8, PAGE - 9, PAGE - 8, PAGE - 1])
def test_one_changed_byte_costs_a_few_bytes(pos: int) -> None:
    old = EDGE["random"]
    new = old.copy()
    new[pos] ^= 0x80
    assert _roundtrip(new, old) <= 4


def test_unchanged_page_is_the_empty_stream() -> None:
    assert _roundtrip(EDGE["random"], EDGE["random"]) == 0


def test_encoder_gives_up_when_the_limit_is_reached() -> None:
    out = np.empty(100, np.uint8)
    assert delta.xor_encode(EDGE["random"], EDGE["zero"], out) == -1


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=600), st.lists(st.tuples(st.integers(0, 599), st.integers(1, 255)),
                                                     max_size=40))
def test_any_change_pattern_roundtrips_and_matches_the_reference(old_bytes: bytes,
                                                                 edits: list[tuple[int, int]]) -> None:
    old = np.frombuffer(old_bytes, np.uint8).copy()
    new = old.copy()
    for pos, xor in edits:
        if pos < len(new):
            new[pos] ^= xor
    out = np.empty(2 * len(new) + 16, np.uint8)
    n = delta.xor_encode(new, old, out)
    assert _reference_decode(out[:n].tobytes(), old.tobytes()) == new.tobytes()
    _roundtrip(new, old)


@pytest.mark.parametrize("stream", [
    b"\x00",               # zero run without a dirty run
    b"\x00\x00",           # dirty run of length 0
    b"\x00\x05\x01",       # dirty run longer than the stream
    b"\x80\x80\x80\x01",   # varint longer than 3 bytes
    b"\x81\x40\x01\x00",   # zero run past the page
    b"\xff",               # truncated varint
])
def test_malformed_streams_raise_value_error(stream: bytes) -> None:
    page = np.zeros(PAGE, np.uint8)
    with pytest.raises(ValueError):
        delta.xor_decode(np.frombuffer(stream, np.uint8), page)
