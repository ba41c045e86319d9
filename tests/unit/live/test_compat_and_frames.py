"""Compatibility check between two QEMUs, and the tunnel's framing and messages."""

from __future__ import annotations

import asyncio

import pytest

from dwcp_agent.live import messages
from dwcp_agent.live.compat import incompatibilities
from dwcp_agent.live.frames import FrameKind, TunnelError, read_frame, write_frame
from dwcp_agent.live.qmp import MigrationInfo, VmFacts

SRC = VmFacts("7.2.22", "pc-q35-7.2", 256 << 20)


def test_identical_qemus_are_compatible() -> None:
    assert incompatibilities(SRC, VmFacts("7.2.22", "pc-q35-7.2", 256 << 20)) == []


def test_each_mismatch_is_named() -> None:
    problems = incompatibilities(SRC, VmFacts("6.2.0", "pc-i440fx-6.2", 512 << 20))
    assert any("machine type differs" in p and "pc-i440fx-6.2" in p for p in problems)
    assert any("RAM size differs" in p and "512 MiB" in p for p in problems)
    assert any("older than source" in p for p in problems)
    assert incompatibilities(SRC, VmFacts("8.0.0", "pc-q35-7.2", 256 << 20)) == []  # newer is fine


def test_query_migrate_reply_is_read_into_bytes_and_rates() -> None:
    info = MigrationInfo.from_qmp({"status": "active", "expected-downtime": 120,
                                   "ram": {"remaining": 5, "dirty-pages-rate": 1000, "page-size": 4096,
                                           "dirty-sync-count": 3, "total": 10, "transferred": 5}})
    assert (info.status, info.remaining_bytes, info.iterations) == ("active", 5, 3)
    assert info.dirty_bytes_per_s == 4096 * 1000 and info.expected_downtime_ms == 120.0
    assert MigrationInfo.from_qmp({"status": "setup"}).expected_downtime_ms is None


def _roundtrip(raw: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(raw)
    reader.feed_eof()
    return reader


class _Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


def test_frames_round_trip_and_a_truncated_or_unknown_frame_is_a_tunnel_error() -> None:
    async def run() -> None:
        sink = _Sink()
        write_frame(sink, FrameKind.CONTROL, b"abc", codec=1, raw_len=10)  # type: ignore[arg-type]
        write_frame(sink, FrameKind.CONTROL, messages.encode(messages.Commit(7, True)))  # type: ignore[arg-type]
        reader = _roundtrip(bytes(sink.data))
        first = await read_frame(reader)
        assert (first.kind, first.codec, first.raw_len, first.payload) == (FrameKind.CONTROL, 1, 10, b"abc")
        second = await read_frame(reader)
        assert messages.decode(second.payload) == messages.Commit(7, True)
        with pytest.raises(TunnelError, match="closed"):
            await read_frame(reader)
        with pytest.raises(TunnelError, match="closed"):
            await read_frame(_roundtrip(bytes(sink.data[:5])))
        with pytest.raises(TunnelError, match="unknown frame type"):
            await read_frame(_roundtrip(bytes([99, 0]) + bytes(8)))

    asyncio.run(run())


def test_sealed_control_frames_hide_the_message_and_a_flipped_byte_is_a_tunnel_error() -> None:
    from dwcp_agent.security.sealed import FrameKey

    secret = messages.encode(messages.Refuse("guest-secret-vm-name", "incompatible"))

    async def run() -> None:
        sink = _Sink()
        write_frame(sink, FrameKind.CONTROL, secret, key=FrameKey(b"k" * 16))  # type: ignore[arg-type]
        one = bytes(sink.data)
        assert b"guest-secret-vm-name" not in one
        frame = await read_frame(_roundtrip(one), FrameKey(b"k" * 16))
        assert frame.payload == secret
        for at in (3, len(one) - 1):  # in the sealed header, in the sealed payload
            flipped = one[:at] + bytes([one[at] ^ 1]) + one[at + 1:]
            with pytest.raises(TunnelError, match="authentication failed"):
                await read_frame(_roundtrip(flipped), FrameKey(b"k" * 16))
        with pytest.raises(TunnelError, match="authentication failed"):  # a wrong key
            await read_frame(_roundtrip(one), FrameKey(b"x" * 16))

    asyncio.run(run())
