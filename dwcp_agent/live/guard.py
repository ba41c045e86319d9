"""A guard process that acts for an agent that died in the middle of a live migration.

The agent starts it with a pipe on its stdin and writes `disarm` when the guard's job is over.
If the pipe closes without that line, the agent died before the handover was decided, and the
guard does the one thing that keeps exactly one copy of the VM running:
- `kill PID`: the destination QEMU (paused, never committed) is killed;
- `resume QMP_SOCKET`: the source QEMU, if the migration left it paused, is resumed (QEMU's
  monitor takes a new client once the agent's connection is gone);
- `handover PID QMP_SOCKET FD` (destination, once the handover line (outcome.py) is up): if the
  source says `commit` on the line, the paused destination QEMU, which owns the VM now, is
  `cont`ed and `running` said back; if the line closes without it (or stays silent), it is killed;
- `quit QMP_SOCKET FD` (source, after the ACP commit): once the destination says `running`, the
  paused source QEMU is quit (only if its migration completed; it is never resumed).

The agent passes the handover line as an inherited descriptor FD, and its secret on stdin
(`line <secret hex> <context hex>`, before `disarm`).

    python -m dwcp_agent.live.guard kill 1234
    python -m dwcp_agent.live.guard resume /run/dwcp-agent/qmp/vm1.sock
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from dwcp_agent.live.outcome import COMMIT, RUNNING, OutcomeLine
from dwcp_agent.live.qmp import QemuControl, QemuError

__all__ = ["Guard", "main"]

DISARM = b"disarm\n"
# How long a guard waits on the handover line for the other side's word once its agent is gone:
# the source's ACP commit (bounded by the registry's timeout) or the destination's `cont`.
LINE_WAIT_S = 60.0
_PAUSED_BY_MIGRATION = ("postmigrate", "finish-migrate", "paused")


class Guard:
    """The agent's handle on a running guard process."""

    def __init__(self, mode: str, *targets: str, line: OutcomeLine | None = None) -> None:
        args = [*targets]
        fds: tuple[int, ...] = ()
        if line is not None:
            fds = (line.sock.fileno(),)
            args.append(str(fds[0]))
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, "-m", "dwcp_agent.live.guard", mode, *args],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True, pass_fds=fds)
        if line is not None and self.proc.stdin is not None:
            self.proc.stdin.write(b"line %s %s\n" % (line.secret.hex().encode(), line.context.hex().encode()))
            self.proc.stdin.flush()

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


async def _with_qemu(socket_path: str, act: str) -> None:
    """`act` on the QEMU behind `socket_path`: resume (a paused source), cont (the committed
    destination) or quit (the source after the destination runs)."""
    for _ in range(50):  # the dead agent's monitor connection may take a moment to go
        try:
            async with QemuControl(Path(socket_path), "dwcp-live-guard") as qemu:
                state = await qemu.run_state()
                info = await qemu.query_migrate()
                if act == "resume" and state in _PAUSED_BY_MIGRATION:
                    if info.status not in ("completed", "failed", "cancelled", "none"):
                        with contextlib.suppress(QemuError):
                            await qemu.cancel()
                    await qemu.cont()
                elif act == "cont" and state != "running" and info.status == "completed":
                    await qemu.cont()
                elif act == "quit" and state in _PAUSED_BY_MIGRATION and info.status == "completed":
                    await qemu.quit()
                return
        except QemuError:
            await asyncio.sleep(0.1)


def _kill(pid: str) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(int(pid), signal.SIGKILL)


def _line(fd: str, header: bytes) -> OutcomeLine | None:
    """The inherited handover line, or None if the agent died before passing its secret."""
    parts = header.split()
    if len(parts) != 3 or parts[0] != b"line":
        return None
    return OutcomeLine.from_secret(socket.socket(fileno=int(fd)), bytes.fromhex(parts[1].decode()),
                                   bytes.fromhex(parts[2].decode()))


def main(argv: list[str]) -> int:
    mode, *targets = argv
    header = sys.stdin.buffer.readline() if mode in ("handover", "quit") else b""
    if header == DISARM or sys.stdin.buffer.readline() == DISARM:
        return 0
    if mode == "kill":
        _kill(targets[0])
    elif mode == "resume":
        asyncio.run(_with_qemu(targets[0], "resume"))
    elif mode == "handover":
        pid, qmp, fd = targets
        line = _line(fd, header)
        if line is not None and line.wait_for(COMMIT, LINE_WAIT_S):
            asyncio.run(_with_qemu(qmp, "cont"))
            with contextlib.suppress(OSError):
                line.say(RUNNING)
        else:
            _kill(pid)
    elif mode == "quit":
        qmp, fd = targets
        line = _line(fd, header)
        if line is not None and line.wait_for(RUNNING, LINE_WAIT_S):
            asyncio.run(_with_qemu(qmp, "quit"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
