"""The native zero-page scan agrees with a plain Python reference on every shape of input."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from dwcp_agent._native import pages

PAGE = 4096


def reference_mask(data: bytes) -> list[int]:
    """Pure-Python zero-page scan: the definition the kernel must match."""
    return [int(not any(data[i:i + PAGE])) for i in range(0, len(data), PAGE)]


@given(st.integers(0, 9), st.lists(st.tuples(st.integers(0, 9 * PAGE), st.integers(1, 255)), max_size=6),
       st.integers(0, PAGE - 1))
def test_zero_page_mask_matches_reference(n_pages: int, pokes: list[tuple[int, int]], tail: int) -> None:
    size = n_pages * PAGE + tail
    data = bytearray(size)
    for pos, value in pokes:
        if pos < size:
            data[pos] = value
    mask = np.zeros(n_pages + 1, np.uint8)
    count = pages.zero_page_mask(bytes(data), mask)
    expected = reference_mask(bytes(data))
    assert mask[: len(expected)].tolist() == expected
    assert count == sum(expected)
    assert pages.is_zero(bytes(data)) == all(expected)
