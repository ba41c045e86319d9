"""Outgoing migrations of one agent: start, list, cancel, stop all; metrics and logs at the end.

Each migration runs its `SendSession` on a thread; the admin API reads `Migration.to_dict()`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry import trace as otel_trace

from dwcp_agent.acp.runtime.ownership import OwnedElsewhere
from dwcp_agent.amst.select import Transports
from dwcp_agent.config import Config
from dwcp_agent.migration.buffers import BufferPool
from dwcp_agent.migration.history import MigrationHistory
from dwcp_agent.migration.model import Interrupted, MigrationError, MigrationRequest, Progress, SendResult
from dwcp_agent.migration.outgoing import target_allowed
from dwcp_agent.migration.safe_files import UnsafePath, open_source
from dwcp_agent.migration.sender import SendSession
from dwcp_agent.telemetry import tracing
from dwcp_agent.telemetry.metrics import CLIENT_ERROR_TYPES, Metrics

log = logging.getLogger("dwcp_agent.migration")

TERMINAL = ("completed", "failed", "cancelled", "interrupted", "refused")


class OwnershipSession(Protocol):
    """One migration's hold on its VM in the registry (acp.runtime.ownership.OwnershipSession)."""

    def complete(self, destination: str) -> None: ...

    def abandon(self) -> None: ...


class Ownership(Protocol):
    """Opens a migration's ownership session (acp.runtime.ownership.RegistryOwnership)."""

    def begin(self, vm_id: str) -> OwnershipSession: ...


class RequestError(ValueError):
    """A migration request is invalid; the message says which field and why, `error_type` the kind
    (a client's refusal, metrics.CLIENT_ERROR_TYPES)."""

    def __init__(self, message: str, error_type: str = "bad_request") -> None:
        super().__init__(message)
        self.error_type = error_type


@dataclass
class Migration:
    """One outgoing migration as the API and CLI see it."""

    request: MigrationRequest
    progress: Progress
    session: SendSession | None = None
    state: str = "running"
    error: str = ""
    error_type: str = ""
    result: SendResult | None = None
    started: float = field(default_factory=time.time)
    finished: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)
    span: otel_trace.Span | None = None

    @property
    def duration_s(self) -> float:
        return (self.finished or time.time()) - self.started

    def to_dict(self) -> dict[str, Any]:
        p = self.progress
        duration = self.duration_s
        data: dict[str, Any] = {
            "id": self.request.migration_id,
            "vm_id": self.request.vm_id,
            "source": str(self.request.source),
            "destination": f"{self.request.host}:{self.request.port}",
            "dest_path": self.request.dest_path,
            "protocol": self.request.protocol,
            "state": self.state,
            "total_bytes": p.total_bytes,
            "done_bytes": p.done_bytes,
            "skipped_bytes": p.skipped_bytes,
            "wire_bytes": p.wire_bytes,
            "attempts": p.attempts,
            "streams": p.streams,
            "streams_configured": self.session.streams if self.session else 0,
            "streams_used": p.stream_stats(),
            "mode": self.request.mode,
            "mode_measured": self.request.mode_measured,
            "started": self.started,
            "finished": self.finished or None,
            "duration_s": round(duration, 3),
            # A rate needs bytes that arrived: none for a failed migration that moved nothing.
            "throughput_bytes_per_second": round(p.done_bytes / duration) if duration > 0 and p.done_bytes else None,
        }
        if self.session is not None and self.session.link is not None:
            data["tcp_congestion"] = self.session.link.congestion
            data["tcp_congestion_reason"] = self.session.link.congestion_reason
        if p.retries:
            data["retries"] = list(p.retries)
        if self.error:
            data["error"] = self.error
            data["error_type"] = self.error_type
        if self.result is not None:
            data["digest"] = self.result.digest.hex()
            data["digest_verified"] = True
            data["compression_ratio"] = round(p.total_bytes / max(self.result.wire_bytes, 1), 3)
        return data


class MigrationManager:
    """Starts migrations on threads and records their outcome."""

    def __init__(self, config: Config, metrics: Metrics, key: bytes,
                 profile_for: Callable[[str], str] = lambda _id: "v3",
                 on_finished: Callable[[Migration], None] | None = None, pool: BufferPool | None = None,
                 ownership: Ownership | None = None, history: MigrationHistory | None = None,
                 transports: Transports | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.key = key
        self.profile_for = profile_for
        self.on_finished = on_finished
        self.pool = pool or BufferPool()
        self.ownership = ownership
        self.history = history  # ended migrations, kept across restarts (bounded by count and age)
        self.transports = transports  # the agent's selection, shared by every migration
        self.migrations: dict[str, Migration] = {}
        self._lock = threading.Lock()

    def parse_request(self, body: dict[str, Any]) -> MigrationRequest:
        """Validate an API request body into a MigrationRequest (RequestError names the field)."""
        for key in ("source", "to", "dest_path"):
            if not isinstance(body.get(key), str) or not body[key]:
                raise RequestError(f"field '{key}' is required (a non-empty string)")
        unknown = set(body) - {"source", "to", "dest_path", "vm_id", "migration_id", "protocol"}
        if unknown:
            raise RequestError(f"unknown field(s): {', '.join(sorted(unknown))}")
        host, sep, port = body["to"].rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RequestError(f"field 'to': {body['to']!r} is not HOST:PORT")
        if not target_allowed(host, int(port), self.config):
            raise RequestError(f"field 'to': {body['to']!r} is neither a cluster member nor in "
                               "migration_targets", "forbidden")
        migration_id = body.get("migration_id") or uuid.uuid4().hex[:16]
        if not isinstance(migration_id, str) or not migration_id.replace("-", "").isalnum():
            raise RequestError("field 'migration_id': letters, digits and dashes only")
        with self._lock:
            existing = self.migrations.get(migration_id)
        if existing is not None and existing.state not in TERMINAL:
            raise RequestError(f"migration {migration_id} is already running", "conflict")
        protocol = body.get("protocol") or self.profile_for(migration_id)
        if protocol not in ("v1", "v3"):
            raise RequestError("field 'protocol': v1 or v3")
        try:  # opened once, here (O_NOFOLLOW); the migration reads this descriptor only
            image = open_source(body["source"], self.config.allowed_source_dirs)
        except UnsafePath as exc:
            raise RequestError(f"field 'source': {exc} (config key source_dirs)", "forbidden") from exc
        return MigrationRequest(migration_id, str(body.get("vm_id") or image.path.stem), image.path,
                                host.strip("[]"), int(port), body["dest_path"], protocol, image=image)

    def start(self, request: MigrationRequest) -> Migration:
        """Start a migration, or raise RequestError when max_outgoing_migrations are running."""
        with self._lock:
            self._expire()
            running = sum(1 for m in self.migrations.values() if m.state not in TERMINAL)
            if running >= self.config.max_outgoing_migrations:
                if request.image is not None:
                    request.image.close()
                raise RequestError(f"{running} outgoing migrations are running, the limit "
                                   f"(max_outgoing_migrations) is {self.config.max_outgoing_migrations}", "policy")
            # Reserve the slot before the session opens anything.
            self.migrations[request.migration_id] = reserved = Migration(request, Progress())
        try:
            return self._start(request, reserved)
        except BaseException:
            with self._lock:
                self.migrations.pop(request.migration_id, None)
            if request.image is not None:
                request.image.close()
            raise

    def _expire(self) -> None:
        """Forget finished migrations older than finished_record_ttl_s (caller holds the lock)."""
        cutoff = time.time() - self.config.finished_record_ttl_s
        for key in [k for k, m in self.migrations.items() if m.done.is_set() and m.finished < cutoff]:
            del self.migrations[key]

    def _start(self, request: MigrationRequest, migration: Migration) -> Migration:
        # One trace per migration: its context travels in every handshake to the destination.
        # CLIENT: this span's context travels in every handshake; the destination's is SERVER.
        migration.span = tracing.get_tracer().start_span("migration", kind=otel_trace.SpanKind.CLIENT, attributes={
            "dwcp.migration_id": request.migration_id, "dwcp.vm_id": request.vm_id,
            "dwcp.protocol": request.protocol, "dwcp.destination": f"{request.host}:{request.port}"})
        trace_context = tracing.inject_context(otel_trace.set_span_in_context(migration.span))
        migration.session = SendSession(self.config, self.metrics, self.key, request, trace_context,
                                        migration.progress, pool=self.pool, transports=self.transports)
        self.metrics.active_migrations.inc()
        log.info("migration started", extra={
            "migration_id": request.migration_id, "migration_status": "started", "vm_id": request.vm_id,
            "destination": f"{request.host}:{request.port}", "protocol": request.protocol})
        threading.Thread(target=self._run, args=(migration,), name=f"migration-{request.migration_id}",
                         daemon=True).start()
        return migration

    def _run(self, migration: Migration) -> None:
        assert migration.session is not None and migration.span is not None
        state = "failed"
        span = migration.span
        try:
            with otel_trace.use_span(span, end_on_exit=False):
                self._attempt_all(migration)
            state = "completed"
        except Interrupted as exc:
            state = "cancelled" if migration.session.abort_destination else "interrupted"
            migration.error, migration.error_type = str(exc), exc.error_type
        except MigrationError as exc:
            migration.error, migration.error_type = str(exc), exc.error_type
            if exc.error_type in CLIENT_ERROR_TYPES:
                state = "refused"  # the request was wrong; not a failure of the service
            self.metrics.error("migration", exc.error_type)
        except Exception as exc:  # a bug must still end the migration visibly, never hang it
            log.exception("migration crashed")
            migration.error, migration.error_type = f"internal error: {exc}", "internal"
            self.metrics.error("migration", "internal")
        finally:
            migration.finished = time.time()
            span.set_attribute("dwcp.status", state)
            if state != "completed":
                span.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR, migration.error))
            with otel_trace.use_span(span, end_on_exit=True):
                self._record(migration, state)
            migration.state = state  # published last: a reader seeing it also sees the metrics
            if self.history is not None:
                self.history.add(migration.to_dict())
                self._forget_ended()
            migration.done.set()
            if self.on_finished is not None:
                self.on_finished(migration)

    def _attempt_all(self, migration: Migration) -> None:
        """Lease, transfer, commit ownership: the registry names the new host only after the
        destination committed the verified image; on any failure the source stays the owner."""
        assert migration.session is not None
        vm_id = migration.request.vm_id
        if self.ownership is None:
            migration.result = migration.session.run()
            return
        try:
            owned = self.ownership.begin(vm_id)
        except OwnedElsewhere as exc:
            raise MigrationError(f"ownership: {exc}", "vm_owned_elsewhere") from exc
        except Exception as exc:
            raise MigrationError(f"ownership: {exc}", "ownership") from exc
        try:
            migration.result = migration.session.run()
            owned.complete(migration.session.peer_node)  # refused: the lease goes back in that call
        except BaseException as exc:
            with contextlib.suppress(Exception):
                owned.abandon()
            if isinstance(exc, MigrationError):
                raise
            raise MigrationError(f"ownership not transferred, source stays authoritative: {exc}",
                                 "ownership") from exc

    def _record(self, migration: Migration, state: str) -> None:
        r = migration.request
        m = self.metrics
        m.active_migrations.dec()
        m.migrations.labels(state, r.mode, r.protocol).inc()
        duration = migration.duration_s
        if state == "completed":
            m.migration_duration.labels(r.mode, r.protocol).observe(duration)
            m.throughput.labels(r.protocol).set(migration.progress.total_bytes / max(duration, 1e-9))
            if migration.result is not None:
                m.hde_compression_ratio.set(migration.progress.total_bytes / max(migration.result.wire_bytes, 1))
        log.log(logging.INFO if state == "completed" else logging.WARNING,
                "migration %s", state, extra={
                    "migration_id": r.migration_id, "migration_status": state, "mode": r.mode,
                    "mode_measured": r.mode_measured, "duration_ms": round(duration * 1000),
                    "bytes": migration.progress.total_bytes,
                    "wire_bytes": migration.progress.wire_bytes, "error": migration.error or None,
                    "error_type": migration.error_type or None})

    def _forget_ended(self) -> None:
        """Ended migrations beyond the history bound leave memory (the history file keeps them)."""
        assert self.history is not None
        with self._lock:
            ended = sorted((m for m in self.migrations.values() if m.state in TERMINAL), key=lambda m: m.started)
            for m in ended[: max(0, len(ended) - self.history.max_entries)]:
                del self.migrations[m.request.migration_id]

    def records(self) -> list[dict[str, Any]]:
        """API records of every migration: running and recent ones, then the remembered history."""
        live = {m.request.migration_id: m.to_dict() for m in self.list()}
        past = [r for r in (self.history.records() if self.history else []) if r["id"] not in live]
        return sorted([*past, *live.values()], key=lambda r: r.get("started") or 0.0)

    def record(self, migration_id: str) -> dict[str, Any] | None:
        """One migration's API record, from memory or, after a restart, from the history."""
        migration = self.get(migration_id)
        if migration is not None:
            return migration.to_dict()
        return self.history.get(migration_id) if self.history is not None else None

    def get(self, migration_id: str) -> Migration | None:
        with self._lock:
            self._expire()
            return self.migrations.get(migration_id)

    def list(self) -> list[Migration]:
        with self._lock:
            self._expire()
            return sorted(self.migrations.values(), key=lambda m: m.started)

    def cancel(self, migration_id: str) -> Migration | None:
        migration = self.get(migration_id)
        if migration is not None and migration.session is not None and migration.state not in TERMINAL:
            migration.session.stop(abort_destination=True)
        return migration

    def stop_all(self, timeout: float) -> None:
        """Shutdown: stop every running migration, leaving destinations resumable."""
        running = [m for m in self.list() if m.state not in TERMINAL]
        for m in running:
            if m.session is not None:
                m.session.stop(abort_destination=False)
        deadline = time.monotonic() + timeout
        for m in running:
            m.done.wait(max(0.0, deadline - time.monotonic()))
