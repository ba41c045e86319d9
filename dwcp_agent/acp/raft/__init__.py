"""Raft as a pure state machine (after etcd's raft package): `raft` (the node) and `log` (its log)."""

from dwcp_agent.acp.raft.log import RaftLog
from dwcp_agent.acp.raft.raft import NotLeader, ProposalDropped, Raft, RaftOptions, RaftReady, Role, decode_conf

__all__ = ["NotLeader", "ProposalDropped", "Raft", "RaftLog", "RaftOptions", "RaftReady", "Role", "decode_conf"]
