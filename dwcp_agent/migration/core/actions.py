"""What the cores ask their drivers to do: the `Ready` batch of etcd raft, for the data path.

A core never touches a socket, a file or a clock. Each event method records actions; the driver
takes them with `take_ready()` and carries them out in order. Chunks are `OutChunk` /
`InChunk` records: the payload itself stays with the driver (`handle`), the core only reasons
about offsets, lengths, checksums, streams and sequence numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Action",
    "CloseStream",
    "Commit",
    "Deliver",
    "Fail",
    "Finished",
    "FrameFault",
    "InChunk",
    "JournalAdd",
    "JournalReset",
    "OutChunk",
    "Reencode",
    "Release",
    "Rename",
    "Reply",
    "SendAck",
    "VerifyDigest",
]


class FrameFault(Exception):
    """A frame broke the protocol: the stream that carried it is closed; `kind` is the metric label."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(slots=True, eq=False)
class OutChunk:
    """One chunk on the source side: where it sits in the object and what its frame announces."""

    offset: int
    raw_len: int
    checksum: int
    codec: int = 0
    flags: int = 0
    payload_len: int = 0
    handle: object = None   # the driver's buffers (encoded segments, pooled buffer)
    stream: int = -1        # stream carrying it; -1 while queued
    seq: int = -1           # its frame's sequence number on that stream
    acked: bool = False
    index: int = -1         # images: chunk index (the first one of a hole run)
    count: int = 1          # images: chunks this frame settles (a hole run settles several)


@dataclass(slots=True, eq=False)
class InChunk:
    """One verified chunk on the destination side, waiting for its turn (streams)."""

    offset: int
    raw_len: int
    checksum: int
    stream: int
    seq: int
    handle: object = None   # the decoded bytes, owned by the driver
    end: bool = False


@dataclass(frozen=True, slots=True)
class SendAck:
    """Destination: acknowledge the frame `seq` (at `offset`) on `stream`."""

    stream: int
    seq: int
    offset: int
    end: bool = False  # it acknowledges the END frame of a byte stream


@dataclass(frozen=True, slots=True)
class Deliver:
    """Destination (streams): write this chunk's bytes to the output now; they are next in order."""

    chunk: InChunk


@dataclass(frozen=True, slots=True)
class Release:
    """Source: the chunk is acknowledged (or abandoned): its buffer can be reused."""

    chunk: OutChunk


@dataclass(frozen=True, slots=True)
class Reencode:
    """Source (images): a chunk lost with its stream must be encoded again before it is resent,
    since its payload may reference pages the destination has overwritten since."""

    chunk: OutChunk


@dataclass(frozen=True, slots=True)
class CloseStream:
    """Close one stream (a bad frame); the others go on."""

    stream: int
    kind: str
    reason: str


@dataclass(frozen=True, slots=True)
class JournalAdd:
    """Destination (images): chunk `index` is written and verified; record it durably."""

    index: int
    checksum: int


@dataclass(frozen=True, slots=True)
class JournalReset:
    """Destination (images): forget every journal record (the partial is not the source's)."""


@dataclass(frozen=True, slots=True)
class VerifyDigest:
    """Destination (images): compute the object digest of the partial file and report it."""

    expected: bytes


@dataclass(frozen=True, slots=True)
class Rename:
    """Destination (images): make the partial file durable and rename it onto the destination."""


@dataclass(frozen=True, slots=True)
class Reply:
    """Destination (images): a control message for the source: ("committed"|"failed", kind, text)."""

    verdict: str
    kind: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Commit:
    """Source (images): every chunk is acknowledged; ask the destination to commit this digest."""

    digest: bytes


@dataclass(frozen=True, slots=True)
class Finished:
    """The object is complete and its digest verified (both sides)."""

    length: int
    digest: int | bytes


@dataclass(frozen=True, slots=True)
class Fail:
    """The session is over without completing; `kind` follows kinds.ErrorKind."""

    kind: str
    reason: str


Action = (SendAck | Deliver | Release | Reencode | CloseStream | JournalAdd | JournalReset | VerifyDigest
          | Rename | Reply | Commit | Finished | Fail)
