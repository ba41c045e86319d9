"""ACP in the agent process: the asyncio node (`node`), authenticated links (`transport`), the
fsync'd WAL (`wal`), the agent-facing `service`, its admin routes (`api`), VM ownership around a
migration (`ownership`) and the rollout setting kept in the registry (`rollout_store`)."""

from dwcp_agent.acp.runtime.api import build_routes
from dwcp_agent.acp.runtime.node import ConsensusNode, ConsensusTimeout
from dwcp_agent.acp.runtime.ownership import OwnedElsewhere, OwnershipError, OwnershipSession, RegistryOwnership
from dwcp_agent.acp.runtime.rollout_store import RegistryRolloutStore
from dwcp_agent.acp.runtime.service import ConsensusError, ConsensusService
from dwcp_agent.acp.runtime.transport import Transport
from dwcp_agent.acp.runtime.wal import FileWAL

__all__ = [
    "ConsensusError", "ConsensusNode", "ConsensusService", "ConsensusTimeout", "FileWAL", "OwnedElsewhere",
    "OwnershipError", "OwnershipSession", "RegistryOwnership", "RegistryRolloutStore", "Transport", "build_routes",
]
