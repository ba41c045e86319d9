"""Rollout state kept in the consensus registry, so every agent of a cluster follows one setting.

The rollout controller (rollout/controller.py) is synchronous; the registry is asynchronous and
replicated. This store bridges them: `load` answers from a local cache (also written to a file,
so a restart knows the last state before the cluster answers), `save` updates the cache and
commits the change through consensus, and `refresh` adopts what the cluster committed, for
example a rollback decided by another agent's SLA guard.

At start the agent calls `sync` before anything else uses the store: a rollback frozen in the
registry wins over this agent's configuration, otherwise the configuration is proposed to the
cluster (an operator's `FEATURE_FLAG_ROLLOUT=0` halt still works).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from dwcp_agent.acp.registry import RolloutSetting
from dwcp_agent.acp.runtime.node import ConsensusTimeout
from dwcp_agent.acp.runtime.service import ConsensusError, ConsensusService
from dwcp_agent.rollout.controller import FileRolloutStore, RolloutState

log = logging.getLogger("dwcp_agent.acp")


class RegistryRolloutStore:
    """RolloutStore backed by the replicated registry, with a local write-through cache."""

    authoritative = False  # the configuration applies at start unless the cluster froze the rollout

    def __init__(self, consensus: ConsensusService, local: FileRolloutStore) -> None:
        self.consensus = consensus
        self.local = local
        self._cache = local.load()
        self._pending: RolloutState | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pushing = 0

    def load(self) -> RolloutState | None:
        return self._cache

    def save(self, state: RolloutState) -> None:
        self._cache = state
        self.local.save(state)
        if self._loop is None:
            self._pending = state  # before the consensus service runs; `sync` decides
            return
        self._pushing += 1
        coro = self._push(state)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._loop.create_task(coro)
        else:
            asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _push(self, state: RolloutState) -> None:
        try:
            await self.consensus.set_rollout(state.percentage, state.frozen, state.enable_v3)
        except (ConsensusError, ConsensusTimeout) as exc:
            log.error("rollout change not committed to the cluster: %s", exc, extra={"component": "acp"})
        finally:
            self._pushing -= 1

    async def sync(self) -> None:
        """Bind to the running loop; reconcile the cached/pending state with the cluster's."""
        self._loop = asyncio.get_running_loop()
        setting = await self.consensus.rollout()
        pending, self._pending = self._pending, None
        if setting.frozen or pending is None:
            self._adopt(setting)
        else:
            self.save(pending)

    async def refresh(self) -> None:
        """Adopt the cluster's committed setting when it differs (and nothing of ours is in flight);
        finish a start-up `sync` the cluster could not answer then."""
        if self._pending is not None:
            await self.sync()
        elif not self._pushing:
            self._adopt(await self.consensus.rollout())

    def _adopt(self, setting: RolloutSetting) -> None:
        current = self._cache or RolloutState()
        if (current.percentage, current.frozen, current.enable_v3) == (
                setting.percentage, setting.frozen, setting.enable_v3):
            return
        self._cache = dataclasses.replace(current, percentage=setting.percentage, frozen=setting.frozen,
                                          enable_v3=setting.enable_v3, reason="cluster registry",
                                          changed_at=time.time(), changed_by="cluster", version=current.version + 1)
        self.local.save(self._cache)
        log.info("rollout follows the cluster: %d%% frozen=%s enable_v3=%s", setting.percentage, setting.frozen,
                 setting.enable_v3, extra={"component": "acp", "event": "rollout_sync"})
