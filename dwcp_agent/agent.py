"""The agent: owns the components, the data listener and the admin HTTP server, and their lifecycle.

Start order: data listener, components, admin server, then "ready". Stop order (SIGTERM):
"stopping" (health turns 503), outgoing migrations stop and leave destinations resumable,
incoming sessions make their journals durable, then the servers close, all within
`shutdown_timeout_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from dwcp_agent import __version__, admin_guard, api
from dwcp_agent.acp.runtime.api import build_routes as consensus_routes
from dwcp_agent.acp.runtime.node import ConsensusTimeout
from dwcp_agent.acp.runtime.ownership import RegistryOwnership
from dwcp_agent.acp.runtime.rollout_store import RegistryRolloutStore
from dwcp_agent.acp.runtime.service import ConsensusError, ConsensusService
from dwcp_agent.amst.select import Transports, TransportUnavailable
from dwcp_agent.config import Config, ConfigError
from dwcp_agent.hde.codecs import NAMES
from dwcp_agent.kernels import pages
from dwcp_agent.live.service import LiveService
from dwcp_agent.migration.buffers import BufferPool
from dwcp_agent.migration.history import MigrationHistory
from dwcp_agent.migration.manager import Migration, MigrationManager
from dwcp_agent.migration.server import DataServer
from dwcp_agent.rollout.controller import FileRolloutStore, RolloutController, RolloutError
from dwcp_agent.rollout.http import sla_routes
from dwcp_agent.rollout.sla import SlaGuard
from dwcp_agent.telemetry import tracing
from dwcp_agent.telemetry.health import Health
from dwcp_agent.telemetry.metrics import Metrics
from dwcp_agent.telemetry.sdnotify import Notifier

log = logging.getLogger("dwcp_agent.agent")
CONSENSUS_READY_S = 5.0


@contextlib.contextmanager
def _listening(key: str, host: str, port: int) -> Iterator[None]:
    """A port we cannot bind is an operator-fixable setting: say which key and why."""
    try:
        yield
    except OSError as exc:
        raise ConfigError(key, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


class Agent:
    """One dwcp-agent process worth of state; `run()` serves until SIGTERM/SIGINT."""

    def __init__(self, config: Config, metrics: Metrics | None = None,
                 config_loader: Callable[[], Config] | None = None) -> None:
        self.config = config
        self._config_loader = config_loader
        self.metrics = metrics or Metrics()
        self.health = Health()
        self.key = config.psk_bytes
        if len(self.key) < 16:
            raise ConfigError("psk", "a pre-shared key of at least 16 bytes is required "
                                     "(set psk_file, DWCP_PSK_FILE, psk or DWCP_PSK)")
        self.state_dir = Path(config.state_dir)
        self.consensus = ConsensusService(config, self.metrics, self.state_dir)
        # SLA guard + rollout: the setting lives in the consensus registry (every agent follows
        # it); the local file keeps the last state, so an automatic rollback survives restarts.
        self.rollout_store = RegistryRolloutStore(self.consensus, FileRolloutStore(self.state_dir / "rollout.json"))
        rollout = RolloutController(config, self.metrics, time.time, self.rollout_store)
        self.guard = SlaGuard(config, self.metrics, time.time, rollout)
        self.notifier = Notifier()
        self._tasks: list[asyncio.Task[None]] = []
        self.buffers = BufferPool()  # chunk buffers shared by outgoing and incoming migrations
        self._history = MigrationHistory(self.state_dir / "migrations.jsonl", config.history_max_entries,
                                         config.history_max_age_s)
        self._profile_for = rollout.profile_for
        self._manager: MigrationManager | None = None  # made in start(): it needs transports and the loop
        self._live: LiveService | None = None  # made in start(), on the loop, with the manager's ownership
        self.data_server: DataServer | None = None
        self.transports: Transports | None = None
        self.admin_port = 0
        self.metrics_port = 0
        self._runner: web.AppRunner | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._admin_guard = admin_guard.make_guard(config, admin_guard.load_or_create_token(config))
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- components ---------------------------------------------------------------------------

    @property
    def manager(self) -> MigrationManager:
        """Outgoing migrations; exists once start() has selected transports."""
        if self._manager is None:
            raise RuntimeError("the agent has not started: no migration manager yet")
        return self._manager

    @property
    def live(self) -> LiveService:
        """Live migrations; exists once start() runs on the agent's event loop."""
        if self._live is None:
            raise RuntimeError("the agent has not started: no live-migration service yet")
        return self._live

    def _register_health(self) -> None:
        def amst() -> dict[str, Any]:
            transport = self.transports.selection.as_health() if self.transports else {"transport": "tcp"}
            accepting = self.data_server is not None and self.data_server.accepting
            return {"status": "ok" if accepting else "down", **transport,
                    **(self.data_server.health() if self.data_server else {}),
                    "transport_mode": self.config.transport_mode,
                    "data_port": self.data_server.port if self.data_server else None,
                    "incoming_sessions": len(self.data_server.sessions) if self.data_server else 0}

        def hde() -> dict[str, Any]:
            return {"status": "ok", "codecs": sorted(NAMES), "native_kernels": pages.__name__,
                    "compression_algo": self.config.compression_algo}

        def migration() -> dict[str, Any]:
            states: dict[str, int] = {}
            for m in self.manager.list():
                states[m.state] = states.get(m.state, 0) + 1
            return {"status": "ok", "outgoing": states}

        def pba() -> dict[str, Any]:
            """The last path PBA measured (the latest v3 migration's), or that none was yet."""
            for m in reversed(self.manager.list()):
                link = m.session.link if m.session is not None else None
                if link is None:
                    continue
                snap = link.snapshot()
                sample = snap.sample
                return {"status": "ok", "measured": True, "migration_id": m.request.migration_id,
                        "mode": snap.mode, "mode_forced": link.forced_mode,
                        "probe_rtt_s": link.probe_rtt_s, "probe_bandwidth_bytes_per_second": link.probe_bandwidth_bps,
                        "bandwidth_bytes_per_second": sample.bandwidth_bps if sample else None,
                        "rtt_s": sample.rtt_s if sample else None, "min_rtt_s": sample.min_rtt_s if sample else None,
                        "loss": sample.loss if sample else None,
                        "predicted_bytes_per_second": snap.prediction.value if snap.prediction else None,
                        "prediction_accuracy": snap.accuracy, "streams": snap.plan.streams,
                        "tcp_congestion": link.congestion, "tcp_congestion_reason": link.congestion_reason}
            return {"status": "ok", "measured": False, "detail": "no v3 migration has measured a path yet"}

        self.health.register("amst", amst)
        self.health.register("pba", pba)
        self.health.register("hde", hde)
        self.health.register("migration", migration)

    def _alive(self) -> bool:
        """What the systemd watchdog pings for: not stopping, and the data port still accepting."""
        return not self.health.stopping and self.data_server is not None and self.data_server.accepting

    def _migration_finished(self, migration: Migration) -> None:
        self.guard.record_migration(migration.state, migration.duration_s, migration.progress.total_bytes,
                                    migration.request.protocol, migration.request.mode)
        # The consensus protocol follows the network mode PBA measured (datacenter -> Raft,
        # internet -> PBFT; ACP rate-limits switches itself).
        if self._loop is not None and migration.request.mode_measured:
            asyncio.run_coroutine_threadsafe(self.consensus.on_network_mode(migration.request.mode), self._loop)

    async def _tick_guard(self) -> None:
        """The SLA guard's clock: re-evaluate once a second so a held NO-GO rolls back on time."""
        while True:
            try:
                await self.rollout_store.refresh()
            except (ConsensusError, ConsensusTimeout) as exc:
                log.warning("rollout not refreshed from the cluster: %s", exc, extra={"component": "acp"})
            self.guard.tick()
            self.metrics.ready.set(1 if self.health.snapshot()[0] else 0)
            await asyncio.sleep(1.0)

    def reload(self) -> None:
        """SIGHUP: re-read the configuration and apply what can change live (log level, rollout
        percentage and ENABLE_V3, SLA thresholds); other keys need a restart."""
        self.notifier.reloading()
        try:
            if self._config_loader is None:
                log.info("reload: no configuration source to re-read", extra={"component": "agent"})
                return
            try:
                new = self._config_loader()
            except ConfigError as exc:
                log.error("reload refused, keeping the running configuration: %s", exc,
                          extra={"component": "agent"})
                return
            old, self.config = self.config, new
            logging.getLogger("dwcp_agent").setLevel(new.log_level.upper())
            self.guard.config = new
            self.guard.publish_slos()
            try:
                if new.enable_v3 != old.enable_v3:
                    self.guard.rollout.set_enable_v3(new.enable_v3, by="config")
                if new.feature_flag_rollout != old.feature_flag_rollout:
                    self.guard.rollout.set_percentage(new.feature_flag_rollout, by="config")
            except RolloutError as exc:
                log.warning("reload: rollout change not applied: %s", exc, extra={"component": "agent"})
            log.info("configuration reloaded", extra={"component": "agent"})
        finally:
            self.notifier.ready()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        # Transport first: with transport_mode=rdma_only and no usable RDMA the agent must not start.
        self.transports = Transports(self.config, self.metrics)
        # Migrations start only through the admin API, served once consensus has started below.
        ownership = RegistryOwnership(self.consensus, self.config.node_id, asyncio.get_running_loop())
        self._manager = MigrationManager(self.config, self.metrics, self.key, profile_for=self._profile_for,
                                         on_finished=self._migration_finished, pool=self.buffers,
                                         history=self._history, ownership=ownership, transports=self.transports)
        self._live = LiveService(self.config, self.metrics, self.key, self.state_dir / "live",
                                 asyncio.get_running_loop(), ownership=ownership)
        try:
            self.transports.require()
        except TransportUnavailable as exc:
            raise ConfigError("transport_mode", str(exc)) from exc
        for d in (self.state_dir, *self.config.allowed_dest_dirs):
            d.mkdir(parents=True, exist_ok=True)
        tracing.setup_tracing(self.config, service_name="dwcp-agent")
        with _listening("data_port", self.config.listen_host, self.config.data_port):
            self.data_server = DataServer(self.config, self.metrics, self.key, transports=self.transports,
                                          pool=self.buffers)
        self.data_server.live_handler = self.live.accept
        self.data_server.start()
        self._register_health()
        self._loop = asyncio.get_running_loop()
        await self.consensus.start()
        members = self.consensus.members()
        if not self.config.acp_peers and self.config.node_id not in members:
            await self.consensus.stop()
            raise ConfigError("node_id", f"{self.config.node_id!r} is not a member of the consensus state in "
                                         f"{self.state_dir / 'acp'} (members: {', '.join(sorted(members))}); "
                                         "use the node_id this state belongs to, or a new state_dir")
        await self._await_consensus(CONSENSUS_READY_S)
        try:
            await self.rollout_store.sync()
        except (ConsensusError, ConsensusTimeout) as exc:  # a cluster without quorum yet: retried each tick
            log.warning("rollout not synchronised with the cluster yet: %s", exc, extra={"component": "acp"})
        self.health.register("acp", self.consensus.health)
        routes = [*api.routes(self), *sla_routes(self.guard), *consensus_routes(self.consensus)]
        self._runner = await self._serve("admin_port", self.config.admin_host, self.config.admin_port, routes)
        self.admin_port = self._runner.addresses[0][1]
        if self.config.metrics_port >= 0:  # probes and scrapes only, for networks the admin port is not on
            probes = [r for r in routes if isinstance(r, web.RouteDef) and admin_guard.is_open(r.method, r.path)]
            self._metrics_runner = await self._serve("metrics_port", self.config.metrics_host,
                                                     self.config.metrics_port, probes)
            self.metrics_port = self._metrics_runner.addresses[0][1]
        self._write_runtime_file()
        self.health.started = True
        self.metrics.ready.set(1)
        self.transports.publish()
        self._tasks = [asyncio.create_task(self._tick_guard()),
                       asyncio.create_task(self.notifier.run_watchdog(self._alive))]
        self.notifier.ready(f"serving: data :{self.data_server.port}, admin :{self.admin_port}")
        log.info("agent ready", extra={"component": "agent", "version": __version__,
                                       "data_port": self.data_server.port, "admin_port": self.admin_port,
                                       "node_id": self.config.node_id})

    async def _serve(self, key: str, host: str, port: int, routes: list[web.RouteDef]) -> web.AppRunner:
        """An HTTP listener whose every route passes the admin guard (token, Host, Origin, JSON)."""
        app = web.Application(client_max_size=1 << 20, middlewares=[self._admin_guard])
        app.add_routes(routes)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        with _listening(key, host, port):
            await web.TCPSite(runner, host, port).start()
        return runner

    async def _await_consensus(self, timeout: float) -> None:
        """Give the cluster a moment to elect a leader, so the first registry operations do not
        wait out an election (and count as slow operations in the latency SLI)."""
        deadline = time.monotonic() + timeout
        while self.consensus.health()["status"] != "ok" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def _write_runtime_file(self) -> None:
        """state_dir/agent.json tells scripts and tests which ports were bound (ports may be 0)."""
        assert self.data_server is not None
        runtime = {"pid": os.getpid(), "data_port": self.data_server.port, "admin_port": self.admin_port,
                   "metrics_port": self.metrics_port or None, "node_id": self.config.node_id,
                   "version": __version__}
        tmp = self.state_dir / "agent.json.tmp"
        tmp.write_text(json.dumps(runtime))
        tmp.replace(self.state_dir / "agent.json")

    async def stop(self) -> None:
        """Graceful stop, bounded by shutdown_timeout_s."""
        timeout = self.config.shutdown_timeout_s
        started = time.monotonic()
        self.health.stopping = True
        self.metrics.ready.set(0)
        self.notifier.stopping()
        for task in self._tasks:
            task.cancel()
        log.info("agent stopping", extra={"component": "agent"})
        loop = asyncio.get_running_loop()
        if self._manager is not None:
            await loop.run_in_executor(None, self._manager.stop_all, timeout * 0.6)
        if self._live is not None:
            await self._live.stop(timeout * 0.3)
        if self.data_server is not None:
            remaining = max(0.1, timeout - (time.monotonic() - started))
            await loop.run_in_executor(None, self.data_server.stop, remaining * 0.8)
        if self.transports is not None:
            self.transports.close()
        await self.consensus.stop()
        for runner in (self._runner, self._metrics_runner):
            if runner is not None:
                await runner.cleanup()
        (self.state_dir / "agent.json").unlink(missing_ok=True)
        tracing.shutdown_tracing()
        log.info("agent stopped", extra={"component": "agent",
                                         "duration_ms": round((time.monotonic() - started) * 1000)})

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.start()
        await self._stop.wait()
        await self.stop()
