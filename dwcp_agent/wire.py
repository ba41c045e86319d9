"""DWCP wire protocol v3: frame header, control messages, and the authenticated handshake.

Every byte on a DWCP connection belongs to a frame: a fixed 56-byte header followed by
`encoded_length` payload bytes. The header layout never changes between protocol versions, so
a peer can always read a HELLO and refuse a version it does not speak with a clear reason.
Control payloads are msgspec structs over msgpack. See docs/wire-protocol.md.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated, Any

import msgspec
import xxhash

MAGIC = 0x33435744  # b"DWC3" little-endian
PROTOCOL_VERSION = 3
SUPPORTED_VERSIONS = (3,)
MAX_CONTROL_PAYLOAD = 64 * 1024 * 1024
# Before the peer has proven its key, a control frame is at most this (Hello, Challenge, Auth are < 1 KiB).
MAX_HANDSHAKE_PAYLOAD = 4 * 1024
NONCE_BYTES = 32

# magic, version, type, flags, codec, session, stream, reserved, sequence, offset,
# raw_len, encoded_len, checksum, header_crc
_HEADER = struct.Struct("<IBBBBQHHQQIIQI")
HEADER_SIZE = _HEADER.size
_CRC_SPAN = HEADER_SIZE - 4


class FrameType(IntEnum):
    """What a frame carries."""

    CONTROL = 1
    DATA = 2
    ACK = 3  # header only: the receiver has written every frame up to `sequence` on this stream


class WireError(Exception):
    """A peer broke the protocol; `error_type` is the metric label for it."""

    error_type = "protocol"

    def __init__(self, message: str, error_type: str | None = None) -> None:
        super().__init__(message)
        if error_type:
            self.error_type = error_type


class FrameError(WireError):
    """A frame failed a magic, length, CRC or checksum check: the stream carrying it is closed."""

    error_type = "bad_frame"


class HandshakeError(WireError):
    """The peer was refused, or refused us: version, key or role mismatch."""

    error_type = "handshake"


class PeerClosed(WireError):
    """The connection ended between or inside frames."""

    error_type = "disconnected"


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """Decoded fixed header of one frame."""

    version: int
    type: int
    flags: int
    codec: int
    session: int
    stream: int
    sequence: int
    offset: int
    raw_len: int
    encoded_len: int
    checksum: int

    def pack(self) -> bytes:
        return pack_header(self.type, self.flags, self.codec, self.session, self.stream, self.sequence,
                           self.offset, self.raw_len, self.encoded_len, self.checksum, self.version)


def pack_header(ftype: int, flags: int, codec: int, session: int, stream: int, sequence: int, offset: int,
                raw_len: int, encoded_len: int, checksum: int, version: int = PROTOCOL_VERSION) -> bytes:
    """Header bytes with the CRC over everything before it."""
    body = _HEADER.pack(MAGIC, version, ftype, flags, codec, session, stream, 0, sequence, offset,
                        raw_len, encoded_len, checksum, 0)[:_CRC_SPAN]
    return body + struct.pack("<I", zlib.crc32(body))


def unpack_header(data: bytes | bytearray | memoryview) -> FrameHeader:
    """Parse and check a header; any inconsistency is a FrameError, never a guess."""
    if len(data) != HEADER_SIZE:
        raise FrameError(f"header is {len(data)} bytes, expected {HEADER_SIZE}", "bad_header")
    (magic, version, ftype, flags, codec, session, stream, reserved, sequence, offset, raw_len,
     encoded_len, checksum, crc) = _HEADER.unpack(data)
    if magic != MAGIC:
        raise FrameError(f"bad magic 0x{magic:08x}: not a DWCP peer or a corrupted stream", "bad_header")
    if zlib.crc32(bytes(data[:_CRC_SPAN])) != crc:
        raise FrameError("header CRC mismatch", "bad_header")
    if ftype not in (FrameType.CONTROL, FrameType.DATA, FrameType.ACK) or reserved:
        raise FrameError(f"unknown frame type {ftype}", "bad_header")
    return FrameHeader(version, ftype, flags, codec, session, stream, sequence, offset, raw_len,
                       encoded_len, checksum)


# ---------------------------------------------------------------------------------------------
# Control messages

# Pre-auth bounds on decoded sizes: a handshake message cannot decode into more than a few KiB.
_Versions = Annotated[list[int], msgspec.Meta(max_length=8)]
_NodeId = Annotated[str, msgspec.Meta(max_length=256)]
_Nonce = Annotated[bytes, msgspec.Meta(max_length=64)]
_Caps = Annotated[list[Annotated[str, msgspec.Meta(max_length=64)]], msgspec.Meta(max_length=16)]
_Trace = Annotated[dict[Annotated[str, msgspec.Meta(max_length=64)], Annotated[str, msgspec.Meta(max_length=512)]],
                   msgspec.Meta(max_length=8)]


class Hello(msgspec.Struct, tag="hello"):
    versions: _Versions
    node_id: _NodeId
    nonce: _Nonce
    # "control" | "data" | "live" (a live-migration tunnel, dwcp_agent/live)
    role: Annotated[str, msgspec.Meta(max_length=16)]
    session: int = 0
    stream: int = 0
    trace: _Trace = {}
    capabilities: _Caps = []


class Challenge(msgspec.Struct, tag="challenge"):
    version: int
    node_id: _NodeId
    nonce: _Nonce
    mac: _Nonce
    capabilities: _Caps = []


class Auth(msgspec.Struct, tag="auth"):
    mac: _Nonce


class Welcome(msgspec.Struct, tag="welcome"):
    session: int


class Refuse(msgspec.Struct, tag="refuse"):
    reason: str
    error_type: str = "refused"


class ActiveProbe(msgspec.Struct, tag="probe"):
    """Before Start: both ends hand the control connection to pba.active for one short probe."""

    pings: int = 5
    burst_bytes: int = 2 * 1024 * 1024


class Start(msgspec.Struct, tag="start"):
    migration_id: str
    vm_id: str
    dest_path: str
    size: int
    chunk_size: int
    streams: int
    protocol: str = "v3"
    # Bytes the source will write (its data chunks; holes are never sent) and where, so the
    # destination checks and reserves that rather than `size`. -1: no hole map, all of `size`.
    data_bytes: int = -1
    data_ranges: list[tuple[int, int]] = []


class Ready(msgspec.Struct, tag="ready"):
    session: int
    have: bytes = b""  # packed little-endian (chunk index u64, checksum u64) pairs already durable
    baseline_have: bytes = b""  # HDE have-list of the destination's earlier image (hde.baseline)


class Commit(msgspec.Struct, tag="commit"):
    digest: bytes


class Committed(msgspec.Struct, tag="committed"):
    digest: bytes
    path: str


class Abort(msgspec.Struct, tag="abort"):
    reason: str


class Failed(msgspec.Struct, tag="failed"):
    reason: str
    error_type: str


class RdmaConnect(msgspec.Struct, tag="rdma_connect"):
    """Source -> destination on a data connection both sides marked "rdma": our RC QP, the ring we ask for."""

    qp_num: int
    gid: bytes
    lid: int
    psn: int
    mtu: int
    slot_size: int
    slots: int


class RdmaAccept(msgspec.Struct, tag="rdma_accept"):
    """Destination -> source: its QP (already RTR) and the registered slot ring to write into."""

    qp_num: int
    gid: bytes
    lid: int
    psn: int
    mtu: int
    addr: int
    rkey: int
    slot_size: int
    slots: int


class RdmaDecline(msgspec.Struct, tag="rdma_decline"):
    """Either side, instead of Connect/Accept: this stream stays on TCP, and why."""

    reason: str


class RdmaFailed(msgspec.Struct, tag="rdma_failed"):
    """Destination -> source on an RDMA stream's connection: the RDMA path broke (slot overrun, QP error)."""

    reason: str
    error_type: str


Message = (Hello | Challenge | Auth | Welcome | Refuse | ActiveProbe | Start | Ready | Commit | Committed
           | Abort | Failed | RdmaConnect | RdmaAccept | RdmaDecline | RdmaFailed)
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode_message(msg: Any) -> bytes:
    """Frame bytes (header + msgpack payload) for one control message."""
    payload = _encoder.encode(msg)
    header = pack_header(FrameType.CONTROL, 0, 0, 0, 0, 0, 0, len(payload), len(payload),
                         xxhash.xxh3_64_intdigest(payload))
    return header + payload


def decode_message(header: FrameHeader, payload: bytes) -> Any:
    """Check and decode a control frame's payload."""
    if header.type != FrameType.CONTROL:
        raise FrameError(f"expected a control frame, got type {header.type}", "unexpected_frame")
    if xxhash.xxh3_64_intdigest(payload) != header.checksum:
        raise FrameError("control payload checksum mismatch", "checksum")
    try:
        return _decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise FrameError(f"malformed control message: {str(exc)[:200]}", "malformed") from exc


# ---------------------------------------------------------------------------------------------
# Blocking socket helpers (the data path runs on threads; sockets release the GIL)

def recv_exact_into(sock: socket.socket, buf: memoryview) -> None:
    """Fill `buf` completely or raise PeerClosed."""
    got = 0
    n = len(buf)
    while got < n:
        k = sock.recv_into(buf[got:], n - got)
        if k == 0:
            raise PeerClosed("peer closed the connection" + (" mid-frame" if got else ""))
        got += k


def recv_header(sock: socket.socket, buf: bytearray | None = None) -> FrameHeader:
    raw = buf if buf is not None else bytearray(HEADER_SIZE)
    recv_exact_into(sock, memoryview(raw))
    return unpack_header(raw)


def send_message(sock: socket.socket, msg: Any) -> None:
    sock.sendall(encode_message(msg))


def recv_message(sock: socket.socket, expect: type | tuple[type, ...] | None = None,
                 limit: int = MAX_CONTROL_PAYLOAD) -> Any:
    """Receive one control message of at most `limit` payload bytes (checked before allocating);
    a Refuse/Failed from the peer becomes a WireError here."""
    header = recv_header(sock)
    if header.encoded_len > limit:
        raise FrameError(f"control payload of {header.encoded_len} bytes is over the limit", "bad_length")
    payload = bytearray(header.encoded_len)
    recv_exact_into(sock, memoryview(payload))
    msg = decode_message(header, bytes(payload))
    if isinstance(msg, Refuse):
        raise HandshakeError(f"peer refused: {_short(msg.reason, 400)}", _short(msg.error_type, 32))
    if isinstance(msg, Failed):
        raise WireError(f"peer failed: {_short(msg.reason, 400)}", _short(msg.error_type, 32))
    if expect is not None and not isinstance(msg, expect):
        raise WireError(f"expected {expect}, got {type(msg).__name__}", "unexpected_message")
    return msg


# ---------------------------------------------------------------------------------------------
# Handshake: version negotiation and mutual HMAC challenge-response (the key never travels)

def _short(text: str, limit: int = 64) -> str:
    """A peer-supplied string fit for an error message or log line (printable, bounded)."""
    cut = "".join(ch if ch.isprintable() else "?" for ch in text[:limit])
    return cut + ("..." if len(text) > limit else "")


def _mac(key: bytes, label: bytes, *parts: bytes) -> bytes:
    h = hmac.new(key, label, hashlib.sha256)
    for part in parts:
        h.update(len(part).to_bytes(4, "little"))
        h.update(part)
    return h.digest()


@dataclass(frozen=True)
class PeerInfo:
    """What the handshake established about the other side."""

    node_id: str
    version: int
    role: str
    session: int
    stream: int
    trace: dict[str, str]
    capabilities: tuple[str, ...]


def client_handshake(sock: socket.socket, key: bytes, node_id: str, role: str, session: int = 0,
                     stream: int = 0, trace: dict[str, str] | None = None,
                     versions: tuple[int, ...] = SUPPORTED_VERSIONS,
                     capabilities: tuple[str, ...] = (), expect_peer: str = "") -> PeerInfo:
    """Authenticate the server and ourselves; returns the negotiated peer info.

    `expect_peer` is the node name the channel proved (the server's TLS certificate): a server
    claiming another name is refused, so a reflected or relayed connection cannot pass."""
    nonce = os.urandom(NONCE_BYTES)
    send_message(sock, Hello(list(versions), node_id, nonce, role, session, stream, trace or {},
                             list(capabilities)))
    challenge = recv_message(sock, Challenge, MAX_HANDSHAKE_PAYLOAD)
    if expect_peer and challenge.node_id != expect_peer:
        send_message(sock, Refuse("node id does not match the certificate", "identity"))
        raise HandshakeError(f"server claims node {_short(challenge.node_id)!r} but its certificate names "
                             f"{_short(expect_peer)!r}", "identity")
    if challenge.version not in versions:
        raise HandshakeError(f"server chose protocol version {challenge.version}, we offered {list(versions)}",
                             "version")
    expected = _mac(key, b"dwcp-server", nonce, challenge.nonce, bytes([challenge.version]))
    if not hmac.compare_digest(expected, challenge.mac):
        send_message(sock, Refuse("server failed authentication (pre-shared keys differ)", "auth"))
        raise HandshakeError(f"peer {_short(challenge.node_id)} failed authentication: pre-shared keys differ",
                             "auth")
    send_message(sock, Auth(_mac(key, b"dwcp-client", challenge.nonce, nonce, bytes([challenge.version]))))
    welcome = recv_message(sock, Welcome, MAX_HANDSHAKE_PAYLOAD)
    return PeerInfo(challenge.node_id, challenge.version, role, welcome.session, stream, {},
                    tuple(challenge.capabilities))


def server_handshake(sock: socket.socket, key: bytes, node_id: str,
                     versions: tuple[int, ...] = SUPPORTED_VERSIONS,
                     capabilities: tuple[str, ...] = (), expect_peer: str = "") -> PeerInfo:
    """Answer a HELLO: pick a version, prove our key, check theirs. Refusals tell the peer why.

    Every message before the peer's proof is at most MAX_HANDSHAKE_PAYLOAD bytes; `expect_peer`
    is the node name the peer's TLS certificate proved, which its Hello must claim."""
    hello = recv_message(sock, Hello, MAX_HANDSHAKE_PAYLOAD)
    peer_name = _short(hello.node_id)
    if expect_peer and hello.node_id != expect_peer:
        send_message(sock, Refuse("node id does not match the certificate", "identity"))
        raise HandshakeError(f"refused {peer_name!r}: its certificate names {_short(expect_peer)!r}", "identity")
    common = sorted(set(hello.versions) & set(versions))
    if not common:
        reason = (f"unsupported protocol version(s) {hello.versions}; this agent speaks "
                  f"{', '.join(map(str, versions))}")
        send_message(sock, Refuse(reason, "version"))
        raise HandshakeError(f"refused {peer_name}: {reason}", "version")
    if hello.role not in ("control", "data", "live") or len(hello.nonce) != NONCE_BYTES:
        send_message(sock, Refuse(f"bad hello (role {_short(hello.role, 16)!r})", "malformed"))
        raise HandshakeError(f"refused {peer_name}: bad hello", "malformed")
    version = common[-1]
    nonce = os.urandom(NONCE_BYTES)
    send_message(sock, Challenge(version, node_id, nonce,
                                 _mac(key, b"dwcp-server", hello.nonce, nonce, bytes([version])),
                                 list(capabilities)))
    auth = recv_message(sock, Auth, MAX_HANDSHAKE_PAYLOAD)
    expected = _mac(key, b"dwcp-client", nonce, hello.nonce, bytes([version]))
    if not hmac.compare_digest(expected, auth.mac):
        send_message(sock, Refuse("authentication failed: pre-shared keys differ", "auth"))
        raise HandshakeError(f"refused {peer_name}: authentication failed (pre-shared keys differ)", "auth")
    send_message(sock, Welcome(hello.session))
    return PeerInfo(hello.node_id, version, hello.role, hello.session, hello.stream, dict(hello.trace),
                    tuple(hello.capabilities))
