"""A destination QEMU started by the agent from the configured command template.

It starts paused and waiting for its stream (`-incoming defer -S`), with QMP on a unix socket
the agent owns. It dies with the agent (PR_SET_PDEATHSIG), so an agent killed before the
ownership commit cannot leave a second copy of the VM behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import shlex
import signal
import subprocess
from pathlib import Path

__all__ = ["DestinationQemu", "QemuStartError"]

PR_SET_PDEATHSIG = 1
SOCKET_WAIT_S = 10.0


class QemuStartError(RuntimeError):
    """The template is empty or QEMU exited before opening its QMP socket."""


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class DestinationQemu:
    """The QEMU process this agent started for one incoming migration."""

    def __init__(self, template: str, vm_id: str, run_dir: Path, tag: str) -> None:
        if not template.strip():
            raise QemuStartError("this agent has no live_qemu_command and the request passed no dest_qmp")
        self.qmp_socket = run_dir / f"{tag}.qmp"
        self.log_path = run_dir / f"{tag}.qemu.log"
        self.argv = shlex.split(template.replace("{vm_id}", vm_id)) + [
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off", "-incoming", "defer", "-S"]
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.qmp_socket.unlink(missing_ok=True)
        with self.log_path.open("wb") as log:
            # Popen on the event-loop thread: PDEATHSIG follows the thread that forked.
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         preexec_fn=_die_with_parent)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SOCKET_WAIT_S
        while not self.qmp_socket.exists():
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-300:].strip()
                raise QemuStartError(f"destination QEMU exited with {self.proc.returncode}: {tail}")
            if loop.time() > deadline:
                self.kill()
                raise QemuStartError(f"destination QEMU opened no QMP socket within {SOCKET_WAIT_S:.0f} s")
            await asyncio.sleep(0.05)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def kill(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.qmp_socket.unlink(missing_ok=True)

    def detach(self) -> None:
        """The VM now lives here: forget the process (it outlives this migration's bookkeeping)."""
        self.proc = None
