"""The native AES-128-GCM sealing (native/stream.pyx) against the Python reference (sealed.ReferenceFrameKey).

Same key, same frames: the native cipher must produce the reference's bytes, open what the
reference sealed and the other way round, refuse any flipped bit, and never use a nonce twice.
The native send and receive loops must put exactly the reference's frames on the wire.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from dwcp_agent import wire
from dwcp_agent._native import stream
from dwcp_agent.hde.layout import max_encoded_len
from dwcp_agent.migration.digest import chunk_length
from dwcp_agent.security.sealed import TAG_BYTES, FrameKey, ReferenceFrameKey

SESSION, STREAM, VERSION = 0x1234_5678_9ABC, 3, wire.PROTOCOL_VERSION
CHUNK = 1 << 20  # several of the native loop's 256 KiB pieces
SIZE = 3 * CHUNK + 1000  # last chunk is short
Link = tuple[socket.socket, socket.socket, int, Path]  # the `link` fixture of conftest.py
KEY = bytes(range(16))
SEALED_HEADER = wire.HEADER_SIZE + TAG_BYTES


def _header(seq: int, offset: int, data: bytes, **fields: int) -> bytes:
    args = {"ftype": wire.FrameType.DATA, "flags": 0, "codec": 0, "session": SESSION, "stream": STREAM,
            "sequence": seq, "offset": offset, "raw_len": len(data), "encoded_len": len(data),
            "checksum": xxhash.xxh3_64_intdigest(data), "version": VERSION}
    args.update(fields)
    return wire.pack_header(**args)


def _reference_frame(key: ReferenceFrameKey, header: bytes, payload: bytes) -> bytes:
    """A frame as sealed.py defines it: sealed header, then the payload sealed against the header."""
    sealed_header = bytearray(SEALED_HEADER)
    key.seal_into(b"", header, sealed_header)
    if not payload:
        return bytes(sealed_header)
    sealed = bytearray(len(payload) + TAG_BYTES)
    key.seal_into(header, payload, sealed)
    return bytes(sealed_header + sealed)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = sock.recv(n - len(out))
        assert got, "peer closed early"
        out += got
    return bytes(out)


@settings(max_examples=60, deadline=None)
@given(aad=st.binary(max_size=80), payload=st.binary(max_size=3000), native_seals=st.booleans())
def test_a_frame_sealed_by_either_opens_in_the_other_with_the_same_bytes(aad: bytes, payload: bytes,
                                                                          native_seals: bool) -> None:
    reference, native = ReferenceFrameKey(KEY), FrameKey(KEY)
    by_reference, by_native = bytearray(len(payload) + TAG_BYTES), bytearray(len(payload) + TAG_BYTES)
    reference.seal_into(aad, payload, by_reference)
    native.seal_into(aad, payload, by_native)
    assert by_reference == by_native
    opener = ReferenceFrameKey(KEY) if native_seals else FrameKey(KEY)
    out = bytearray(len(payload))
    opener.open_into(aad, by_native if native_seals else by_reference, out)
    assert out == payload


@pytest.mark.parametrize("native_opens", [True, False])
def test_every_flipped_bit_fails_the_tag(native_opens: bool) -> None:
    header, payload = os.urandom(wire.HEADER_SIZE), os.urandom(300)
    sealed = bytearray(len(payload) + TAG_BYTES)
    FrameKey(KEY).seal_into(header, payload, sealed)
    out = bytearray(len(payload))
    for bit in range(0, len(sealed) * 8, 7):  # ciphertext and tag
        altered = bytearray(sealed)
        altered[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(wire.FrameError, match="authentication failed") as info:
            (FrameKey(KEY) if native_opens else ReferenceFrameKey(KEY)).open_into(header, altered, out)
        assert info.value.error_type == "tag"
    for bit in range(0, wire.HEADER_SIZE * 8, 5):  # the associated data (the plaintext header)
        altered_header = bytearray(header)
        altered_header[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(wire.FrameError):
            (FrameKey(KEY) if native_opens else ReferenceFrameKey(KEY)).open_into(bytes(altered_header), sealed, out)
    (FrameKey(KEY) if native_opens else ReferenceFrameKey(KEY)).open_into(header, sealed, out)
    assert out == payload


def test_nonces_never_repeat_so_replays_and_reorders_fail() -> None:
    native = FrameKey(KEY)
    frames = []
    for _ in range(3):
        sealed = bytearray(64 + TAG_BYTES)
        native.seal_into(b"", bytes(64), sealed)  # the same plaintext each time
        frames.append(bytes(sealed))
    assert native.counter == 3
    assert len(set(frames)) == 3  # a new nonce per frame: equal plaintexts never look alike
    opener, out = FrameKey(KEY), bytearray(64)
    opener.open_into(b"", frames[0], out)
    with pytest.raises(wire.FrameError):  # replayed: the receiver's nonce has moved on
        opener.open_into(b"", frames[0], out)
    reordered = FrameKey(KEY)
    with pytest.raises(wire.FrameError):
        reordered.open_into(b"", frames[1], out)
    assert (opener.counter, reordered.counter) == (2, 1)  # a failed open uses its nonce too


def test_bad_buffer_sizes_and_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        stream.FrameCipher(bytes(32))
    cipher = stream.FrameCipher(KEY)
    with pytest.raises(ValueError):
        cipher.seal_into(b"", bytes(10), bytearray(10 + TAG_BYTES - 1))
    with pytest.raises(ValueError):
        cipher.open_into(b"", bytes(TAG_BYTES - 1), bytearray(0))
    assert cipher.counter == 0  # nothing was sealed or opened


@pytest.mark.parametrize("segments", [
    (),                                         # a hole frame: header only, no payload nonce
    (b"x",),
    (os.urandom(3000), b"", os.urandom(5)),    # empty segments are skipped
    tuple(os.urandom(4096) for _ in range(700)),  # several staging buffers, many segments
    (memoryview(os.urandom(3 * CHUNK + 17))[5:],),
])
def test_native_send_puts_the_reference_frames_on_the_wire(segments: tuple[bytes | memoryview, ...]) -> None:
    a, b = socket.socketpair()
    with a, b:
        payload = b"".join(bytes(s) for s in segments)
        header = os.urandom(wire.HEADER_SIZE)
        sender = stream.FrameCipher(KEY)
        staging = bytearray(1 << 16)
        reference = ReferenceFrameKey(KEY)
        expected = _reference_frame(reference, header, payload) + _reference_frame(reference, header, payload)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(_recv_exact(b, len(expected))))
        reader.start()
        for _ in range(2):  # the second frame takes the next nonces
            stream.send_sealed_frame(a.fileno(), sender, header, segments, staging, -1.0)
        reader.join(60)
        assert got == [expected]
        assert sender.counter == (4 if payload else 2)


def test_native_send_times_out_when_the_peer_stops_reading() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(0.2)  # as the sender's io_timeout_s leaves its sockets: non-blocking underneath
        with pytest.raises(TimeoutError):
            stream.send_sealed_frame(a.fileno(), stream.FrameCipher(KEY), bytes(wire.HEADER_SIZE),
                                     (bytes(16 << 20),), bytearray(1 << 20), a.gettimeout() or -1.0)


def test_native_send_to_a_shut_down_stream_raises_oserror() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.shutdown(socket.SHUT_RDWR)
        with pytest.raises(OSError):
            stream.send_sealed_frame(a.fileno(), stream.FrameCipher(KEY), bytes(wire.HEADER_SIZE),
                                     (b"payload",), bytearray(1 << 16), -1.0)


# -- the native receive loop on a sealed stream ------------------------------------------------


def _sealed_receiver(sock: socket.socket, fd: int) -> tuple[stream.RawFrameReceiver, bytearray, FrameKey]:
    """A receiver whose frames come from the source's key KEY, and whose ACKs go out under KEY[::-1]."""
    header = bytearray(wire.HEADER_SIZE)
    recv_key, send_key = FrameKey(KEY), FrameKey(KEY[::-1])
    rx = stream.RawFrameReceiver(sock.fileno(), fd, header, bytearray(max_encoded_len(CHUNK)), SESSION, STREAM,
                                 VERSION, SIZE, CHUNK, recv_key=recv_key.cipher, send_key=send_key.cipher)
    return rx, header, recv_key


def _send_in_background(sock: socket.socket, data: bytes) -> threading.Thread:
    def send() -> None:
        with contextlib.suppress(OSError):  # the receiver may close first (a refused frame)
            sock.sendall(data)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_sealed_frames_from_the_reference_are_opened_verified_written_and_acked(link: Link) -> None:
    sender, receiver, fd, path = link
    rx, _, _ = _sealed_receiver(receiver, fd)
    source_key = ReferenceFrameKey(KEY)
    chunks = [os.urandom(chunk_length(i, SIZE, CHUNK)) for i in range(4)]
    wire_bytes = b"".join(_reference_frame(source_key, _header(seq, seq * CHUNK, data), data)
                          for seq, data in enumerate(chunks))
    feeder = _send_in_background(sender, wire_bytes)
    for seq, data in enumerate(chunks):
        assert rx.next_frame(ack_last=seq > 0) == stream.WRITTEN
        assert (rx.sequence, rx.offset, rx.raw_len) == (seq, seq * CHUNK, len(data))
    feeder.join(60)
    sender.shutdown(socket.SHUT_WR)
    assert rx.next_frame(ack_last=True) == stream.CLOSED and not rx.partial
    assert path.read_bytes() == b"".join(chunks)
    ack_key = ReferenceFrameKey(KEY[::-1])
    acks = _recv_exact(sender, 4 * SEALED_HEADER)
    for seq in range(4):
        ack = bytearray(wire.HEADER_SIZE)
        ack_key.open_into(b"", acks[seq * SEALED_HEADER:(seq + 1) * SEALED_HEADER], ack)
        assert bytes(ack) == wire.pack_header(wire.FrameType.ACK, 0, 0, SESSION, STREAM, seq, seq * CHUNK, 0, 0, 0,
                                              VERSION)


@pytest.mark.parametrize("where", ["header", "payload_first_piece", "payload_last_piece", "tag"])
def test_a_flipped_bit_on_the_wire_is_a_tag_failure_and_nothing_is_written(link: Link, where: str) -> None:
    sender, receiver, fd, path = link
    rx, _, _ = _sealed_receiver(receiver, fd)
    data = os.urandom(CHUNK)
    frame = bytearray(_reference_frame(ReferenceFrameKey(KEY), _header(0, 0, data), data))
    position = {"header": 20, "payload_first_piece": SEALED_HEADER + 100,
                "payload_last_piece": SEALED_HEADER + CHUNK - 3, "tag": len(frame) - 1}[where]
    frame[position] ^= 0x40
    feeder = _send_in_background(sender, bytes(frame))
    assert rx.next_frame() == stream.TAG
    receiver.shutdown(socket.SHUT_RDWR)  # the stream is closed on a tag failure
    feeder.join(60)
    assert path.read_bytes() == bytes(SIZE)


def test_a_checksum_mismatch_under_a_good_tag_is_still_caught(link: Link) -> None:
    sender, receiver, fd, path = link
    rx, _, _ = _sealed_receiver(receiver, fd)
    data = os.urandom(CHUNK)
    header = _header(0, 0, data, checksum=xxhash.xxh3_64_intdigest(data) ^ 1)
    feeder = _send_in_background(sender, _reference_frame(ReferenceFrameKey(KEY), header, data))
    assert rx.next_frame() == stream.CHECKSUM
    feeder.join(60)
    assert path.read_bytes() == bytes(SIZE)


def test_a_frame_for_python_leaves_its_payload_to_the_shared_key(link: Link) -> None:
    """A header the native loop does not take (here: a compressed codec) comes back opened; the
    Python path then opens the payload with the same key object, at the next nonce."""
    sender, receiver, fd, _ = link
    rx, header_buf, recv_key = _sealed_receiver(receiver, fd)
    source_key = ReferenceFrameKey(KEY)
    first, second = os.urandom(100), os.urandom(CHUNK)
    wire_bytes = (_reference_frame(source_key, _header(0, 0, first, codec=1, raw_len=CHUNK), first)
                  + _reference_frame(source_key, _header(1, CHUNK, second), second))
    feeder = _send_in_background(sender, wire_bytes)
    assert rx.next_frame() == stream.HEADER
    h = wire.unpack_header(header_buf)
    assert (h.codec, h.encoded_len) == (1, len(first))
    body = bytearray(h.encoded_len)
    recv_key.open_into(header_buf, _recv_exact(receiver, h.encoded_len + TAG_BYTES), body)
    assert body == first
    rx.handled(h.sequence, h.offset)  # its ACK is sealed by the next call, at the send key's next nonce
    assert rx.next_frame(ack_last=True) == stream.WRITTEN and rx.sequence == 1
    feeder.join(60)
    ack = bytearray(wire.HEADER_SIZE)
    ReferenceFrameKey(KEY[::-1]).open_into(b"", _recv_exact(sender, SEALED_HEADER), ack)
    assert bytes(ack) == wire.pack_header(wire.FrameType.ACK, 0, 0, SESSION, STREAM, 0, 0, 0, 0, 0, VERSION)



@pytest.mark.parametrize("flip", [False, True])
def test_a_handed_back_frames_sealed_payload_is_opened_natively(link: Link, flip: bool) -> None:
    """The payload of a frame the native loop hands back is read and opened in place by
    recv_payload at the receive key's next nonce (over several pieces); a flipped bit is TAG."""
    sender, receiver, fd, _ = link
    header, payload = bytearray(wire.HEADER_SIZE), bytearray(max_encoded_len(CHUNK))
    rx = stream.RawFrameReceiver(receiver.fileno(), fd, header, payload, SESSION, STREAM, VERSION, SIZE, CHUNK,
                                 recv_key=FrameKey(KEY).cipher, send_key=FrameKey(KEY[::-1]).cipher)
    source_key = ReferenceFrameKey(KEY)
    first, second = os.urandom(300_000), os.urandom(CHUNK)
    frame = bytearray(_reference_frame(source_key, _header(0, 0, first, codec=1, raw_len=CHUNK), first))
    if flip:
        frame[SEALED_HEADER + 200_000] ^= 1
    feeder = _send_in_background(sender, bytes(frame) + _reference_frame(source_key, _header(1, CHUNK, second),
                                                                         second))
    assert rx.next_frame() == stream.HEADER
    if flip:
        assert rx.recv_payload(len(first)) == stream.TAG
        receiver.shutdown(socket.SHUT_RDWR)
    else:
        assert rx.recv_payload(len(first)) == stream.PAYLOAD
        assert payload[:len(first)] == first
        rx.handled(0, 0)
        assert rx.next_frame(ack_last=True) == stream.WRITTEN and rx.sequence == 1
    feeder.join(60)


def test_a_sealed_receiver_needs_both_keys(link: Link) -> None:
    _, receiver, fd, _ = link
    with pytest.raises(ValueError, match="both keys"):
        stream.RawFrameReceiver(receiver.fileno(), fd, bytearray(wire.HEADER_SIZE), bytearray(CHUNK), SESSION,
                                STREAM, VERSION, SIZE, CHUNK, recv_key=stream.FrameCipher(KEY))


def test_opening_in_place_matches_the_reference_and_refuses_a_flipped_bit() -> None:
    header, payload = os.urandom(wire.HEADER_SIZE), os.urandom(5000)
    sealed = bytearray(len(payload) + TAG_BYTES)
    ReferenceFrameKey(KEY).seal_into(header, payload, sealed)
    data, tag = bytearray(sealed[:-TAG_BYTES]), bytes(sealed[-TAG_BYTES:])
    FrameKey(KEY).open_in_place(header, data, tag)
    assert data == payload
    altered = bytearray(sealed[:-TAG_BYTES])
    altered[4999] ^= 1
    with pytest.raises(wire.FrameError):
        FrameKey(KEY).open_in_place(header, altered, tag)
    with pytest.raises(ValueError):
        FrameKey(KEY).open_in_place(header, bytearray(sealed[:-TAG_BYTES]), tag[:8])
