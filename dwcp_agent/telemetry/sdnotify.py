"""systemd service notifications (sd_notify) without libsystemd.

With `Type=notify` systemd waits for `READY=1` before it considers the agent started, and with
`WatchdogSec=` it restarts an agent that stops sending `WATCHDOG=1`. The protocol is one
datagram of `KEY=VALUE` lines to the AF_UNIX socket named by `$NOTIFY_SOCKET` (a leading `@`
means the abstract namespace). Outside systemd the variable is unset and every call is a
cheap no-op returning False, so the agent calls these unconditionally.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping

__all__ = ["Notifier"]


class Notifier:
    """Sends state changes to systemd; one per agent process."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.address = environ.get("NOTIFY_SOCKET") or None
        self.watchdog_usec = _watchdog_usec(environ)

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notify socket."""
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send `KEY=VALUE` fields in one datagram; False when not under systemd or on error."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(target)
                sock.sendall("\n".join(fields).encode())
        except OSError:
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """Start-up finished: listeners bound, components up."""
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        """A SIGHUP reload began; `ready()` ends it. MONOTONIC_USEC lets systemd order the two."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        """Graceful shutdown began."""
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """Free-form status line shown by `systemctl status`."""
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        """The agent is alive; must be sent more often than WatchdogSec."""
        return self.notify("WATCHDOG=1")

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1 (half of WatchdogSec), None when no watchdog is armed."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    async def run_watchdog(self, healthy: Callable[[], bool] = lambda: True) -> None:
        """Ping the watchdog while `healthy()`; a wedged agent stops pinging and systemd restarts it.

        Returns at once when no watchdog is armed; cancel the task to stop it.
        """
        interval = self.watchdog_interval_s
        if interval is None:
            return
        while True:
            if healthy():
                self.watchdog()
            await asyncio.sleep(interval)


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC when it is meant for this process (WATCHDOG_PID unset or ours)."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec)
