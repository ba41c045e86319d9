"""A guard process that acts for an agent that died in the middle of a live migration.

The agent starts it with a pipe on its stdin and writes `disarm` when the guard's job is over.
If the pipe closes without that line, the agent died before the handover was decided, and the
guard does the one thing that keeps exactly one copy of the VM running:
- `kill PID`: the destination QEMU (paused, never committed) is killed;
- `resume QMP_SOCKET`: the source QEMU, if the migration left it paused, is resumed (QEMU's
  monitor takes a new client once the agent's connection is gone).

    python -m dwcp_agent.live.guard kill 1234
    python -m dwcp_agent.live.guard resume /run/dwcp-agent/qmp/vm1.sock
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from dwcp_agent.live.qmp import QemuControl, QemuError

__all__ = ["Guard", "main"]

DISARM = b"disarm\n"
_PAUSED_BY_MIGRATION = ("postmigrate", "finish-migrate", "paused")


class Guard:
    """The agent's handle on a running guard process."""

    def __init__(self, mode: str, target: str) -> None:
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, "-m", "dwcp_agent.live.guard", mode, target],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)

    def disarm(self) -> None:
        """The handover is decided (committed, or rolled back by the agent itself): do nothing."""
        if self.proc is None:
            return
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(DISARM)
                self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.proc = None


async def _resume(socket_path: str) -> None:
    for _ in range(50):  # the dead agent's monitor connection may take a moment to go
        try:
            async with QemuControl(Path(socket_path), "dwcp-live-guard") as qemu:
                if await qemu.run_state() in _PAUSED_BY_MIGRATION:
                    info = await qemu.query_migrate()
                    if info.status not in ("completed", "failed", "cancelled", "none"):
                        with contextlib.suppress(QemuError):
                            await qemu.cancel()
                    await qemu.cont()
                return
        except QemuError:
            await asyncio.sleep(0.1)


def main(argv: list[str]) -> int:
    mode, target = argv
    line = sys.stdin.buffer.readline()
    if line == DISARM:
        return 0
    if mode == "kill":
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(target), signal.SIGKILL)
    elif mode == "resume":
        asyncio.run(_resume(target))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
