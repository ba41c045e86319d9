"""The sender's free chunk buffers: last in first out, blocking with a timeout, nothing lost."""

from __future__ import annotations

import queue
import threading

import pytest

from dwcp_agent.migration.buffers import FreeBuffers


def test_the_buffer_freed_last_is_taken_first() -> None:
    free = FreeBuffers()
    bufs = [bytearray(8) for _ in range(4)]
    for buf in bufs:
        free.put(buf)
    assert [free.get(timeout=1) for _ in bufs] == bufs[::-1]


def test_get_waits_for_a_put_and_times_out_when_none_comes() -> None:
    free = FreeBuffers()
    with pytest.raises(queue.Empty):
        free.get(timeout=0.01)
    buf = bytearray(8)
    threading.Timer(0.05, free.put, args=(buf,)).start()
    assert free.get(timeout=30) is buf


def test_concurrent_puts_and_gets_hand_out_every_buffer_exactly_once() -> None:
    free = FreeBuffers()
    bufs = [bytearray(1) for _ in range(2000)]
    taken: list[bytearray] = []
    lock = threading.Lock()

    def consumer() -> None:
        for _ in range(500):
            buf = free.get(timeout=30)
            with lock:
                taken.append(buf)

    def producer(part: list[bytearray]) -> None:
        for buf in part:
            free.put(buf)

    threads = [threading.Thread(target=consumer) for _ in range(4)]
    threads += [threading.Thread(target=producer, args=(bufs[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(map(id, taken)) == sorted(map(id, bufs))
