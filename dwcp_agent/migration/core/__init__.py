"""The migration engine's protocol core: pure state machines, no sockets, threads, files or clocks.

Like etcd raft's `Ready`, each core takes events (a chunk read or encoded, a frame header, a
verified payload, an acknowledgement, a stream up or lost, a tick of abstract time) and records
actions (send, write, acknowledge, journal, commit, fail) that the caller takes with
`take_ready()` and carries out in order. The threaded drivers (migration/bytestream.py for
streams; the sender/receiver for images) only move bytes and timers in and out, and
migration/simulation.py runs the same cores under seeded faulty schedules.

Two object kinds share the frame checks and the action vocabulary:
- images (image.py): offset-addressed, resumable from the destination's journal;
- byte streams (stream.py): sequence-addressed by byte position, unknown length, in-order
  delivery through a bounded reorder buffer, a rolling digest, no resume once the session ends.

The contract for a driver, per action:
- `SendAck`, `Deliver`, `JournalAdd`: in order. A stream's chunk is acknowledged only after the
  driver called `written()` for it; an image's `SendAck` follows its `JournalAdd`.
- `Release`: the chunk's buffers may be reused (it is acknowledged, or the session is over).
- `Reencode`: encode the chunk again from the source and hand it back with `chunk_encoded`.
- `VerifyDigest` -> compute and call `digest_computed`; `Rename` before the `Reply` that follows.
- `Fail`, `Finished`: the session is over; no further actions follow except Releases.
"""

from dwcp_agent.migration.core.actions import (
    Action,
    CloseStream,
    Commit,
    Deliver,
    Fail,
    Finished,
    FrameFault,
    InChunk,
    JournalAdd,
    JournalReset,
    OutChunk,
    Reencode,
    Release,
    Rename,
    Reply,
    SendAck,
    VerifyDigest,
)
from dwcp_agent.migration.core.checks import check_frame, max_encoded_len
from dwcp_agent.migration.core.image import ImageAssembler, ImageSender
from dwcp_agent.migration.core.kinds import TERMINAL_STATES, ErrorKind, MigrationState, is_retryable
from dwcp_agent.migration.core.stream import FLAG_END, RollingDigest, StreamAssembler, StreamSender

__all__ = [
    "FLAG_END", "TERMINAL_STATES", "Action", "CloseStream", "Commit", "Deliver", "ErrorKind", "Fail", "Finished",
    "FrameFault", "ImageAssembler", "ImageSender", "InChunk", "JournalAdd", "JournalReset", "MigrationState",
    "OutChunk", "Reencode", "Release", "Rename", "Reply", "RollingDigest", "SendAck", "StreamAssembler",
    "StreamSender", "VerifyDigest", "check_frame", "is_retryable", "max_encoded_len",
]
