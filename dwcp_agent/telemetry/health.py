"""Per-component health, as /health and /health/<component> report it.

Components register a probe returning at least {"status": ...}. A component the agent does not
run reports "absent" (never a made-up "ok"). The agent is ready when it has started and no
registered component is "down".
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

# Components the ops guide names; those not built into this agent report "absent".
KNOWN_COMPONENTS = ("amst", "hde", "pba", "acp", "ass", "itp", "migration")
Probe = Callable[[], dict[str, Any]]


class Health:
    """Registry of component probes plus the agent's own started/stopping state."""

    def __init__(self) -> None:
        self._probes: dict[str, Probe] = {}
        self._lock = threading.Lock()
        self.started = False
        self.stopping = False

    def register(self, component: str, probe: Probe) -> None:
        with self._lock:
            self._probes[component] = probe

    def knows(self, name: str) -> bool:
        """A component the ops guide names or one registered here (anything else is a 404)."""
        with self._lock:
            return name in KNOWN_COMPONENTS or name in self._probes

    def component(self, name: str) -> dict[str, Any]:
        with self._lock:
            probe = self._probes.get(name)
        if probe is None:
            return {"status": "absent", "detail": "not running in this agent"}
        try:
            report = dict(probe())
        except Exception as exc:  # a failing probe is itself a health finding
            return {"status": "down", "detail": f"health probe failed: {exc}"}
        report.setdefault("status", "ok")
        return report

    def names(self) -> list[str]:
        with self._lock:
            return sorted(set(KNOWN_COMPONENTS) | set(self._probes))

    def snapshot(self) -> tuple[bool, dict[str, Any]]:
        """(ready, body) for /health."""
        names = self.names()
        components = {name: self.component(name) for name in names}
        down = [n for n, c in components.items() if c["status"] == "down"]
        ready = self.started and not self.stopping and not down
        if self.stopping:
            status = "stopping"
        elif not self.started:
            status = "starting"
        elif down:
            status = "down"
        elif any(c["status"] == "degraded" for c in components.values()):
            status = "degraded"
        else:
            status = "ok"
        return ready, {"status": status, "ready": ready, "components": components}
