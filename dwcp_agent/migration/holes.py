"""The chunk runs a source announced as holes, kept as ranges (never one entry per chunk).

Hole frames arrive on several streams in any order; the set only appends under a lock and
merges when asked, so a 1 TiB image of holes costs a few entries, not a million.
"""

from __future__ import annotations

import bisect
import threading


class HoleSet:
    """Thread-safe set of chunk runs (first chunk, count)."""

    def __init__(self) -> None:
        self._runs: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def add(self, first: int, count: int) -> None:
        if count > 0:
            with self._lock:
                self._runs.append((first, count))

    def merged(self) -> list[tuple[int, int]]:
        """Sorted, non-overlapping runs."""
        with self._lock:
            out: list[tuple[int, int]] = []
            for first, count in sorted(self._runs):
                if out and first <= out[-1][0] + out[-1][1]:
                    prev_first, prev_count = out[-1]
                    out[-1] = (prev_first, max(prev_count, first + count - prev_first))
                else:
                    out.append((first, count))
            self._runs = list(out)
        return out

    @staticmethod
    def contains(merged: list[tuple[int, int]], index: int) -> bool:
        """Whether chunk `index` lies in one of the `merged` runs."""
        i = bisect.bisect_right(merged, (index, float("inf"))) - 1
        return i >= 0 and index < merged[i][0] + merged[i][1]
