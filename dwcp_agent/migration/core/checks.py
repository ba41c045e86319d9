"""Header checks every DATA frame passes, whichever object kind it belongs to."""

from __future__ import annotations

from typing import Protocol

from dwcp_agent.hde.layout import max_encoded_len
from dwcp_agent.migration.core.actions import FrameFault
from dwcp_agent.migration.core.kinds import ErrorKind

__all__ = ["ACK", "DATA", "Header", "check_frame", "max_encoded_len"]

DATA = 2  # wire.FrameType.DATA (the core does not import the socket layer)
ACK = 3   # wire.FrameType.ACK


class Header(Protocol):
    """The fields of a frame header the cores read (wire.FrameHeader has them)."""

    @property
    def version(self) -> int: ...
    @property
    def type(self) -> int: ...
    @property
    def flags(self) -> int: ...
    @property
    def codec(self) -> int: ...
    @property
    def session(self) -> int: ...
    @property
    def stream(self) -> int: ...
    @property
    def sequence(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def raw_len(self) -> int: ...
    @property
    def encoded_len(self) -> int: ...
    @property
    def checksum(self) -> int: ...


def check_frame(h: Header, session: int, stream: int, version: int, expected_seq: int,
                ftype: int = DATA) -> None:
    """Version, type, session, stream and per-stream sequence: a frame lost, repeated or reordered
    on a connection shows up here as a sequence error and closes that stream."""
    if h.version != version:
        raise FrameFault(f"frame version {h.version}, stream negotiated {version}", ErrorKind.VERSION)
    if h.type != ftype:
        raise FrameFault(f"unexpected frame type {h.type} on a data stream", ErrorKind.UNEXPECTED_FRAME)
    if h.session != session or h.stream != stream:
        raise FrameFault("frame for another session or stream", ErrorKind.BAD_HEADER)
    if h.sequence != expected_seq:
        raise FrameFault(f"sequence {h.sequence}, expected {expected_seq}", ErrorKind.SEQUENCE)
    if h.encoded_len > max_encoded_len(h.raw_len):
        raise FrameFault(f"payload of {h.encoded_len} bytes exceeds the bound for {h.raw_len}",
                         ErrorKind.BAD_LENGTH)
