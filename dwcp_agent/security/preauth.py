"""Bounds on what an unauthenticated peer can make a listener do.

Before a peer has proven itself it may hold only a capped number of connections (in total and
per source address), each for at most one handshake deadline, and whatever it sends is logged
truncated and rate-limited, so neither memory, threads nor the log grow with its effort.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import socket
import threading
import time
from collections import defaultdict

PEER_STRING_MAX = 64


def truncate(text: object, limit: int = PEER_STRING_MAX) -> str:
    """A peer-supplied string fit for a log line: printable, at most `limit` characters."""
    s = str(text)
    cut = s[:limit]
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in cut)
    return cleaned + ("..." if len(s) > limit else "")


class ConnectionLimiter:
    """Admits a connection when fewer than `total` are open, and fewer than `per_source` from its address."""

    def __init__(self, total: int, per_source: int) -> None:
        self.total = total
        self.per_source = per_source
        self._open = 0
        self._by_source: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def acquire(self, source: str) -> str:
        """'' when admitted (release it later), else the reason for refusing."""
        with self._lock:
            if self._open >= self.total:
                return "too_many_connections"
            if self._by_source[source] >= self.per_source:
                return "too_many_from_source"
            self._open += 1
            self._by_source[source] += 1
            return ""

    def release(self, source: str) -> None:
        with self._lock:
            self._open -= 1
            self._by_source[source] -= 1
            if self._by_source[source] <= 0:
                del self._by_source[source]

    @property
    def open(self) -> int:
        with self._lock:
            return self._open


class DeadlineReaper:
    """One thread that shuts down sockets whose handshake deadline passed.

    A per-read timeout lets a peer that trickles a byte now and then hold a connection for ever;
    a deadline on the whole handshake does not. Shutting the socket down wakes whatever thread
    is blocked on it, which then fails its handshake and frees its worker.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []
        self._socks: dict[int, socket.socket] = {}
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self.reaped = 0
        self._thread = threading.Thread(target=self._run, name="handshake-deadlines", daemon=True)
        self._thread.start()

    def watch(self, sock: socket.socket, seconds: float) -> int:
        """Shut `sock` down after `seconds` unless `done` comes first. A duplicate descriptor is
        kept, so the deadline still holds after ssl has taken the socket object over."""
        dup = sock.dup()
        with self._cond:
            token = next(self._ids)
            self._socks[token] = dup
            heapq.heappush(self._heap, (time.monotonic() + seconds, token))
            self._cond.notify()
            return token

    def done(self, token: int) -> None:
        """The handshake finished in time: leave the socket alone."""
        with self._cond:
            dup = self._socks.pop(token, None)
        if dup is not None:
            dup.close()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
            pending, self._socks = list(self._socks.values()), {}
        for dup in pending:
            dup.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cond.wait(timeout=(self._heap[0][0] - time.monotonic()) if self._heap else None)
                if self._stopped:
                    return
                _, token = heapq.heappop(self._heap)
                sock = self._socks.pop(token, None)
            if sock is not None:
                self.reaped += 1
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


class RateLimitedLog:
    """At most `burst` lines per `window` seconds; then one line saying how many were held back."""

    def __init__(self, logger: logging.Logger, burst: int = 10, window: float = 10.0) -> None:
        self.logger = logger
        self.burst = burst
        self.window = window
        self._start = time.monotonic()
        self._count = 0
        self._suppressed = 0
        self._lock = threading.Lock()

    def warning(self, msg: str, *args: object, **kwargs: object) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._start >= self.window:
                if self._suppressed:
                    self.logger.warning("%d similar messages suppressed in the last %.0f s", self._suppressed,
                                        self.window)
                self._start, self._count, self._suppressed = now, 0, 0
            if self._count >= self.burst:
                self._suppressed += 1
                return
            self._count += 1
        self.logger.warning(msg, *args, **kwargs)  # type: ignore[arg-type]
