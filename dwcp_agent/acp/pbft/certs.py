"""PBFT certificates: what is signed, how proofs are checked, and how a new view is computed.

Kept apart from the replica logic so the rules a third party can verify (checkpoint proofs,
prepared certificates, view-change messages, the new-view pre-prepares) sit in one readable place.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import msgspec

from dwcp_agent.acp.auth import KeyRing
from dwcp_agent.acp.messages import Checkpoint, NewView, Prepare, PreparedProof, PrePrepare, Request, ViewChange

__all__ = [
    "Quorums",
    "batch_digest",
    "checkpoint_bytes",
    "compute_new_view",
    "pp_header",
    "prepare_bytes",
    "request_bytes",
    "valid_checkpoint_proof",
    "valid_prepared",
    "valid_view_change",
    "view_change_bytes",
]

_ENC = msgspec.msgpack.Encoder()
NULL_DIGEST = hashlib.sha256(_ENC.encode([])).digest()


@dataclass(frozen=True)
class Quorums:
    """Replica set arithmetic: f faults tolerated, q = ceil((n + f + 1) / 2) certificates."""

    replicas: tuple[str, ...]
    unsafe_quorum: int = 0

    @property
    def n(self) -> int:
        return len(self.replicas)

    @property
    def f(self) -> int:
        return (self.n - 1) // 3

    @property
    def q(self) -> int:
        return self.unsafe_quorum or (self.n + self.f + 2) // 2

    def primary(self, view: int) -> str:
        return self.replicas[view % self.n]


def batch_digest(batch: list[Request]) -> bytes:
    """Digest of a batch of requests (what the replicas agree on)."""
    return hashlib.sha256(_ENC.encode(batch)).digest()


def request_bytes(req: Request) -> bytes:
    return _ENC.encode(("rq", req.client, req.ts, req.op))


def pp_header(view: int, seq: int, digest: bytes) -> bytes:
    return _ENC.encode(("pp", view, seq, digest))


def prepare_bytes(m: Prepare) -> bytes:
    return _ENC.encode(("p", m.view, m.seq, m.digest, m.replica))


def checkpoint_bytes(m: Checkpoint) -> bytes:
    return _ENC.encode(("ck", m.seq, m.state, m.replica))


def view_change_bytes(m: ViewChange) -> bytes:
    return _ENC.encode(("vc", m.view, m.stable_seq, m.checkpoints, m.prepared, m.replica))


def new_view_bytes(m: NewView) -> bytes:
    return _ENC.encode(("nv", m.view, m.view_changes, m.pre_prepares))


def client_node(client: str) -> str:
    """Node that signs a client's requests: client ids are '<node>/<incarnation>'."""
    return client.split("/", 1)[0]


def valid_request(keys: KeyRing, req: Request) -> bool:
    return keys.verify(client_node(req.client), request_bytes(req), req.sig)


def valid_checkpoint_proof(keys: KeyRing, qs: Quorums, seq: int, proof: list[Checkpoint]) -> bytes | None:
    """State digest proven stable at `seq` by q signed checkpoints, else None. Seq 0 needs no proof."""
    if seq == 0:
        return b""
    by_state: dict[bytes, set[str]] = {}
    for ck in proof:
        if ck.seq == seq and ck.replica in qs.replicas and keys.verify(ck.replica, checkpoint_bytes(ck), ck.sig):
            by_state.setdefault(ck.state, set()).add(ck.replica)
    for state, who in by_state.items():
        if len(who) >= qs.q:
            return state
    return None


def valid_prepared(keys: KeyRing, qs: Quorums, proof: PreparedProof) -> bool:
    """A signed pre-prepare plus q-1 matching signed prepares from distinct backups."""
    pp = proof.pre_prepare
    primary = qs.primary(pp.view)
    if batch_digest(pp.batch) != pp.digest or not keys.verify(primary, pp_header(pp.view, pp.seq, pp.digest), pp.sig):
        return False
    who = {p.replica for p in proof.prepares
           if p.view == pp.view and p.seq == pp.seq and p.digest == pp.digest and p.replica != primary
           and p.replica in qs.replicas and keys.verify(p.replica, prepare_bytes(p), p.sig)}
    return len(who) >= qs.q - 1


def valid_view_change(keys: KeyRing, qs: Quorums, vc: ViewChange, window: int) -> bool:
    """Signature, checkpoint proof and every prepared certificate of a view-change message."""
    if vc.replica not in qs.replicas or not keys.verify(vc.replica, view_change_bytes(vc), vc.sig):
        return False
    if valid_checkpoint_proof(keys, qs, vc.stable_seq, vc.checkpoints) is None:
        return False
    seen: set[int] = set()
    for proof in vc.prepared:
        pp = proof.pre_prepare
        if pp.view >= vc.view or not vc.stable_seq < pp.seq <= vc.stable_seq + window or pp.seq in seen:
            return False
        seen.add(pp.seq)
        if not valid_prepared(keys, qs, proof):
            return False
    return True


def compute_new_view(view: int, vcs: list[ViewChange]) -> tuple[int, list[tuple[int, bytes, list[Request]]]]:
    """(min_s, [(seq, digest, batch)]) the new primary must re-issue: the highest-view prepared batch
    for every sequence between the latest stable checkpoint and the highest prepared one, a null
    batch where none prepared."""
    min_s = max((vc.stable_seq for vc in vcs), default=0)
    best: dict[int, PrePrepare] = {}
    for vc in vcs:
        for proof in vc.prepared:
            pp = proof.pre_prepare
            if pp.seq > min_s and (pp.seq not in best or pp.view > best[pp.seq].view):
                best[pp.seq] = pp
    max_s = max(best, default=min_s)
    out: list[tuple[int, bytes, list[Request]]] = []
    for seq in range(min_s + 1, max_s + 1):
        found = best.get(seq)
        out.append((seq, found.digest, found.batch) if found else (seq, NULL_DIGEST, []))
    return min_s, out
