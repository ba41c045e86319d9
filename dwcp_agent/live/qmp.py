"""QEMU control over QMP with QEMU's own client library (`qemu.qmp`), on the agent's event loop.

Only the commands live migration needs, each returning plain Python values, and every QMP
failure turned into `QemuError` with the command's name, so callers never see library types.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

__all__ = ["MigrationInfo", "QemuControl", "QemuError", "VmFacts"]

CONNECT_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 30.0


class QemuError(RuntimeError):
    """A QMP connection or command failed; the message names the socket or command."""


@dataclass(frozen=True)
class VmFacts:
    """What must match between source and destination QEMU for a migration to be possible."""

    version: str
    machine: str
    ram_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "machine": self.machine, "ram_bytes": self.ram_bytes}


@dataclass(frozen=True)
class MigrationInfo:
    """The fields of query-migrate the agent uses (bytes and bytes/s; ms for downtimes)."""

    status: str
    total_bytes: int = 0
    transferred_bytes: int = 0
    remaining_bytes: int = 0
    dirty_pages_rate: float = 0.0
    page_size: int = 4096
    iterations: int = 0
    mbps: float = 0.0
    expected_downtime_ms: float | None = None
    downtime_ms: float | None = None
    total_time_ms: float | None = None
    throttle_percentage: int = 0
    error: str = ""

    @property
    def dirty_bytes_per_s(self) -> float:
        return self.dirty_pages_rate * self.page_size

    @classmethod
    def from_qmp(cls, reply: dict[str, Any]) -> MigrationInfo:
        ram = reply.get("ram", {})
        return cls(
            status=str(reply.get("status", "none")),
            total_bytes=int(ram.get("total", 0)),
            transferred_bytes=int(ram.get("transferred", 0)),
            remaining_bytes=int(ram.get("remaining", 0)),
            dirty_pages_rate=float(ram.get("dirty-pages-rate", 0)),
            page_size=int(ram.get("page-size", 4096)) or 4096,
            iterations=int(ram.get("dirty-sync-count", 0)),
            mbps=float(ram.get("mbps", 0.0)),
            expected_downtime_ms=_opt_float(reply.get("expected-downtime")),
            downtime_ms=_opt_float(reply.get("downtime")),
            total_time_ms=_opt_float(reply.get("total-time")),
            throttle_percentage=int(reply.get("cpu-throttle-percentage", 0)),
            error=str(reply.get("error-desc", "")),
        )


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


class QemuControl:
    """One QMP connection to one QEMU; an async context manager."""

    def __init__(self, socket_path: Path | str, name: str = "dwcp-agent") -> None:
        self.socket_path = Path(socket_path)
        self._client = QMPClient(name)

    async def __aenter__(self) -> QemuControl:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        if not self.socket_path.exists():
            raise QemuError(f"no QMP socket at {self.socket_path}")
        try:
            await asyncio.wait_for(self._client.connect(str(self.socket_path)), CONNECT_TIMEOUT_S)
        except (TimeoutError, ConnectError, OSError) as exc:
            raise QemuError(f"cannot connect to QMP socket {self.socket_path}: {exc}") from exc

    async def close(self) -> None:
        # QEMU may already be gone (it quit after the migration): nothing left to close then.
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self._client.disconnect()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), COMMAND_TIMEOUT_S)
        except ExecuteError as exc:
            raise QemuError(f"{command}: {exc.error.error.desc}") from exc
        except (TimeoutError, QMPError, OSError, EOFError) as exc:
            raise QemuError(f"{command}: QMP connection {self.socket_path} failed: "
                            f"{exc or type(exc).__name__}") from exc

    async def facts(self) -> VmFacts:
        version = await self.execute("query-version")
        q = version["qemu"]
        machine = await self.execute("qom-get", {"path": "/machine", "property": "type"})
        memory = await self.execute("query-memory-size-summary")
        return VmFacts(f"{q['major']}.{q['minor']}.{q['micro']}", str(machine).removesuffix("-machine"),
                       int(memory["base-memory"]))

    async def run_state(self) -> str:
        return str((await self.execute("query-status"))["status"])

    async def set_capabilities(self, names: list[str]) -> None:
        caps = [{"capability": name, "state": True} for name in names]
        await self.execute("migrate-set-capabilities", {"capabilities": caps})

    async def set_parameters(self, params: dict[str, Any]) -> None:
        await self.execute("migrate-set-parameters", params)

    async def migrate(self, uri: str) -> None:
        await self.execute("migrate", {"uri": uri})

    async def migrate_incoming(self, uri: str) -> None:
        await self.execute("migrate-incoming", {"uri": uri})

    async def query_migrate(self) -> MigrationInfo:
        return MigrationInfo.from_qmp(await self.execute("query-migrate"))

    async def start_postcopy(self) -> None:
        await self.execute("migrate-start-postcopy")

    async def migrate_continue(self, state: str) -> None:
        """Leave a pause of `pause-before-switchover` (`state` is the status QEMU paused in)."""
        await self.execute("migrate-continue", {"state": state})

    async def cancel(self) -> None:
        await self.execute("migrate_cancel")

    async def cont(self) -> None:
        await self.execute("cont")

    async def quit(self) -> None:
        with contextlib.suppress(QemuError):  # QEMU may close the socket while answering: gone either way
            await self.execute("quit")
