"""VM ownership around a migration, through the replicated registry.

A migration may start only from the host the registry names as the VM's owner (an unowned VM is
claimed first). It holds a migration lease whose fencing token must still be current when the
migration ends; then the ownership change to the destination host is committed through
consensus. So two hosts never both believe they run the VM: until that commit the source stays
the owner, whatever happened to the bytes.

Image migrations run on threads, live migrations on the agent's event loop, where the consensus
service lives. Every registry step of either goes through one `OwnershipSession`, and each of its
two decisions (open, then complete or abandon) is one step, bounded in time: from a thread it is
one hand-over to the loop (`begin`, `complete`, `abandon`), on the loop it is awaited directly
(`begin_on_loop`, `complete_on_loop`, `abandon_on_loop`). Same steps, same errors.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

from dwcp_agent.acp.runtime.node import ConsensusTimeout
from dwcp_agent.acp.runtime.service import ConsensusError, ConsensusService

T = TypeVar("T")
LEASE_TTL_S = 3600.0  # a lease outlives any single migration attempt; the token is what fences


class OwnershipError(RuntimeError):
    """The registry refused (VM owned elsewhere, stale lease) or did not answer in time."""


class OwnedElsewhere(OwnershipError):
    """Another host owns the VM: the request was wrong, the service is fine."""


class RegistryOwnership:
    """Opens the ownership session of each migration (MigrationManager's `ownership`)."""

    def __init__(self, consensus: ConsensusService, node_id: str, loop: asyncio.AbstractEventLoop,
                 timeout_s: float = 10.0) -> None:
        self.consensus = consensus
        self.node_id = node_id
        self.loop = loop
        self.timeout_s = timeout_s

    def begin(self, vm_id: str) -> OwnershipSession:
        """Check (or claim) ownership and take the migration lease: one hand-over to the event
        loop for the three registry steps."""
        return OwnershipSession(self, vm_id, self.cross(self._begin(vm_id)))

    async def _begin(self, vm_id: str) -> int:
        owner = await self.consensus.owner(vm_id)
        if owner is None:
            owner = await self.consensus.claim(vm_id, self.node_id)
        if owner != self.node_id:
            raise OwnedElsewhere(f"VM {vm_id} is owned by {owner}, not this host ({self.node_id})")
        return (await self.consensus.acquire_lease(vm_id, self.node_id, LEASE_TTL_S)).token

    async def begin_on_loop(self, vm_id: str) -> OwnershipSession:
        """`begin` for a caller on the event loop (a live migration)."""
        return OwnershipSession(self, vm_id, await self.settle(self._begin(vm_id)))

    async def settle(self, coro: Coroutine[Any, Any, T], steps: int = 1) -> T:
        """Await `coro` on this loop, `timeout_s` per registry step (the loop-side `cross`)."""
        try:
            return await asyncio.wait_for(coro, self.timeout_s * steps)
        except (ConsensusError, ConsensusTimeout, TimeoutError) as exc:
            raise OwnershipError(f"registry: {str(exc) or type(exc).__name__}") from exc

    def cross(self, coro: Coroutine[Any, Any, T], steps: int = 1) -> T:
        """Run `coro` on the event loop and wait for it, `timeout_s` per registry step."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(self.timeout_s * steps)
        except (ConsensusError, ConsensusTimeout, concurrent.futures.TimeoutError) as exc:
            future.cancel()
            raise OwnershipError(f"registry: {str(exc) or type(exc).__name__}") from exc


class OwnershipSession:
    """One migration's lease on its VM, closed by exactly one decision: `complete` once the
    destination committed the verified image (or, live, its QEMU loaded the whole VM), `abandon`
    otherwise. Each is one hand-over from a thread, or one bounded await on the loop."""

    def __init__(self, registry: RegistryOwnership, vm_id: str, token: int) -> None:
        self.registry = registry
        self.vm_id = vm_id
        self.token = token
        self.closed = False

    def complete(self, destination: str) -> None:
        """Commit `destination` as the owner. If the registry refuses (lease superseded) the lease
        is given back in the same hand-over and OwnershipError raised: the source stays owner."""
        self._close()
        self.registry.cross(self._complete(destination), steps=2)

    async def complete_on_loop(self, destination: str) -> None:
        """`complete` for a caller on the event loop."""
        self._close()
        await self.registry.settle(self._complete(destination), steps=2)

    async def _complete(self, destination: str) -> None:
        consensus, node_id = self.registry.consensus, self.registry.node_id
        try:
            await consensus.transfer_ownership(self.vm_id, node_id, destination, self.token)
        except Exception:
            with contextlib.suppress(Exception):
                await consensus.release_lease(self.vm_id, node_id, self.token)
            raise

    def abandon(self) -> None:
        """The migration did not complete: give the lease back, ownership stays here. Nothing to
        do once the session is closed (a refused `complete` already gave it back)."""
        if self.closed:
            return
        self._close()
        self.registry.cross(self.registry.consensus.release_lease(self.vm_id, self.registry.node_id,
                                                                  self.token))

    async def abandon_on_loop(self) -> None:
        """`abandon` for a caller on the event loop."""
        if self.closed:
            return
        self._close()
        await self.registry.settle(self.registry.consensus.release_lease(self.vm_id, self.registry.node_id,
                                                                         self.token))

    def _close(self) -> None:
        if self.closed:
            raise OwnershipError(f"the ownership session of VM {self.vm_id} is already closed")
        self.closed = True
