"""Migration states and error kinds, and the one rule that says which errors another attempt can fix."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["TERMINAL_STATES", "ErrorKind", "MigrationState", "is_retryable"]


class MigrationState(StrEnum):
    """Where one migration stands, as the API, the metrics and the logs name it."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


TERMINAL_STATES = frozenset({MigrationState.COMPLETED, MigrationState.FAILED, MigrationState.CANCELLED,
                             MigrationState.INTERRUPTED})


class ErrorKind(StrEnum):
    """Why a migration, a stream or a frame failed; the value is the metric label.

    Peers send kinds as strings, so code that receives one keeps the string; the enum names the
    kinds this agent raises itself.
    """

    # Refusals and local faults no retry can fix.
    VERSION = "version"
    AUTH = "auth"
    FORBIDDEN = "forbidden"
    BAD_REQUEST = "bad_request"
    UNWRITABLE = "unwritable"
    NO_SPACE = "no_space"
    BUSY = "busy"
    RDMA_UNAVAILABLE = "rdma_unavailable"
    IO = "io"
    MALFORMED = "malformed"
    SOURCE = "source"
    CONFIG = "config"
    DIGEST_MISMATCH = "digest_mismatch"
    CANCELLED = "cancelled"
    DONE = "done"
    OWNERSHIP = "ownership"
    STREAM_ENDED = "stream_ended"  # a byte stream cannot resume once its session is over
    # Path faults: the next attempt resumes from the destination's journal.
    CONNECT = "connect"
    DISCONNECTED = "disconnected"
    STREAMS = "streams"
    PROBE = "probe"
    RDMA = "rdma"
    INCOMPLETE = "incomplete"
    # Frame faults: the stream that carried the frame is closed, the others go on.
    BAD_HEADER = "bad_header"
    BAD_LENGTH = "bad_length"
    BAD_OFFSET = "bad_offset"
    SEQUENCE = "sequence"
    CHECKSUM = "checksum"
    DECODE = "decode"
    UNEXPECTED_FRAME = "unexpected_frame"
    REORDER_OVERFLOW = "reorder_overflow"
    # Channel security (security/channels.py, sealed.py)
    IDENTITY = "identity"  # the peer's certificate names another node, or it is this node itself
    TLS = "tls"  # certificate not trusted, or the peer does not speak TLS (not a DWCP agent)
    TAG = "tag"  # a sealed frame failed its AES-GCM check


_FATAL = frozenset({
    ErrorKind.VERSION, ErrorKind.AUTH, ErrorKind.FORBIDDEN, ErrorKind.BAD_REQUEST, ErrorKind.UNWRITABLE,
    ErrorKind.NO_SPACE, ErrorKind.BUSY, ErrorKind.RDMA_UNAVAILABLE, ErrorKind.IO, ErrorKind.MALFORMED,
    ErrorKind.SOURCE, ErrorKind.CONFIG, ErrorKind.DIGEST_MISMATCH, ErrorKind.CANCELLED, ErrorKind.DONE,
    ErrorKind.OWNERSHIP, ErrorKind.STREAM_ENDED, ErrorKind.IDENTITY, ErrorKind.TLS,
})


def is_retryable(kind: str) -> bool:
    """The one retry rule: a kind is worth another attempt unless it is a refusal or a local fault
    that would happen again (a wrong key, a full disk, a changed source, a digest that differs).
    Kinds a peer invents are treated as path faults: retrying is bounded by `retry_limit`."""
    return kind not in _FATAL
