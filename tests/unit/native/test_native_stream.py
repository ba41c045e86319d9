"""The native raw-frame receive loop against the Python receive path: same frames accepted,
same frames refused, same bytes written, same ACK sent."""

from __future__ import annotations

import os
import socket
import struct
import threading
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from dwcp_agent import wire
from dwcp_agent._native import stream
from dwcp_agent.hde.codecs import CodecId
from dwcp_agent.hde.layout import max_encoded_len
from dwcp_agent.migration.digest import chunk_length
from dwcp_agent.migration.receiver import ReceiveSession

SESSION, STREAM, VERSION = 0x1234_5678_9ABC, 3, wire.PROTOCOL_VERSION
CHUNK = 8192
SIZE = 3 * CHUNK + 100  # last chunk is short


def _frame_header(seq: int = 0, offset: int = 0, raw_len: int | None = None, encoded_len: int | None = None,
                  checksum: int = 0, **fields: int) -> bytes:
    raw = chunk_length(offset // CHUNK, SIZE, CHUNK) if raw_len is None else raw_len
    args = {"ftype": wire.FrameType.DATA, "flags": 0, "codec": 0, "session": SESSION, "stream": STREAM,
            "sequence": seq, "offset": offset, "raw_len": raw,
            "encoded_len": raw if encoded_len is None else encoded_len, "checksum": checksum, "version": VERSION}
    args.update(fields)
    return wire.pack_header(**args)


def _python_accepts(header: bytes, expected_seq: int) -> bool:
    """What the Python path (unpack_header, ReceiveSession._check_header, length checks) lets
    through to the raw, uncompressed write: the frames the native loop must take itself."""
    session = SimpleNamespace(session_id=SESSION, start=SimpleNamespace(size=SIZE, chunk_size=CHUNK))
    try:
        h = wire.unpack_header(header)
        index = ReceiveSession._check_header(session, h, STREAM, VERSION, expected_seq)  # type: ignore[arg-type]
    except wire.FrameError:
        return False
    return (h.raw_len == chunk_length(index, SIZE, CHUNK) and h.encoded_len <= max_encoded_len(h.raw_len)
            and h.codec == CodecId.NONE and h.flags == 0 and h.encoded_len == h.raw_len)


def _receiver(sock: socket.socket, fd: int, expected_seq: int = 0) -> tuple[stream.RawFrameReceiver, bytearray]:
    header = bytearray(wire.HEADER_SIZE)
    payload = bytearray(max_encoded_len(CHUNK))
    return stream.RawFrameReceiver(sock.fileno(), fd, header, payload, SESSION, STREAM, VERSION, SIZE, CHUNK,
                                   expected_seq), header


def test_crc32_is_zlibs() -> None:
    for data in (b"", b"a", bytes(range(256)) * 3, os.urandom(52)):
        assert stream.crc32(data) == zlib.crc32(data)


Link = tuple[socket.socket, socket.socket, int, Path]


def test_raw_frames_are_verified_written_and_acked_in_order(link: Link) -> None:
    sender, receiver, fd, path = link
    rx, _ = _receiver(receiver, fd)
    chunks = [os.urandom(chunk_length(i, SIZE, CHUNK)) for i in range(4)]
    for seq, data in enumerate(chunks):
        sender.sendall(_frame_header(seq, seq * CHUNK, checksum=xxhash.xxh3_64_intdigest(data)) + data)
    for seq, data in enumerate(chunks):
        assert rx.next_frame(ack_last=seq > 0) == stream.WRITTEN
        assert (rx.sequence, rx.index, rx.offset, rx.raw_len) == (seq, seq, seq * CHUNK, len(data))
        assert rx.checksum == xxhash.xxh3_64_intdigest(data)
    sender.shutdown(socket.SHUT_WR)
    assert rx.next_frame(ack_last=True) == stream.CLOSED and not rx.partial
    assert path.read_bytes() == b"".join(chunks)
    acks = b""
    while len(acks) < 4 * wire.HEADER_SIZE:
        acks += sender.recv(4096)
    for seq in range(4):
        ack = acks[seq * wire.HEADER_SIZE:(seq + 1) * wire.HEADER_SIZE]
        assert ack == wire.pack_header(wire.FrameType.ACK, 0, 0, SESSION, STREAM, seq, seq * CHUNK, 0, 0, 0, VERSION)


def test_checksum_mismatch_is_reported_and_nothing_is_written(
        link: tuple[socket.socket, socket.socket, int, Path]) -> None:
    sender, receiver, fd, path = link
    rx, _ = _receiver(receiver, fd)
    data = os.urandom(CHUNK)
    sender.sendall(_frame_header(0, 0, checksum=xxhash.xxh3_64_intdigest(data) ^ 1) + data)
    assert rx.next_frame() == stream.CHECKSUM
    assert path.read_bytes() == bytes(SIZE)


def test_peer_closing_mid_frame_is_partial(link: tuple[socket.socket, socket.socket, int, Path]) -> None:
    sender, receiver, fd, _ = link
    rx, _ = _receiver(receiver, fd)
    sender.sendall(_frame_header(0, 0)[:20])
    sender.shutdown(socket.SHUT_WR)
    assert rx.next_frame() == stream.CLOSED and rx.partial


def test_frames_to_decode_come_back_with_the_payload_unread(
        link: tuple[socket.socket, socket.socket, int, Path]) -> None:
    sender, receiver, fd, _ = link
    rx, header = _receiver(receiver, fd)
    frame = _frame_header(0, 0, encoded_len=10, codec=CodecId.LZ4) + b"0123456789"
    sender.sendall(frame)
    assert rx.next_frame() == stream.HEADER
    assert bytes(header) == frame[:wire.HEADER_SIZE]
    assert receiver.recv(10) == b"0123456789"
    rx.handled(0, 0)
    assert rx.expected_seq == 1
    # The frame Python handled is acknowledged by the next call, as a raw chunk is.
    sender.shutdown(socket.SHUT_WR)
    assert rx.next_frame(ack_last=True) == stream.CLOSED
    assert sender.recv(4096) == wire.pack_header(wire.FrameType.ACK, 0, 0, SESSION, STREAM, 0, 0, 0, 0, 0, VERSION)



def test_a_handed_back_frames_payload_is_read_natively_and_a_cut_one_is_partial(
        link: tuple[socket.socket, socket.socket, int, Path]) -> None:
    sender, receiver, fd, _ = link
    header, payload = bytearray(wire.HEADER_SIZE), bytearray(max_encoded_len(CHUNK))
    rx = stream.RawFrameReceiver(receiver.fileno(), fd, header, payload, SESSION, STREAM, VERSION, SIZE, CHUNK)
    body = os.urandom(len(payload))  # the most a frame carries, sent from another thread
    feeder = threading.Thread(target=sender.sendall,
                              args=(_frame_header(0, 0, encoded_len=len(body), codec=CodecId.LZ4) + body,))
    feeder.start()
    assert rx.next_frame() == stream.HEADER
    assert rx.recv_payload(len(body)) == stream.PAYLOAD
    assert payload[:len(body)] == body
    feeder.join(60)
    rx.handled(0, 0)
    sender.sendall(_frame_header(1, CHUNK, encoded_len=100, codec=CodecId.LZ4) + body[:40])
    sender.shutdown(socket.SHUT_WR)
    assert rx.next_frame(ack_last=True) == stream.HEADER
    assert rx.recv_payload(100) == stream.CLOSED and rx.partial
    with pytest.raises(ValueError, match="does not fit"):
        rx.recv_payload(len(payload) + 1)


REFUSED = {
    "magic": lambda: b"X" + _frame_header()[1:],
    "crc": lambda: _frame_header()[:-1] + bytes([_frame_header()[-1] ^ 1]),
    "version": lambda: _frame_header(version=VERSION + 1),
    "type control": lambda: _frame_header(ftype=wire.FrameType.CONTROL),
    "type ack": lambda: _frame_header(ftype=wire.FrameType.ACK),
    "type unknown": lambda: _frame_header(ftype=9),
    "session": lambda: _frame_header(session=SESSION + 1),
    "stream": lambda: _frame_header(stream=STREAM + 1),
    "sequence": lambda: _frame_header(seq=1),
    "misaligned offset": lambda: _frame_header(offset=4096, raw_len=CHUNK),
    "offset past the end": lambda: _frame_header(offset=4 * CHUNK, raw_len=CHUNK),
    "raw length": lambda: _frame_header(raw_len=CHUNK - 1),
    "short last chunk as full": lambda: _frame_header(offset=3 * CHUNK, raw_len=CHUNK),
    "encoded length": lambda: _frame_header(encoded_len=CHUNK + 1),
    "codec": lambda: _frame_header(codec=CodecId.LZ4),
    "flags": lambda: _frame_header(flags=1),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_every_header_the_python_path_would_not_write_raw_goes_back_to_it(
        case: str, link: tuple[socket.socket, socket.socket, int, Path]) -> None:
    sender, receiver, fd, path = link
    rx, header = _receiver(receiver, fd)
    frame = REFUSED[case]()
    assert not _python_accepts(frame, 0)
    sender.sendall(frame + bytes(CHUNK))
    assert rx.next_frame() == stream.HEADER
    assert bytes(header) == frame
    assert path.read_bytes() == bytes(SIZE)


def test_reserved_field_goes_back_to_python(link: tuple[socket.socket, socket.socket, int, Path]) -> None:
    sender, receiver, fd, _ = link
    rx, _ = _receiver(receiver, fd)
    body = bytearray(_frame_header()[:-4])
    body[18:20] = struct.pack("<H", 1)
    frame = bytes(body) + struct.pack("<I", zlib.crc32(body))
    assert not _python_accepts(frame, 0)
    sender.sendall(frame)
    assert rx.next_frame() == stream.HEADER


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, wire.HEADER_SIZE - 1), st.integers(1, 255)), max_size=3),
       st.integers(0, 3), st.booleans())
def test_mutated_headers_are_taken_exactly_when_the_python_path_takes_them(
        flips: list[tuple[int, int]], chunk: int, recrc: bool) -> None:
    data = bytes([chunk + 1]) * chunk_length(chunk, SIZE, CHUNK)
    header = bytearray(_frame_header(2, chunk * CHUNK, checksum=xxhash.xxh3_64_intdigest(data)))
    for pos, mask in flips:
        header[pos] ^= mask
    if recrc:
        header[52:] = struct.pack("<I", zlib.crc32(bytes(header[:52])))
    accepts = _python_accepts(bytes(header), 2)
    sender, receiver = socket.socketpair()
    fd = os.open("/dev/null", os.O_WRONLY)
    try:
        rx, _ = _receiver(receiver, fd, expected_seq=2)
        h = wire.unpack_header(bytes(header)) if accepts else None
        payload = data if h is None else bytes([chunk + 1]) * h.raw_len
        sender.sendall(bytes(header) + payload)
        outcome = rx.next_frame()
        if accepts:
            assert h is not None
            assert outcome == (stream.WRITTEN if h.checksum == xxhash.xxh3_64_intdigest(payload) else stream.CHECKSUM)
        else:
            assert outcome == stream.HEADER
    finally:
        os.close(fd)
        sender.close()
        receiver.close()


def test_buffers_are_checked_at_the_boundary(link: tuple[socket.socket, socket.socket, int, Path]) -> None:
    _, receiver, fd, _ = link
    with pytest.raises(ValueError, match="header buffer"):
        stream.RawFrameReceiver(receiver.fileno(), fd, bytearray(10), bytearray(CHUNK), SESSION, STREAM, VERSION,
                                SIZE, CHUNK)
    with pytest.raises(ValueError, match="payload buffer"):
        stream.RawFrameReceiver(receiver.fileno(), fd, bytearray(56), bytearray(CHUNK - 1), SESSION, STREAM,
                                VERSION, SIZE, CHUNK)


def test_write_except_zero_pages_leaves_marked_pages_untouched(tmp_path: Path) -> None:
    path = tmp_path / "partial"
    path.write_bytes(b"\xaa" * (5 * 4096))
    data = os.urandom(4 * 4096 + 100)  # the last page is short
    zero = bytes([1, 0, 0, 1, 0])
    fd = os.open(path, os.O_RDWR)
    try:
        stream.write_except_zero_pages(fd, data, zero, 0)
        with pytest.raises(ValueError, match="mask"):
            stream.write_except_zero_pages(fd, data, zero[:4], 0)
    finally:
        os.close(fd)
    got = path.read_bytes()
    for p, skipped in enumerate(zero):
        page = slice(p * 4096, min((p + 1) * 4096, len(data)))
        assert got[page] == (b"\xaa" * len(got[page]) if skipped else data[page])
    assert got[len(data):] == b"\xaa" * (5 * 4096 - len(data))


def test_write_except_zero_pages_can_punch_the_skipped_runs(tmp_path: Path) -> None:
    """punch=True (a partial preallocated on tmpfs): skipped runs read as zeros and hold no blocks."""
    path = tmp_path / "partial"
    path.write_bytes(b"\xaa" * (8 * 4096))
    data = os.urandom(8 * 4096)
    zero = bytes([1, 1, 0, 0, 1, 0, 1, 1])  # runs of zero pages at the start, middle and end
    fd = os.open(path, os.O_RDWR)
    try:
        stream.write_except_zero_pages(fd, data, zero, 0, True)
        blocks = os.fstat(fd).st_blocks * 512
    finally:
        os.close(fd)
    got = path.read_bytes()
    for p, skipped in enumerate(zero):
        page = slice(p * 4096, (p + 1) * 4096)
        assert got[page] == (bytes(4096) if skipped else data[page])
    assert blocks < 8 * 4096, "the punched pages hold no blocks"


def test_write_except_zero_pages_reports_an_io_error() -> None:
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(OSError):
            stream.write_except_zero_pages(fd, b"x" * 4096, b"\x00", 0)
    finally:
        os.close(fd)
