"""ACP: the replicated cluster registry (VM owners, migration leases, members, rollout, protocol).

Layers, each importing only the ones above it:
- shared, pure: `messages` (wire structs and codecs), `auth` (HMAC and Ed25519 keys),
  `byzantine` (suspicion and quarantine), `registry` (the replicated state machine),
  `storage` (what a replica persists), `adaptive` (`Replica`: Raft or PBFT, switched by command);
- `raft/` and `pbft/`: the two protocols as pure state machines (etcd raft's Ready contract);
- `runtime/`: the asyncio side (node, transport, WAL, service, admin routes, ownership, rollout store);
- `testing/`: the seeded cluster simulation and the linearizability checker (tests only);
- `cli`: the `cluster` and `vm` commands, a client of the admin API.

Nothing is imported here, so loading a pure module does not start the runtime's dependencies.
"""

__all__ = [
    "adaptive", "auth", "byzantine", "cli", "messages", "pbft", "raft", "registry", "runtime", "storage", "testing",
]
