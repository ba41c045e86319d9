"""Chunk buffers reused across migrations and streams.

A migration needs tens of megabytes of chunk buffers. Allocating them per migration means the
kernel hands out and zeroes fresh pages every time (on a VM guest, the first touch of a page can
also cost a hypervisor fault: measured here at 0.4-0.5 GB/s against ~4 GB/s for reused pages).
The agent keeps one pool and lends buffers out; idle buffers beyond `max_idle_bytes` are freed.
"""

from __future__ import annotations

import collections
import queue
import threading


class BufferPool:
    """Lends bytearrays by size; thread-safe."""

    def __init__(self, max_idle_bytes: int = 512 << 20) -> None:
        self.max_idle_bytes = max_idle_bytes
        self._idle: dict[int, list[bytearray]] = {}
        self._idle_bytes = 0
        self._lock = threading.Lock()

    def take(self, size: int, count: int = 1) -> list[bytearray]:
        """`count` buffers of exactly `size` bytes (contents undefined)."""
        with self._lock:
            idle = self._idle.get(size, [])
            reused = idle[len(idle) - min(count, len(idle)):]
            del idle[len(idle) - len(reused):]
            self._idle_bytes -= size * len(reused)
        return reused + [bytearray(size) for _ in range(count - len(reused))]

    def give(self, buffers: list[bytearray]) -> None:
        """Return buffers; those over the idle bound are dropped (freed)."""
        with self._lock:
            for buf in buffers:
                if self._idle_bytes + len(buf) > self.max_idle_bytes:
                    break
                self._idle.setdefault(len(buf), []).append(buf)
                self._idle_bytes += len(buf)

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes


class FreeBuffers:
    """The free chunk buffers of one migration, last in first out: the buffer freed last is
    taken next, so the few buffers in use stay in the CPU cache (a FIFO walks every buffer of
    max_inflight_bytes: reading the source into a cold buffer cost 25 % more, measured on ext4
    and tmpfs). put/get are C calls (a deque of buffers, a SimpleQueue of tokens), unlike
    queue.LifoQueue's Python locking."""

    def __init__(self) -> None:
        self._stack: collections.deque[bytearray] = collections.deque()
        self._tokens: queue.SimpleQueue[None] = queue.SimpleQueue()

    def put(self, buf: bytearray) -> None:
        self._stack.append(buf)
        self._tokens.put(None)  # after the append: a token always has a buffer behind it

    def get(self, timeout: float | None = None) -> bytearray:
        """The buffer freed last; raises queue.Empty when none is freed within `timeout`."""
        self._tokens.get(timeout=timeout)
        return self._stack.pop()
