"""A destination QEMU started by the agent from the configured command template.

It starts paused and waiting for its stream (`-incoming defer -S`), with QMP on a unix socket
the agent owns. Until it runs, a guard (guard.py) watches the agent: if the agent dies, the
guard kills QEMU, so an agent killed before the commit cannot leave a second copy of the VM
behind. Once the handover line (outcome.py) is up the guard also holds it, and `cont`s QEMU
instead if the source says the ownership commit went through, so an agent killed between the
commit and its own `cont` does not lose the VM. Once the VM runs the guard is disarmed, so the
VM outlives the agent (restarts, upgrades).
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import subprocess
from pathlib import Path

from dwcp_agent.live.guard import Guard
from dwcp_agent.live.outcome import OutcomeLine

__all__ = ["DestinationQemu", "QemuStartError"]

SOCKET_WAIT_S = 10.0


class QemuStartError(RuntimeError):
    """The template is empty or QEMU exited before opening its QMP socket."""


class DestinationQemu:
    """The QEMU process this agent started for one incoming migration, and its guard."""

    def __init__(self, template: str, vm_id: str, run_dir: Path, tag: str) -> None:
        if not template.strip():
            raise QemuStartError("this agent has no live_qemu_command and the request passed no dest_qmp")
        self.qmp_socket = run_dir / f"{tag}.qmp"
        self.log_path = run_dir / f"{tag}.qemu.log"
        self.argv = [*shlex.split(template.replace("{vm_id}", vm_id)),
                     "-qmp", f"unix:{self.qmp_socket},server=on,wait=off", "-incoming", "defer", "-S"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.guard: Guard | None = None

    async def start(self) -> None:
        self.qmp_socket.unlink(missing_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        self.guard = Guard("kill", str(self.proc.pid))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SOCKET_WAIT_S
        while not self.qmp_socket.exists():
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-300:].strip()
                self.kill()
                raise QemuStartError(f"destination QEMU exited: {tail}")
            if loop.time() > deadline:
                self.kill()
                raise QemuStartError(f"destination QEMU opened no QMP socket within {SOCKET_WAIT_S:.0f} s")
            await asyncio.sleep(0.05)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _release_guard(self) -> None:
        if self.guard is not None:
            self.guard.disarm()
            self.guard = None

    def guard_handover(self, line: OutcomeLine) -> None:
        """The handover line is up: the guard from now on also waits for the source's `commit`."""
        if self.proc is None:
            return
        previous = self.guard
        self.guard = Guard("handover", str(self.proc.pid), str(self.qmp_socket), line=line)
        if previous is not None:
            previous.disarm()

    def kill(self) -> None:
        """The paused copy goes: the source stays the VM."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            self.proc = None
        self._release_guard()
        self.qmp_socket.unlink(missing_ok=True)

    def commit(self) -> None:
        """The VM runs here (ownership moved): from now on it outlives this agent."""
        self._release_guard()
        self.proc = None
