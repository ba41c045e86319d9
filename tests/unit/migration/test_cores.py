"""The pure cores as scripts: events in, the actions they must produce out."""

from __future__ import annotations

import pytest

from dwcp_agent.migration.core import (
    Commit,
    Deliver,
    ErrorKind,
    Finished,
    FrameFault,
    ImageAssembler,
    ImageSender,
    JournalAdd,
    MigrationState,
    Reencode,
    Release,
    Rename,
    Reply,
    SendAck,
    StreamAssembler,
    StreamSender,
    VerifyDigest,
    is_retryable,
)
from dwcp_agent.migration.model import MigrationError
from dwcp_agent.wire import FrameHeader, FrameType


def data(session: int, stream: int, seq: int, offset: int, raw_len: int, checksum: int = 7, flags: int = 0
         ) -> FrameHeader:
    return FrameHeader(3, FrameType.DATA, flags, 0, session, stream, seq, offset, raw_len, raw_len, checksum)


def test_one_retry_rule_for_every_error_kind() -> None:
    assert not is_retryable(ErrorKind.AUTH) and not is_retryable("no_space")
    assert not is_retryable(ErrorKind.DIGEST_MISMATCH) and not is_retryable(ErrorKind.STREAM_ENDED)
    assert is_retryable(ErrorKind.DISCONNECTED) and is_retryable("incomplete") and is_retryable("a_peer_kind")
    assert MigrationError("x", "busy").retryable is False
    assert MigrationError("x", "connect").retryable is True
    assert MigrationState.COMPLETED == "completed"


def test_stream_chunks_of_a_lost_stream_go_again_lowest_offset_first() -> None:
    s = StreamSender(window_bytes=300)
    s.stream_up(0)
    s.stream_up(1)
    for _ in range(3):
        s.chunk_read(100, 1)
    assert s.room() == 0  # the window is full
    a, b, c = s.next_frame(0), s.next_frame(1), s.next_frame(0)
    assert (a.offset, b.offset, c.offset) == (0, 100, 200) and (a.seq, c.seq) == (0, 1)
    s.stream_lost(0)
    again = s.next_frame(1)
    assert again is not None and (again.offset, again.seq) == (0, 1)
    s.acked(200)  # cumulative: the destination writes in order
    assert [type(x) for x in s.take_ready()] == [Release, Release, Release]
    assert s.room() == 300
    end = s.end_of_input()
    assert s.next_frame(1) is end
    s.acked(end.offset, end=True)
    assert isinstance(s.take_ready()[-1], Finished)


def test_stream_assembler_reorders_drops_duplicates_and_verifies_the_digest() -> None:
    src = StreamSender(1000)
    src.stream_up(0)
    src.stream_up(1)
    for checksum in (11, 22):
        src.chunk_read(10, checksum)
    end = src.end_of_input()
    d = StreamAssembler(session=9, version=3, reorder_bytes=100, max_chunk=10)
    d.stream_up(0)
    d.stream_up(1)
    second = data(9, 1, 0, 10, 10, 22)
    d.check(1, second)
    d.arrived(1, second)
    assert d.take_ready() == []  # waits for offset 0
    first = data(9, 0, 0, 0, 10, 11)
    d.check(0, first)
    d.arrived(0, first)
    delivered = d.take_ready()
    assert [a.chunk.offset for a in delivered if isinstance(a, Deliver)] == [0, 10]
    for a in delivered:
        d.written(a.chunk)  # type: ignore[union-attr]
    assert [a.offset for a in d.take_ready() if isinstance(a, SendAck)] == [0, 10]
    with pytest.raises(FrameFault) as fault:
        d.check(0, data(9, 0, 5, 20, 10))  # a frame lost before it on this connection
    assert fault.value.kind == "sequence"
    with pytest.raises(FrameFault):
        d.check(1, data(9, 1, 1, 200, 10))  # beyond the reorder window
    fin = data(9, 0, 0, end.offset, 0, end.checksum, flags=end.flags)
    d.stream_up(0)
    d.check(0, fin)
    d.arrived(0, fin)
    assert isinstance(d.take_ready()[-1], Finished)


def test_stream_assembler_refuses_an_end_whose_digest_differs() -> None:
    d = StreamAssembler(session=1, version=3, reorder_bytes=100, max_chunk=10)
    d.stream_up(0)
    for seq, h in enumerate([data(1, 0, 0, 0, 10, 5), data(1, 0, 1, 10, 0, 12345, flags=0x80)]):
        assert h.sequence == seq
        d.check(0, h)
        d.arrived(0, h)
    assert d.take_ready()[-1].kind == "digest_mismatch"  # type: ignore[union-attr]


def test_image_lost_stream_reencodes_and_commit_needs_every_chunk() -> None:
    s = ImageSender(size=250, chunk_size=100, have={2: 99})
    s.stream_up(0)
    assert [s.next_job(), s.next_job(), s.next_job(), s.next_job()] == [0, 1, 2, None]
    s.chunk_encoded(0, 10)
    s.chunk_encoded(1, 11)
    s.chunk_skipped(2, 99)
    assert s.next_frame(0).seq == 0 and s.next_frame(0).seq == 1  # type: ignore[union-attr]
    s.acked(0, 0)
    s.stream_lost(0)
    ready = s.take_ready()
    assert isinstance(ready[0], Release) and isinstance(ready[1], Reencode) and ready[1].chunk.index == 1
    s.stream_up(1)
    s.chunk_encoded(1, 11, chunk=ready[1].chunk)
    assert s.next_frame(1).seq == 0  # type: ignore[union-attr]
    s.acked(1, 0)
    commit = s.take_ready()[-1]
    assert isinstance(commit, Commit)

    d = ImageAssembler(session=5, version=3, size=250, chunk_size=100, journal={2: 99}, fresh=False)
    d.stream_up(0)
    with pytest.raises(FrameFault):
        d.check(0, data(5, 0, 0, 100, 50))  # chunk 1 is 100 bytes
    d.stream_up(0)
    h = data(5, 0, 0, 0, 100, 10)
    assert d.check(0, h) == 0
    d.written(0, h)
    assert d.take_ready() == [JournalAdd(0, 10), SendAck(0, 0, 0)]
    d.commit_requested(commit.digest)
    assert d.take_ready() == [Reply("failed", "incomplete", "1 chunks are missing at commit")]
    h1 = data(5, 0, 1, 100, 100, 11)
    d.check(0, h1)
    d.written(0, h1)
    d.take_ready()
    d.commit_requested(commit.digest)
    assert d.take_ready() == [VerifyDigest(commit.digest)]
    d.digest_computed(commit.digest, commit.digest)
    assert d.take_ready() == [Rename(), Reply("committed")]
