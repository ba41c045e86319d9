"""The destination agent's side of a live migration.

It gets (or starts) a paused QEMU waiting for its stream, checks it against the source's, feeds
it the tunnelled stream and sends its return path back. The VM runs here only after the source
says the ownership commit went through (`Commit` on the tunnel, or `commit` on the handover line,
outcome.py): then `cont`. Anything else before that (Abort, the tunnel breaking, the source agent
dying) kills this paused copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from pathlib import Path

from dwcp_agent.config import Config
from dwcp_agent.live import messages
from dwcp_agent.live.compat import incompatibilities
from dwcp_agent.live.frames import TunnelError
from dwcp_agent.live.guard import LINE_WAIT_S
from dwcp_agent.live.hold import hold_for_test
from dwcp_agent.live.outcome import COMMIT, RUNNING, OutcomeLine
from dwcp_agent.live.process import DestinationQemu, QemuStartError
from dwcp_agent.live.qmp import QemuControl, QemuError, VmFacts
from dwcp_agent.live.tunnel import Tunnel
from dwcp_agent.telemetry.metrics import Metrics

__all__ = ["IncomingLive"]

log = logging.getLogger("dwcp_agent.live")
OFFER_TIMEOUT_S = 30.0
POLL_S = 0.02
# The source may take this long between messages (a long pre-copy sends none).
COMMIT_TIMEOUT_S = 3600.0


class _Refused(Exception):
    def __init__(self, problem: str, reason: str) -> None:
        super().__init__(reason)
        self.problem = problem


class IncomingLive:
    """One incoming live migration on its tunnel connection; `serve()` runs it to the end."""

    def __init__(self, config: Config, metrics: Metrics, tunnel: Tunnel, peer_node: str, run_dir: Path,
                 key: bytes) -> None:
        self.config = config
        self.key = key
        self.metrics = metrics
        self.tunnel = tunnel
        self.peer_node = peer_node
        self.run_dir = run_dir
        self.process: DestinationQemu | None = None
        self.qemu: QemuControl | None = None
        self.offer: messages.Offer | None = None
        self.state = "setup"
        self.received = False  # this QEMU loaded the whole VM (pre-copy): it may become the VM
        self.line: OutcomeLine | None = None

    def attach_outcome(self, sock: socket.socket) -> bool:
        """The source's handover line arrived: from now on a guard holds it too (process.py)."""
        if self.offer is None or self.line is not None:
            return False
        self.line = OutcomeLine(sock, self.key, self.tunnel.session, self.offer.migration_id)
        if self.process is not None:
            self.process.guard_handover(self.line)
        return True

    async def serve(self) -> None:
        self.tunnel.start_reader()
        try:
            first = await self.tunnel.recv_control(OFFER_TIMEOUT_S)
            if not isinstance(first, messages.Offer):
                raise _Refused("bad_request", f"expected an offer, got {type(first).__name__}")
            self.offer = first
            facts = await self._prepare(first)
            await self.tunnel.send(messages.Accept(facts.as_dict()))
            self.state = "receiving"
            await self._receive()
        except _Refused as exc:
            log.warning("refused live migration from %s: %s", self.peer_node, exc,
                        extra={"error_type": exc.problem, "peer_id": self.peer_node})
            self.metrics.error("migration", f"live_{exc.problem}")
            with contextlib.suppress(TunnelError, OSError):
                await self.tunnel.send(messages.Refuse(str(exc), exc.problem))
            await self._discard()
        except (TunnelError, QemuError, OSError) as exc:
            if self.state == "running":
                log.warning("live migration from %s: %s after the VM started here", self.peer_node, exc)
            elif await self._committed_anyway():
                log.warning("live migration from %s: %s, but the source committed the ownership here: "
                            "running", self.peer_node, exc, extra={"peer_id": self.peer_node})
                with contextlib.suppress(QemuError, OSError):
                    await self._run_here()
            else:
                log.warning("live migration from %s aborted (%s): destination copy killed", self.peer_node, exc,
                            extra={"error_type": "live_aborted", "peer_id": self.peer_node})
                await self._discard()
        finally:
            if self.qemu is not None:
                await self.qemu.close()
            if self.line is not None:
                self.line.close()
            await self.tunnel.close()

    async def _committed_anyway(self) -> bool:
        """The tunnel broke after this QEMU loaded the whole VM: the source may have committed the
        ownership here already (and died, or lost the tunnel, before saying so on it). The
        handover line says: `commit`, or it closes once the source rolled back."""
        if not self.received or self.line is None:
            return False
        line = self.line
        return await asyncio.get_running_loop().run_in_executor(None, line.wait_for, COMMIT, LINE_WAIT_S)

    async def _run_here(self) -> None:
        """`cont`, tell the source on the handover line, and only then disarm the guard (if this
        agent dies in between, the guard finds the VM running and only says `running` again)."""
        assert self.qemu is not None
        await self.qemu.cont()
        self.state = "running"
        if self.line is not None:
            with contextlib.suppress(OSError):
                self.line.say(RUNNING)
        if self.process is not None:
            self.process.commit()

    async def _prepare(self, offer: messages.Offer) -> VmFacts:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tag = offer.migration_id[:12]
        if offer.dest_qmp:
            path = Path(offer.dest_qmp)
            if not path.exists():
                raise _Refused("no_qemu", f"no destination QMP socket at {path}")
        else:
            try:
                self.process = DestinationQemu(self.config.live_qemu_command, offer.vm_id, self.run_dir, tag)
                await self.process.start()
            except QemuStartError as exc:
                raise _Refused("no_qemu", str(exc)) from exc
            path = self.process.qmp_socket
        self.qemu = QemuControl(path)
        try:
            await self.qemu.connect()
            facts = await self.qemu.facts()
            state = await self.qemu.run_state()
        except QemuError as exc:
            raise _Refused("no_qemu", f"destination QEMU: {exc}") from exc
        if state != "inmigrate":
            raise _Refused("no_qemu", f"destination QEMU is {state}, not waiting for a migration "
                                      "(start it with -incoming defer -S)")
        source = VmFacts(str(offer.facts.get("version", "")), str(offer.facts.get("machine", "")),
                         int(str(offer.facts.get("ram_bytes", 0))))
        problems = incompatibilities(source, facts)
        if problems:
            raise _Refused("incompatible", "; ".join(problems))
        caps = [c for c in offer.capabilities if c in ("postcopy-ram", "return-path")]
        try:
            if caps:
                await self.qemu.set_capabilities(caps)
            sock_path = self.run_dir / f"{tag}.in.sock"
            sock_path.unlink(missing_ok=True)
            await self.qemu.migrate_incoming(f"unix:{sock_path}")
            qemu_sock = await self._connect_local(sock_path)
        except (QemuError, OSError) as exc:
            raise _Refused("no_qemu", f"destination QEMU: {exc}") from exc
        self.tunnel.attach_destination(qemu_sock)
        return facts

    @staticmethod
    async def _connect_local(path: Path) -> socket.socket:
        for _ in range(100):
            if path.exists():
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(str(path))
                except OSError:
                    sock.close()
                    raise
                return sock
            await asyncio.sleep(0.02)
        raise OSError(f"destination QEMU did not listen on {path}")

    async def _receive(self) -> None:
        """Until Commit: report Received when QEMU loaded everything; then cont and say Running."""
        assert self.qemu is not None
        postcopy = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + COMMIT_TIMEOUT_S
        committed: messages.Commit | None = None
        while loop.time() < deadline:
            while not self.tunnel.control.empty():
                item: messages.Message | TunnelError = self.tunnel.control.get_nowait()
                if isinstance(item, TunnelError):
                    raise item
                if isinstance(item, messages.Abort):
                    raise TunnelError(f"source aborted: {item.reason}")
                if isinstance(item, messages.Commit):
                    committed = item
                    postcopy = item.postcopy
            if not self.received:
                self.tunnel.check()
            info = await self.qemu.query_migrate()
            if info.status == "failed":
                raise QemuError(f"destination QEMU failed to load the stream: {info.error}")
            if info.status == "completed" and not self.received:
                self.received = True
                await self.tunnel.send(messages.Received(info.status))
            if committed is not None and (self.received or (postcopy and info.status == "postcopy-active")):
                await hold_for_test("before-cont")
                await self._run_here()
                log.info("live migration of %s: running here (ownership committed with token %d)",
                         self.offer.vm_id if self.offer else "?", committed.fencing_token,
                         extra={"migration_status": "running", "peer_id": self.peer_node})
                await self.tunnel.send(messages.Running())
                if not self.received:
                    status = await self._await_postcopy_end()
                    await self.tunnel.send(messages.Received(status))
                return
            await self._next_control_or_poll()
        raise TunnelError("no ownership commit from the source in time")

    async def _next_control_or_poll(self) -> None:
        """Sleep one poll interval, but wake at once when the source says something (Commit:
        the guest's downtime runs until this agent `cont`s)."""
        try:
            item = await asyncio.wait_for(self.tunnel.control.get(), POLL_S)
        except TimeoutError:
            return
        self.tunnel.control.put_nowait(item)

    async def _await_postcopy_end(self) -> str:
        """Postcopy: keep the tunnel up until QEMU pulled every page (the VM already runs here)."""
        assert self.qemu is not None
        while True:
            info = await self.qemu.query_migrate()
            if info.status in ("completed", "failed"):
                if info.status == "failed":
                    log.error("postcopy failed after the switch: the VM is lost unless recovered",
                              extra={"error_type": "postcopy_failed", "peer_id": self.peer_node})
                return info.status
            await asyncio.sleep(POLL_S)

    async def _discard(self) -> None:
        """Kill the paused copy: the source stays the VM."""
        if self.process is not None:
            self.process.kill()
        elif self.qemu is not None and self.state != "running":
            await self.qemu.quit()
