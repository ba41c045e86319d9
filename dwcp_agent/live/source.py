"""The source agent's side of a live migration: setup, pre-copy under the convergence policy,
switchover, the ownership commit, and the rollback when anything fails before that commit.

Safety rule: the source VM is the authoritative copy until ACP has recorded the destination as
the owner with this migration's fencing token. Before that, any failure (QEMU's, the tunnel's,
the peer agent's, a cancel) cancels QEMU's migration, resumes the source VM if QEMU paused it,
and tells the destination to kill its paused copy. After that, the source VM is never resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from pathlib import Path
from typing import Protocol

from dwcp_agent import wire
from dwcp_agent.acp.runtime.ownership import OwnedElsewhere
from dwcp_agent.config import Config
from dwcp_agent.hde.selector import CodecSelector
from dwcp_agent.live import messages
from dwcp_agent.live.frames import TunnelError
from dwcp_agent.live.guard import LINE_WAIT_S, Guard
from dwcp_agent.live.hold import TEST_HOLD_ENV, hold_for_test, hold_seconds
from dwcp_agent.live.outcome import COMMIT, OUTCOME_STREAM, RUNNING, OutcomeLine
from dwcp_agent.live.policy import Action, ConvergencePolicy, Observation, PolicyError, parse_policy
from dwcp_agent.live.qmp import MigrationInfo, QemuControl, QemuError
from dwcp_agent.live.record import LivePhase, LiveRecord, LiveRequest
from dwcp_agent.live.tunnel import DATA_STREAMS, Tunnel, new_session
from dwcp_agent.pba.predictor import Predictor
from dwcp_agent.pba.probe import LinkMeter, read_tcp_info
from dwcp_agent.security import channels as channel_security
from dwcp_agent.security.sealed import FrameKey, seal_stream
from dwcp_agent.telemetry.metrics import Metrics

__all__ = ["LiveRequestError", "OutgoingLive", "Ownership"]

log = logging.getLogger("dwcp_agent.live")
POLL_S = 0.05
ACCEPT_TIMEOUT_S = 60.0
CONTROL_TIMEOUT_S = 30.0
# Resumable run states of a source QEMU that a failed migration left paused. In "finish-migrate"
# (stop-and-copy, or a cancel still winding down) QEMU refuses `cont`: wait until it leaves it.
_PAUSED_BY_MIGRATION = ("postmigrate", "paused")


class LiveRequestError(Exception):
    """Refused before anything changed: `status` is the HTTP status (4xx), the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class OwnershipSession(Protocol):
    """One live migration's hold on its VM (acp.runtime.ownership.OwnershipSession), closed by one
    decision: `complete_on_loop(destination)` (the ACP commit) or `abandon_on_loop()`."""

    token: int

    async def complete_on_loop(self, destination: str) -> None: ...
    async def abandon_on_loop(self) -> None: ...


class Ownership(Protocol):
    """Opens a migration's ownership session (acp.runtime.ownership.RegistryOwnership), the same object
    image migrations use; a live migration runs on the event loop, so it awaits each step."""

    async def begin_on_loop(self, vm_id: str) -> OwnershipSession: ...


class _Cancelled(Exception):
    pass


class OutgoingLive:
    """One outgoing live migration; `prepare()` (may refuse with 4xx), then `run()` in the background."""

    def __init__(self, config: Config, metrics: Metrics, key: bytes, request: LiveRequest,
                 ownership: Ownership | None, run_dir: Path, mode: str = "datacenter") -> None:
        self.config = config
        self.metrics = metrics
        self.key = key
        self.request = request
        self.ownership = ownership
        self.run_dir = run_dir
        self.record = LiveRecord(request, mode=mode)
        try:
            self.spec = parse_policy(request.policy or config.live_policy)
        except PolicyError as exc:
            raise LiveRequestError(400, str(exc)) from exc
        self.record.policy = self.spec.name
        self.downtime_ms = request.downtime_ms or config.live_downtime_ms
        self.policy = ConvergencePolicy(self.spec, self.downtime_ms)
        self.qemu: QemuControl | None = None
        self.tunnel: Tunnel | None = None
        self.owned: OwnershipSession | None = None
        self.token = 0
        self.line: OutcomeLine | None = None
        self.peer_node = ""
        self._cancel = asyncio.Event()
        self.session = new_session()
        self._listener: socket.socket | None = None
        self.predictor = Predictor()
        self.meter = LinkMeter()
        self.done = asyncio.Event()
        self._peer_received = False
        self.guard: Guard | None = None
        self._peer_running = False

    # -- setup: everything that can refuse with 4xx ----------------------------------------------

    def _qmp_path(self) -> Path:
        if self.request.qmp:
            path = Path(self.request.qmp)
            if not path.exists():
                raise LiveRequestError(400, f"no QMP socket at {path} (request field qmp)")
            return path
        path = Path(self.config.qmp_dir) / f"{self.request.vm_id}.sock"
        if not path.exists():
            raise LiveRequestError(404, f"unknown VM {self.request.vm_id!r}: no QMP socket {path} "
                                        "(config qmp_dir) and no qmp in the request")
        return path

    async def prepare(self) -> None:
        """Check everything, take the lease, get the destination's Accept; refuse with 4xx otherwise."""
        path = self._qmp_path()
        self.qemu = QemuControl(path)
        try:
            await self.qemu.connect()
            facts = await self.qemu.facts()
            state = await self.qemu.run_state()
        except QemuError as exc:
            await self.qemu.close()
            raise LiveRequestError(400, f"source QEMU: {exc}") from exc
        if state != "running":
            await self.qemu.close()
            raise LiveRequestError(409, f"VM {self.request.vm_id} is {state}, not running")
        try:
            await self._take_lease()
            await self._offer(facts.as_dict())
        except BaseException:
            await self._release_lease()
            await self._close()
            raise

    async def _take_lease(self) -> None:
        if self.ownership is None:
            return
        try:
            self.owned = await self.ownership.begin_on_loop(self.request.vm_id)
        except OwnedElsewhere as exc:
            raise LiveRequestError(409, str(exc)) from exc
        except Exception as exc:
            raise LiveRequestError(503, f"ownership registry: {exc}") from exc
        self.token = self.owned.token

    async def _release_lease(self) -> None:
        """The source stays the owner; nothing to do once the session is closed."""
        if self.owned is not None:
            with contextlib.suppress(Exception):
                await self.owned.abandon_on_loop()

    def _handshake(self, stream: int) -> tuple[socket.socket, tuple[FrameKey, FrameKey] | None]:
        """One authenticated connection of this session: 0 = control, 1.. = data. A TLS connection
        switches to sealed frames (security/sealed.py) and its keys are returned."""
        keys: tuple[FrameKey, FrameKey] | None = None
        host, _, port = self.request.destination.rpartition(":")
        sock = socket.create_connection((host, int(port)), timeout=self.config.connect_timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = channel_security.for_config(self.config).wrap_client(sock)
            peer = wire.client_handshake(sock, self.key, self.config.node_id, "live", self.session, stream,
                                         expect_peer=channel_security.peer_identity(sock))
            if isinstance(sock, ssl.SSLSocket):  # guest memory and control: sealed frames
                sock, send_key, recv_key = seal_stream(sock)
                keys = (send_key, recv_key)
            if self.peer_node and peer.node_id != self.peer_node:
                raise wire.HandshakeError(f"data connection reached {peer.node_id}, not {self.peer_node}",
                                          "auth")
        except BaseException:
            sock.close()
            raise
        self.peer_node = peer.node_id
        sock.settimeout(None)
        return sock, keys

    async def _connect_peer(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter,
                                           tuple[FrameKey, FrameKey] | None]:
        loop = asyncio.get_running_loop()
        try:
            sock, keys = await loop.run_in_executor(None, self._handshake, 0)
        except (OSError, ValueError, wire.WireError) as exc:
            raise LiveRequestError(502, f"destination agent {self.request.destination}: {exc}") from exc
        self.record.destination_node = self.peer_node
        reader, writer = await asyncio.open_connection(sock=sock)
        return reader, writer, keys

    def _capabilities(self) -> list[str]:
        caps = ["return-path"]
        if self.spec.throttle:
            caps.append("auto-converge")
        if self.spec.postcopy:
            caps.append("postcopy-ram")
        return caps

    async def _offer(self, facts: dict[str, object]) -> None:
        reader, writer, keys = await self._connect_peer()
        link = self.predicted_bytes_per_s
        self.tunnel = Tunnel(reader, writer, self.session, CodecSelector(self.config.zstd_level, link=link,
                                                           forced=self.config.compression_algo), keys)
        self.tunnel.start_reader()
        await self.tunnel.send(messages.Offer(self.record.id, self.request.vm_id, facts, self._capabilities(),
                                              self.request.dest_qmp))
        try:
            answer = await self.tunnel.recv_control(ACCEPT_TIMEOUT_S)
        except TunnelError as exc:
            raise LiveRequestError(502, f"destination agent {self.peer_node}: {exc}") from exc
        if isinstance(answer, messages.Refuse):
            status = 409 if answer.problem == "incompatible" else 400
            raise LiveRequestError(status, f"destination {self.peer_node} refused: {answer.reason}")
        if not isinstance(answer, messages.Accept):
            raise LiveRequestError(502, f"destination sent {type(answer).__name__} instead of accept")

    def predicted_bytes_per_s(self) -> float | None:
        prediction = self.predictor.predict()
        return prediction.value if prediction else None

    def predicted_high_bytes_per_s(self) -> float | None:
        prediction = self.predictor.predict()
        return prediction.high if prediction else None

    # -- the migration ---------------------------------------------------------------------------

    def cancel(self) -> None:
        self._cancel.set()

    async def run(self) -> None:
        """Runs to completion or rollback; never raises."""
        assert self.qemu is not None and self.tunnel is not None
        started = time.monotonic()
        self.metrics.active_migrations.inc()
        try:
            await self._start_qemu_migration()
            self.record.phase = LivePhase.PRECOPY
            info = await self._converge(started)
            await self._finish(info)
            self._end(LivePhase.COMPLETED)
        except _Cancelled:
            await self._rollback("cancelled by the operator")
            self._end(LivePhase.CANCELLED)
        except (QemuError, TunnelError, OSError, RuntimeError) as exc:
            if self.record.committed:
                self.record.error = f"after the ownership commit: {exc}"
                log.error("live migration %s: %s", self.record.id, self.record.error,
                          extra={"migration_id": self.record.id, "error_type": "after_commit"})
                self._end(LivePhase.FAILED)
            else:
                await self._rollback(str(exc))
                self._end(LivePhase.FAILED)
        finally:
            self.metrics.active_migrations.dec()
            self._disarm_guard()
            await self._close()
            self.done.set()

    async def _start_qemu_migration(self) -> None:
        assert self.qemu is not None and self.tunnel is not None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / f"{self.record.id}.out.sock"
        path.unlink(missing_ok=True)
        loop = asyncio.get_running_loop()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._listener.settimeout(CONTROL_TIMEOUT_S)
        try:
            data_conns = [await loop.run_in_executor(None, self._handshake, stream)
                          for stream in range(1, (self.config.stream_count or DATA_STREAMS) + 1)]
            line_sock, _ = await loop.run_in_executor(None, self._handshake, OUTCOME_STREAM)  # words MAC'd
        except (OSError, ValueError, wire.WireError) as exc:
            raise TunnelError(f"data connections to {self.peer_node}: {exc}") from exc
        self.line = OutcomeLine(line_sock, self.key, self.session, self.record.id)
        # From here QEMU may pause the source; if this agent dies before the handover is decided,
        # the guard resumes it.
        self.guard = Guard("resume", str(self.qemu.socket_path))
        caps = self._capabilities()
        if hold_seconds("switchover"):  # QEMU stops the VM, then waits for migrate-continue
            caps.append("pause-before-switchover")
        await self.qemu.set_capabilities(caps)
        await self.qemu.set_parameters({"downtime-limit": self.downtime_ms})
        await self.qemu.migrate(f"unix:{path}")
        try:
            qemu_sock, _ = await loop.run_in_executor(None, self._listener.accept)
        except OSError as exc:
            for sock, _ in data_conns:
                sock.close()
            raise TunnelError(f"source QEMU did not connect to {path}: {exc}") from exc
        self.tunnel.attach_source(qemu_sock, data_conns)

    def _observe_link(self) -> None:
        assert self.tunnel is not None
        now = time.monotonic()
        for stream, sock in self.tunnel.data_sockets():
            with contextlib.suppress(OSError):
                self.meter.observe(stream, read_tcp_info(sock, now))
        sample = self.meter.close_interval(now)
        # Only intervals where the link, not QEMU, was the limit say what the link can carry; an
        # app-limited sample would drag the prediction (and the bandwidth cap) down to QEMU's pace.
        if sample is not None and sample.capacity_bps > 0 and sample.app_limited < 0.5:
            self.predictor.observe(sample.capacity_bps)

    async def _converge(self, started: float) -> MigrationInfo:
        """Poll QEMU until its migration completes, applying the policy's actions."""
        assert self.qemu is not None and self.tunnel is not None
        while True:
            if self._cancel.is_set():
                raise _Cancelled()
            self._check_tunnel()
            info = await self.qemu.query_migrate()
            self._observe_link()
            predicted = self.predicted_bytes_per_s()
            self._update(info, predicted)
            if info.status == "completed":
                return info
            if info.status in ("failed", "cancelled"):
                raise QemuError(f"source QEMU migration {info.status}: {info.error or 'no reason given'}")
            if info.status in ("device", "pre-switchover"):
                self.record.phase = LivePhase.SWITCHOVER
                self.record.switchover = True
            if info.status == "pre-switchover":
                await self._hold_in_switchover()
                continue
            obs = Observation(time.monotonic() - started, info.status, info.iterations, info.remaining_bytes,
                              info.dirty_bytes_per_s, info.expected_downtime_ms, predicted, self.tunnel.ratio,
                              self.predicted_high_bytes_per_s(), info.mbps * 1e6 / 8)
            for action in self.policy.step(obs):
                await self._apply(action)
            if predicted:
                self.tunnel.bound_to_bandwidth(predicted)
            await asyncio.sleep(POLL_S)

    async def _hold_in_switchover(self) -> None:
        """Crash tests only (LIVE_MIGRATION_TEST_HOLD=switchover:<s> set QEMU's pause-before-switchover):
        the source VM is stopped for stop-and-copy; hold it there, watching the tunnel and cancel
        as in pre-copy, then let QEMU send the rest."""
        assert self.qemu is not None
        seconds = hold_seconds("switchover")
        log.warning("test hold: switchover for %s s (%s)", seconds, TEST_HOLD_ENV)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while loop.time() < deadline:
            if self._cancel.is_set():
                raise _Cancelled()
            self._check_tunnel()
            await asyncio.sleep(POLL_S)
        await self.qemu.migrate_continue("pre-switchover")

    def _check_tunnel(self) -> None:
        """Take what the destination said so far; an error or Abort from it ends the migration."""
        assert self.tunnel is not None
        while not self.tunnel.control.empty():
            self._on_control(self.tunnel.control.get_nowait())
        if not (self._peer_received and self._peer_running):
            self.tunnel.check()

    def _on_control(self, item: messages.Message | TunnelError) -> None:
        if isinstance(item, TunnelError):
            if self._peer_received and self._peer_running:
                return  # the destination is done and closed the tunnel: nothing was lost
            raise item
        if isinstance(item, messages.Abort):
            raise TunnelError(f"destination aborted: {item.reason}")
        if isinstance(item, messages.Received):
            self._peer_received = True
        elif isinstance(item, messages.Running):
            self._peer_running = True

    async def _await_peer(self, flag: str) -> None:
        """Wait until the destination said Received / Running (attribute `flag`)."""
        assert self.tunnel is not None
        while not getattr(self, flag):
            try:
                item: messages.Message | TunnelError = await self.tunnel.recv_control(CONTROL_TIMEOUT_S)
            except TunnelError as exc:
                item = exc
            self._on_control(item)

    def _update(self, info: MigrationInfo, predicted: float | None) -> None:
        assert self.tunnel is not None
        r = self.record
        r.iteration = info.iterations
        r.remaining_bytes = info.remaining_bytes
        r.dirty_bytes_per_s = info.dirty_bytes_per_s
        r.expected_downtime_ms = info.expected_downtime_ms
        r.predicted_bytes_per_s = predicted
        r.wire_bytes = self.tunnel.wire_bytes_out
        r.stream_bytes = self.tunnel.raw_bytes_out
        r.return_bytes = self.tunnel.return_bytes
        r.resent_chunks = self.tunnel.resent_chunks
        if info.throttle_percentage:
            r.throttle_used = True
        self.metrics.live_dirty_rate.set(info.dirty_bytes_per_s)
        self.metrics.live_iterations.set(info.iterations)

    async def _apply(self, action: Action) -> None:
        assert self.qemu is not None
        log.info("live migration %s: %s (%s)", self.record.id, action.kind, action.reason,
                 extra={"migration_id": self.record.id, "convergence_action": action.kind})
        self.metrics.convergence_actions.labels(action.kind).inc()
        self.record.last_action = action.kind
        self.record.actions.append({"action": action.kind, "reason": action.reason, **action.params})
        if action.kind == "start-postcopy":
            await self._commit(postcopy=True)
            await self.qemu.start_postcopy()
            self.record.phase = LivePhase.POSTCOPY
            self.record.postcopy_used = True
            return
        if action.kind == "throttle":
            self.record.throttle_used = True
        await self.qemu.set_parameters(action.params)

    async def _commit(self, postcopy: bool) -> None:
        """Record the new owner through ACP; from here on the source is never resumed."""
        assert self.qemu is not None and self.tunnel is not None and self.line is not None
        self.record.phase = LivePhase.COMMIT
        await hold_for_test("before-commit")
        self._check_tunnel()  # a destination that is already gone must not become the owner
        self._disarm_guard()  # before the commit: a guard must never resume a VM that moved
        if self.owned is not None:
            try:
                await self.owned.complete_on_loop(self.peer_node)  # refused: the lease went back with it
            except Exception as exc:
                raise RuntimeError(f"ownership commit refused: {exc}") from exc
        self.record.committed = True
        log.info("live migration %s: ownership of %s committed to %s", self.record.id, self.request.vm_id,
                 self.peer_node, extra={"migration_id": self.record.id, "migration_status": "committed"})
        # The destination (its agent, or its guard) runs the VM on `commit` / Commit; if this agent
        # dies from here on, its guard quits the paused source once the destination says `running`
        # (armed after Commit went: starting a process must not lengthen the guest's downtime).
        with contextlib.suppress(OSError):
            self.line.say(COMMIT)
        with contextlib.suppress(TunnelError, OSError):  # the handover line carries it too
            await self.tunnel.send(messages.Commit(self.token, postcopy))
        self.guard = Guard("quit", str(self.qemu.socket_path), line=self.line)
        await hold_for_test("after-commit")

    async def _destination_runs(self) -> None:
        """Running on the tunnel; if the destination agent went away after the commit, `running`
        from its guard on the handover line. Neither: TunnelError, the paused source stays."""
        assert self.line is not None
        try:
            await self._await_peer("_peer_running")
            return
        except TunnelError as exc:
            log.warning("live migration %s: %s after the commit; waiting for the destination's guard",
                        self.record.id, exc, extra={"migration_id": self.record.id, "peer_id": self.peer_node})
            lost = exc
        line = self.line
        if not await asyncio.get_running_loop().run_in_executor(None, line.wait_for, RUNNING, LINE_WAIT_S):
            raise lost
        self._peer_running = True

    async def _finish(self, info: MigrationInfo) -> None:
        assert self.qemu is not None and self.tunnel is not None
        self.record.switchover = True
        self.record.downtime_ms = info.downtime_ms
        await self._await_peer("_peer_received")  # the destination QEMU loaded everything
        if not self.record.committed:
            if self._cancel.is_set():
                raise _Cancelled()
            await self._commit(postcopy=False)
        await self._destination_runs()
        self._update(info, self.predicted_bytes_per_s())
        await self.qemu.quit()  # the paused source copy: ownership has moved and the VM runs there
        if info.downtime_ms is not None:
            self.metrics.migration_downtime.labels(self.record.mode).observe(info.downtime_ms / 1000)

    async def _rollback(self, reason: str) -> None:
        """Before the commit: the source keeps (or resumes) running, the destination kills its copy."""
        self.record.error = reason
        log.warning("live migration %s rolled back: %s", self.record.id, reason,
                    extra={"migration_id": self.record.id, "migration_status": "rolled_back"})
        if self.tunnel is not None and not self.tunnel.closed:
            with contextlib.suppress(TunnelError, OSError):
                await self.tunnel.send(messages.Abort(reason))
        if self.qemu is not None:
            with contextlib.suppress(QemuError):
                info = await self.qemu.query_migrate()
                if info.status not in ("completed", "failed", "cancelled", "none"):
                    await self.qemu.cancel()
            await self._resume_source()
        self._disarm_guard()
        await self._release_lease()

    async def _resume_source(self) -> None:
        assert self.qemu is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        while loop.time() < deadline:
            try:
                state = await self.qemu.run_state()
                if state == "running":
                    return
                if state in _PAUSED_BY_MIGRATION:
                    await self.qemu.cont()
                    return
            except QemuError as exc:
                log.error("cannot resume source VM %s: %s", self.request.vm_id, exc,
                          extra={"migration_id": self.record.id, "error_type": "resume"})
                return
            await asyncio.sleep(0.05)  # cancelling: QEMU resumes the VM itself or lands in postmigrate

    def _end(self, phase: str) -> None:
        self.record.phase = phase
        self.record.ended = time.time()
        status = {LivePhase.COMPLETED: "completed", LivePhase.CANCELLED: "cancelled"}.get(phase, "failed")
        self.metrics.live_migrations.labels(self.record.mode, status).inc()
        log.info("live migration %s %s", self.record.id, phase, extra={
            "migration_id": self.record.id, "migration_status": status,
            "duration_ms": round((self.record.ended - self.record.started) * 1000)})

    def _disarm_guard(self) -> None:
        if self.guard is not None:
            self.guard.disarm()
            self.guard = None

    async def _close(self) -> None:
        if self.line is not None:
            self.line.close()
        if self.tunnel is not None:
            await self.tunnel.close()
        if self._listener is not None:
            self._listener.close()
        if self.qemu is not None:
            await self.qemu.close()
