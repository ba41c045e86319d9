"""Rollout controller: which protocol profile (v1 or v3) a migration uses, and rollback.

The operator (or the SLA guard) sets a percentage; a migration uses profile `v3` when a stable
hash of its id falls under it, so the same migration id gets the same answer on every host and
raising the percentage only ever moves migrations from v1 to v3. `ENABLE_V3=false` forces v1.
A rollback sets the percentage to 0 and *freezes* the rollout: nothing but an explicit
`unfreeze` lets it move again, so an automatic rollback cannot be undone by a stale script.

The state lives in a `RolloutStore`. The default is in memory (one agent); `FileRolloutStore`
keeps a rollback across restarts; a store backed by the consensus registry makes every agent
follow one cluster-wide setting. The controller never blocks: `save` proposes, `load` returns
what the store has committed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from dwcp_agent.config import Config
from dwcp_agent.telemetry.metrics import ROLLBACK_REASONS, Metrics

__all__ = [
    "FileRolloutStore",
    "MemoryRolloutStore",
    "Profile",
    "RolloutController",
    "RolloutError",
    "RolloutState",
    "RolloutStore",
    "rollout_bucket",
]

Profile = Literal["v1", "v3"]
log = logging.getLogger("dwcp_agent.rollout.controller")


class RolloutError(RuntimeError):
    """A rollout change was refused (frozen rollout, out-of-range percentage)."""


@dataclass(frozen=True)
class RolloutState:
    """One version of the rollout setting; `version` grows by one with every change."""

    percentage: int = 100
    enable_v3: bool = True
    frozen: bool = False
    reason: str = ""
    changed_at: float = 0.0
    changed_by: str = ""
    version: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, used by stores, the admin API and `rollout status --json`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutState:
        """Inverse of `to_dict`; unknown keys are ignored so newer agents can add fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class RolloutStore(Protocol):
    """Where the rollout state lives.

    `load` returns the latest committed state, or None when nothing was ever stored.
    `save` proposes a new state whose `version` is the loaded one + 1; a replicated store may
    commit it later (and should refuse a proposal whose version is stale), readers see it
    after commit. `authoritative` says whether a stored state wins over the agent's config at
    start-up (True for a cluster registry; False for local stores, where the config's
    FEATURE_FLAG_ROLLOUT applies at each start unless a rollback froze the rollout).
    """

    authoritative: bool

    def load(self) -> RolloutState | None: ...

    def save(self, state: RolloutState) -> None: ...


class MemoryRolloutStore:
    """The state of one agent process; lost on restart."""

    authoritative = False

    def __init__(self, state: RolloutState | None = None) -> None:
        self._state = state

    def load(self) -> RolloutState | None:
        """The last saved state."""
        return self._state

    def save(self, state: RolloutState) -> None:
        """Replace the state at once."""
        self._state = state


class FileRolloutStore:
    """A JSON file in the agent's state directory, replaced atomically, so a rollback survives
    a restart of the agent."""

    authoritative = False

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> RolloutState | None:
        """The stored state; a missing or unreadable file counts as none (logged)."""
        try:
            return RolloutState.from_dict(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable rollout state %s: %s", self.path, exc,
                        extra={"component": "sla"})
            return None

    def save(self, state: RolloutState) -> None:
        """Write to a temporary file, fsync, rename: a crash leaves the old or the new state."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(state.to_dict(), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


def rollout_bucket(migration_id: str) -> int:
    """Stable bucket 0..99 of a migration id: the same on every host and every run."""
    digest = hashlib.blake2b(migration_id.encode(), digest_size=8, person=b"dwcp-rollout").digest()
    return int.from_bytes(digest, "big") % 100


class RolloutController:
    """Decides each migration's protocol profile and applies rollout changes and rollbacks."""

    def __init__(self, config: Config, metrics: Metrics, clock: Callable[[], float] = time.time,
                 store: RolloutStore | None = None) -> None:
        self._metrics = metrics
        self._clock = clock
        self._node = config.node_id
        self.store: RolloutStore = store if store is not None else MemoryRolloutStore()
        self.events: deque[dict[str, Any]] = deque(maxlen=200)
        stored = self.store.load()
        if stored is None or not (stored.frozen or self.store.authoritative):
            version = stored.version + 1 if stored else 1
            self.store.save(RolloutState(
                percentage=config.feature_flag_rollout, enable_v3=config.enable_v3, reason="config",
                changed_at=clock(), changed_by=self._node, version=version,
            ))
        self.sync_metrics()

    @property
    def state(self) -> RolloutState:
        """The current (committed) state."""
        state = self.store.load()
        return state if state is not None else RolloutState()

    def profile_for(self, migration_id: str) -> Profile:
        """`v3` when v3 is enabled and the id's stable bucket is under the percentage."""
        state = self.state
        if state.enable_v3 and rollout_bucket(migration_id) < state.percentage:
            return "v3"
        return "v1"

    def set_percentage(self, percentage: int, by: str = "operator") -> RolloutState:
        """Move the rollout; refused while frozen, so a rollback sticks until `unfreeze`."""
        if not 0 <= percentage <= 100:
            raise RolloutError(f"rollout percentage must be 0..100, got {percentage}")
        current = self.state
        if current.frozen and percentage > 0:
            raise RolloutError(
                f"rollout is frozen since a rollback ({current.reason}); "
                "run `dwcp-agent rollout unfreeze` first"
            )
        return self._change(current, by, "set", percentage=percentage, reason="set")

    def set_enable_v3(self, enabled: bool, by: str = "operator") -> RolloutState:
        """The ENABLE_V3 master switch; switching v3 on is refused while frozen."""
        current = self.state
        if current.frozen and enabled:
            raise RolloutError("rollout is frozen; run `dwcp-agent rollout unfreeze` first")
        return self._change(current, by, "enable_v3", enable_v3=enabled, reason="enable_v3")

    def rollback(self, reason: str = "manual", by: str = "operator", detail: str = "") -> RolloutState:
        """Send every new migration to v1 and freeze the rollout.

        `reason` is a metric label, so it is one of ROLLBACK_REASONS; free text goes in `detail`.
        """
        if reason not in ROLLBACK_REASONS:
            raise RolloutError(f"rollback reason must be one of {', '.join(ROLLBACK_REASONS)}")
        current = self.state
        text = f"{reason}: {detail}" if detail else reason
        state = self._change(current, by, "rollback", percentage=0, frozen=True, reason=text)
        self._metrics.rollbacks.labels(reason).inc()
        log.warning(
            "rollout rolled back to 0%% and frozen (%s) %s", reason, detail,
            extra={"component": "sla", "event": "rollback", "reason": reason,
                   "previous_percentage": current.percentage},
        )
        return state

    def unfreeze(self, by: str = "operator") -> RolloutState:
        """Allow `set` again; the percentage stays where the rollback left it."""
        return self._change(self.state, by, "unfreeze", frozen=False, reason="unfreeze")

    def status(self) -> dict[str, Any]:
        """State plus recent rollout events, for the admin API."""
        return {**self.state.to_dict(), "events": list(self.events)}

    def sync_metrics(self) -> None:
        """Mirror the state into the gauges; called after every change and on each guard tick,
        so an agent following a replicated store exports what the cluster decided."""
        state = self.state
        self._metrics.rollout_percentage.set(state.percentage if state.enable_v3 else 0)
        self._metrics.rollout_frozen.set(1 if state.frozen else 0)

    def _change(self, current: RolloutState, by: str, event: str, **changes: Any) -> RolloutState:
        state = dataclasses.replace(current, changed_at=self._clock(), changed_by=by,
                                    version=current.version + 1, **changes)
        self.store.save(state)
        self.events.append({"ts": state.changed_at, "event": event, "by": by,
                            "percentage": state.percentage, "frozen": state.frozen,
                            "reason": state.reason})
        if event != "rollback":
            log.info("rollout %s: %d%% frozen=%s", event, state.percentage, state.frozen,
                     extra={"component": "sla", "event": event, "by": by})
        self.sync_metrics()
        return state
