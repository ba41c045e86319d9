"""Typed wire messages of ACP: Raft, PBFT and the envelope that carries them between agents.

Every message is a msgspec struct encoded as msgpack arrays (`array_like`), so a frame costs a few
bytes of framing and decoding a malformed frame fails with a precise error instead of a half-built
object.
"""

from __future__ import annotations

from enum import IntEnum

import msgspec

__all__ = [
    "ENTRY_CONF",
    "ENTRY_NOOP",
    "ENTRY_NORMAL",
    "Checkpoint",
    "Commit",
    "ConfChange",
    "Entry",
    "Envelope",
    "EpochFetch",
    "EpochState",
    "HardState",
    "NewView",
    "PbftMessage",
    "PbftWire",
    "PrePrepare",
    "Prepare",
    "PreparedProof",
    "Proposal",
    "RaftMsg",
    "RaftType",
    "Reply",
    "Request",
    "RequestFwd",
    "Snapshot",
    "StateFetch",
    "StateReply",
    "ViewChange",
    "decode_envelope",
    "decode_pbft",
    "encode",
]

ENTRY_NORMAL = 0
ENTRY_CONF = 1
ENTRY_NOOP = 2


class Entry(msgspec.Struct, array_like=True, frozen=True):
    """One Raft log entry; `data` is an encoded registry command (or a ConfChange)."""

    term: int
    index: int
    kind: int = ENTRY_NORMAL
    data: bytes = b""


class HardState(msgspec.Struct, array_like=True, frozen=True):
    """What Raft must persist before it answers anyone: term, vote and commit index."""

    term: int = 0
    vote: str = ""
    commit: int = 0


class Snapshot(msgspec.Struct, array_like=True, frozen=True):
    """State machine image at `index`; `voters` is the membership that was in force there."""

    index: int = 0
    term: int = 0
    voters: list[str] = []
    data: bytes = b""
    learners: list[str] = []


class ConfChange(msgspec.Struct, array_like=True, frozen=True):
    """Single-server membership change; `public_key` is the member's Ed25519 key, pinned on append."""

    op: str  # "learner" (non-voting, catching up) | "add" (voter) | "remove"
    node_id: str
    addr: str = ""
    public_key: bytes = b""


class RaftType(IntEnum):
    """Raft message kinds, as in etcd's raftpb."""

    APP = 1
    APP_RESP = 2
    VOTE = 3
    VOTE_RESP = 4
    PREVOTE = 5
    PREVOTE_RESP = 6
    HEARTBEAT = 7
    HEARTBEAT_RESP = 8
    SNAP = 9
    READ_INDEX = 10
    READ_INDEX_RESP = 11
    TIMEOUT_NOW = 12


class RaftMsg(msgspec.Struct, array_like=True, tag="r"):
    """One Raft message; unused fields keep their defaults (as etcd's raftpb.Message)."""

    kind: int
    frm: str
    to: str
    term: int
    log_term: int = 0
    index: int = 0
    entries: list[Entry] = []
    commit: int = 0
    reject: bool = False
    hint: int = 0
    ctx: int = 0
    snapshot: Snapshot | None = None


# ---------------------------------------------------------------- PBFT


class Request(msgspec.Struct, array_like=True, frozen=True):
    """A client request: `client` orders its own requests by `ts` (the PBFT timestamp)."""

    client: str
    ts: int
    op: bytes
    sig: bytes = b""


class PrePrepare(msgspec.Struct, array_like=True, tag="pp"):
    """Primary assigns `seq` to a batch in `view`; `sig` is the primary's over (view, seq, digest)."""

    view: int
    seq: int
    digest: bytes
    batch: list[Request]
    sig: bytes = b""


class Prepare(msgspec.Struct, array_like=True, tag="p"):
    """Replica agrees with the primary's assignment; carries the primary's header signature as proof."""

    view: int
    seq: int
    digest: bytes
    replica: str
    pp_sig: bytes = b""
    sig: bytes = b""


class Commit(msgspec.Struct, array_like=True, tag="c"):
    """Replica has a prepared certificate for (view, seq, digest)."""

    view: int
    seq: int
    digest: bytes
    replica: str


class Checkpoint(msgspec.Struct, array_like=True, tag="ck"):
    """State digest after executing `seq`, signed so that 2f+1 of them form a transferable proof."""

    seq: int
    state: bytes
    replica: str
    sig: bytes = b""


class PreparedProof(msgspec.Struct, array_like=True):
    """A prepared certificate: the signed pre-prepare and matching signed prepares."""

    pre_prepare: PrePrepare
    prepares: list[Prepare]


class ViewChange(msgspec.Struct, array_like=True, tag="vc"):
    """Replica asks to move to `view`; proofs let the new primary rebuild what may have committed."""

    view: int
    stable_seq: int
    checkpoints: list[Checkpoint]
    prepared: list[PreparedProof]
    replica: str
    sig: bytes = b""


class NewView(msgspec.Struct, array_like=True, tag="nv"):
    """New primary's proof (the view changes) and the pre-prepares it re-issues for `view`."""

    view: int
    view_changes: list[ViewChange]
    pre_prepares: list[PrePrepare]
    sig: bytes = b""


class StateFetch(msgspec.Struct, array_like=True, tag="sf"):
    """A lagging replica asks for the state at a stable checkpoint."""

    seq: int
    replica: str


class StateReply(msgspec.Struct, array_like=True, tag="sr"):
    """State image at `seq`, checked by the receiver against a stable checkpoint certificate."""

    seq: int
    data: bytes
    replica: str


class RequestFwd(msgspec.Struct, array_like=True, tag="rq"):
    """Client request forwarded to (or broadcast among) replicas."""

    request: Request


class Reply(msgspec.Struct, array_like=True, tag="rp"):
    """Results of the requests executed at `seq`, sent to the node whose clients issued them: that
    node answers a client only when f+1 replicas report the same encoded result."""

    seq: int
    results: list[tuple[str, int, bytes]]  # (client, ts, msgpack of the registry Result)
    replica: str


PbftMessage = (PrePrepare | Prepare | Commit | Checkpoint | ViewChange | NewView | StateFetch | StateReply
               | RequestFwd | Reply)


class PbftWire(msgspec.Struct, array_like=True, tag="pw"):
    """A PBFT message with the HMAC authenticator for the pair (sender, receiver) over nonce + body.

    `nonce` grows per sender (incarnation in the high bits), so a replayed frame is recognised.
    """

    nonce: int
    body: bytes
    mac: bytes


# ---------------------------------------------------------------- epochs


class EpochFetch(msgspec.Struct, array_like=True, tag="ef"):
    """Sent by a replica that sees traffic of an epoch it has not reached yet."""

    epoch: int


class EpochState(msgspec.Struct, array_like=True, tag="es"):
    """Registry image at the switch that opened `epoch` and the protocol of that epoch."""

    epoch: int
    protocol: str
    data: bytes


class Proposal(msgspec.Struct, array_like=True, tag="pr"):
    """A command (or membership change, kind=1) forwarded by a Raft follower to its leader."""

    data: bytes
    kind: int = ENTRY_NORMAL


class Envelope(msgspec.Struct, array_like=True):
    """Unit of the ACP transport: which epoch (protocol instance) the body belongs to."""

    epoch: int
    frm: str
    to: str
    body: RaftMsg | PbftWire | EpochFetch | EpochState | Proposal


_ENCODER = msgspec.msgpack.Encoder()
_ENV_DECODER = msgspec.msgpack.Decoder(Envelope)
_PBFT_DECODER: msgspec.msgpack.Decoder[PbftMessage] = msgspec.msgpack.Decoder(PbftMessage)


def encode(obj: object) -> bytes:
    """msgpack bytes of any ACP struct."""
    return _ENCODER.encode(obj)


def decode_envelope(data: bytes) -> Envelope:
    """Parse one transport frame; raises msgspec.DecodeError / ValidationError on malformed input."""
    return _ENV_DECODER.decode(data)


def decode_pbft(data: bytes) -> PbftMessage:
    """Parse the authenticated body of a PbftWire."""
    return _PBFT_DECODER.decode(data)
