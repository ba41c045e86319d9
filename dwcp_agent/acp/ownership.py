"""VM ownership around a migration, through the replicated registry.

A migration may start only from the host the registry names as the VM's owner (an unowned VM is
claimed first). It holds a migration lease whose fencing token must still be current when the
migration ends; then the ownership change to the destination host is committed through
consensus. So two hosts never both believe they run the VM: until that commit the source stays
the owner, whatever happened to the bytes.

The migration runs on threads; the consensus service lives on the agent's event loop, so each
call is handed to that loop and awaited with a bound.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine
from typing import Any, TypeVar

from dwcp_agent.acp.node import ConsensusTimeout
from dwcp_agent.acp.service import ConsensusError, ConsensusService

T = TypeVar("T")
LEASE_TTL_S = 3600.0  # a lease outlives any single migration attempt; the token is what fences


class OwnershipError(RuntimeError):
    """The registry refused (VM owned elsewhere, stale lease) or did not answer in time."""


class OwnedElsewhere(OwnershipError):
    """Another host owns the VM: the request was wrong, the service is fine."""


class RegistryOwnership:
    """begin / finish / release of a migration's ownership steps, for MigrationManager."""

    def __init__(self, consensus: ConsensusService, node_id: str, loop: asyncio.AbstractEventLoop,
                 timeout_s: float = 10.0) -> None:
        self.consensus = consensus
        self.node_id = node_id
        self.loop = loop
        self.timeout_s = timeout_s

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(self.timeout_s)
        except (ConsensusError, ConsensusTimeout, concurrent.futures.TimeoutError) as exc:
            future.cancel()
            raise OwnershipError(f"registry: {exc or type(exc).__name__}") from exc

    def begin(self, vm_id: str) -> int:
        """Check (or claim) ownership and take the migration lease; returns its fencing token.
        One hand-over to the event loop for the three registry steps."""
        return self._call(self._begin(vm_id))

    async def _begin(self, vm_id: str) -> int:
        owner = await self.consensus.owner(vm_id)
        if owner is None:
            owner = await self.consensus.claim(vm_id, self.node_id)
        if owner != self.node_id:
            raise OwnedElsewhere(f"VM {vm_id} is owned by {owner}, not this host ({self.node_id})")
        return (await self.consensus.acquire_lease(vm_id, self.node_id, LEASE_TTL_S)).token

    def finish(self, vm_id: str, destination: str, token: int) -> None:
        """Commit the new owner; refused if the lease was superseded meanwhile."""
        self._call(self.consensus.transfer_ownership(vm_id, self.node_id, destination, token))

    def release(self, vm_id: str, token: int) -> None:
        """The migration did not complete: give the lease back, ownership stays here."""
        self._call(self.consensus.release_lease(vm_id, self.node_id, token))
