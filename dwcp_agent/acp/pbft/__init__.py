"""PBFT as a pure state machine: `pbft` (the replica), `certs` (what is signed and how proofs are
checked) and `byzantine_faults` (test-only lying replicas, refused by a real agent unless unlocked)."""

from dwcp_agent.acp.pbft.byzantine_faults import FaultyReplica, from_environment
from dwcp_agent.acp.pbft.certs import Quorums
from dwcp_agent.acp.pbft.pbft import Pbft, PbftOptions, PbftReady

__all__ = ["FaultyReplica", "Pbft", "PbftOptions", "PbftReady", "Quorums", "from_environment"]
