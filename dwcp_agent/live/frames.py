"""The framing of a live migration's control connection between two agents.

Frames of `type u8 | codec u8 | raw_len u32 | payload_len u32 | payload`; the only type is
`CONTROL` (one msgspec message, messages.py; codec and raw_len are 0). QEMU's stream does not
travel here: it goes over the data connections of the migration core's stream object
(tunnel.py). A frame that does not parse is a `TunnelError`, never a crash.

On a connection that came over TLS both ends pass the FrameKeys of security.sealed.seal_stream:
the header is then sealed alone and a non-empty payload sealed with the plain header as
associated data (as amst/channel.py TcpChannel); a bad tag is a `TunnelError`.
"""

from __future__ import annotations

import asyncio
import struct
from enum import IntEnum

from dwcp_agent import wire
from dwcp_agent.security.sealed import TAG_BYTES, FrameKey

__all__ = ["Frame", "FrameKind", "TunnelError", "read_frame", "write_frame"]

_HEADER = struct.Struct("<BBII")
MAX_PAYLOAD = 16 * 1024 * 1024


class TunnelError(RuntimeError):
    """The tunnel broke or carried something that is not a frame."""


class FrameKind(IntEnum):
    CONTROL = 1


class Frame:
    """One decoded frame header and its payload."""

    __slots__ = ("codec", "kind", "payload", "raw_len")

    def __init__(self, kind: FrameKind, codec: int, raw_len: int, payload: bytes) -> None:
        self.kind = kind
        self.codec = codec
        self.raw_len = raw_len
        self.payload = payload


async def read_frame(reader: asyncio.StreamReader, key: FrameKey | None = None) -> Frame:
    try:
        header = await reader.readexactly(_HEADER.size + (TAG_BYTES if key else 0))
        if key is not None:
            header = _open(key, b"", header)
        kind, codec, raw_len, payload_len = _HEADER.unpack(header)
        if payload_len > MAX_PAYLOAD or raw_len > MAX_PAYLOAD:
            raise TunnelError(f"frame of {payload_len} bytes exceeds {MAX_PAYLOAD}")
        payload = await reader.readexactly(payload_len + (TAG_BYTES if key else 0)) if payload_len else b""
        if key is not None and payload_len:
            payload = _open(key, header, payload)
    except asyncio.IncompleteReadError as exc:
        raise TunnelError("peer agent closed the tunnel") from exc
    except (ConnectionError, OSError) as exc:
        raise TunnelError(f"tunnel connection lost: {exc}") from exc
    try:
        return Frame(FrameKind(kind), codec, raw_len, payload)
    except ValueError as exc:
        raise TunnelError(f"unknown frame type {kind}") from exc


def write_frame(writer: asyncio.StreamWriter, kind: FrameKind, payload: bytes | memoryview = b"",
                codec: int = 0, raw_len: int | None = None, key: FrameKey | None = None) -> None:
    """Queue one frame (sealed with `key`); callers `await writer.drain()`."""
    n = len(payload)
    header = _HEADER.pack(kind, codec, n if raw_len is None else raw_len, n)
    if key is None:
        writer.write(header)
        if n:
            writer.write(payload)
        return
    writer.write(_seal(key, b"", header))
    if n:
        writer.write(_seal(key, header, payload))


def _seal(key: FrameKey, associated: bytes, plain: bytes | memoryview) -> bytes:
    out = bytearray(len(plain) + TAG_BYTES)
    key.seal_into(associated, plain, out)
    return bytes(out)


def _open(key: FrameKey, associated: bytes, sealed: bytes) -> bytes:
    out = bytearray(len(sealed) - TAG_BYTES)
    try:
        key.open_into(associated, sealed, out)
    except wire.FrameError as exc:
        raise TunnelError(f"control frame: {exc}") from exc
    return bytes(out)
