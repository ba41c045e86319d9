"""Frame header and handshake: every field round-trips, every inconsistency is refused."""

from __future__ import annotations

import socket
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dwcp_agent import wire

U8 = st.integers(0, 255)
U16 = st.integers(0, 2**16 - 1)
U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)


@given(st.sampled_from(list(wire.FrameType)), U8, U8, U64, U16, U64, U64, U32, U32, U64)
def test_header_round_trips(ftype: int, flags: int, codec: int, session: int, stream: int, seq: int, offset: int,
                            raw: int, enc: int, checksum: int) -> None:
    packed = wire.pack_header(ftype, flags, codec, session, stream, seq, offset, raw, enc, checksum)
    assert len(packed) == wire.HEADER_SIZE
    h = wire.unpack_header(packed)
    assert (h.type, h.flags, h.codec, h.session, h.stream, h.sequence, h.offset, h.raw_len, h.encoded_len,
            h.checksum, h.version) == (ftype, flags, codec, session, stream, seq, offset, raw, enc, checksum, 3)
    assert h.pack() == packed


@given(st.integers(0, wire.HEADER_SIZE - 1), st.integers(1, 255))
def test_any_flipped_header_byte_is_refused(position: int, xor: int) -> None:
    packed = bytearray(wire.pack_header(wire.FrameType.DATA, 0, 1, 7, 2, 3, 4096, 4096, 100, 99))
    packed[position] ^= xor
    with pytest.raises(wire.FrameError) as err:
        wire.unpack_header(bytes(packed))
    assert err.value.error_type == "bad_header"


def _pair(server_key: bytes, client_key: bytes, client_versions: tuple[int, ...] = (3,)) -> tuple[object, object]:
    a, b = socket.socketpair()
    result: dict[str, object] = {}

    def serve() -> None:
        try:
            result["server"] = wire.server_handshake(a, server_key, "dst")
        except wire.WireError as exc:
            result["server"] = exc

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        client: object = wire.client_handshake(b, client_key, "src", "control", versions=client_versions,
                                               trace={"traceparent": "x"})
    except wire.WireError as exc:
        client = exc
    t.join(5)
    a.close()
    b.close()
    return client, result["server"]


def test_handshake_authenticates_both_sides_and_carries_trace() -> None:
    client, server = _pair(b"k" * 32, b"k" * 32)
    assert isinstance(client, wire.PeerInfo) and client.node_id == "dst" and client.version == 3
    assert isinstance(server, wire.PeerInfo) and server.node_id == "src" and server.trace == {"traceparent": "x"}


def test_wrong_key_fails_on_both_sides() -> None:
    client, server = _pair(b"k" * 32, b"x" * 32)
    assert isinstance(client, wire.HandshakeError) and client.error_type == "auth"
    assert isinstance(server, wire.HandshakeError) and server.error_type == "auth"


def test_unknown_version_is_refused_with_the_supported_list() -> None:
    client, server = _pair(b"k" * 32, b"k" * 32, client_versions=(1, 2))
    assert isinstance(client, wire.HandshakeError) and "speaks 3" in str(client)
    assert isinstance(server, wire.HandshakeError) and server.error_type == "version"


def test_control_payload_checksum_and_garbage_are_refused() -> None:
    frame = bytearray(wire.encode_message(wire.Abort("stop")))
    header = wire.unpack_header(bytes(frame[: wire.HEADER_SIZE]))
    with pytest.raises(wire.FrameError, match="checksum"):
        wire.decode_message(header, bytes(frame[wire.HEADER_SIZE:-1]) + b"X")
    garbage = b"\xc1\xc1\xc1"
    bad = wire.unpack_header(wire.pack_header(wire.FrameType.CONTROL, 0, 0, 0, 0, 0, 0, 3, 3,
                                              __import__("xxhash").xxh3_64_intdigest(garbage)))
    with pytest.raises(wire.FrameError, match="malformed"):
        wire.decode_message(bad, garbage)
