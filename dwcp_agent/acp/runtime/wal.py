"""The replica's write-ahead log on disk: appended, checksummed, fsync'd records plus an atomic snapshot.

Layout under the directory: `snapshot` (the epoch start, the latest Raft snapshot or PBFT stable
checkpoint, written to a temporary file, fsync'd and renamed) and `wal` (records of hard state,
entries, PBFT prepared certificates and view, each framed as length | crc32 | msgpack). A record
with a bad checksum or a short tail is where a crash interrupted a write: replay stops there and
the file is cut back. Taking a snapshot rewrites the log with only what the snapshot does not
cover, so the log never grows past one snapshot interval.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from pathlib import Path

import msgspec

from dwcp_agent.acp.messages import Entry, HardState, PreparedProof
from dwcp_agent.acp.storage import PersistOps, Recovered, merge

__all__ = ["FileWAL"]

_HEADER = struct.Struct(">II")
# Test hook for fault injection: while the file this names exists, every fsync fails with EIO.
FSYNC_FAIL_FLAG_ENV = "ACP_TEST_FSYNC_FAIL_FLAG"


class _Record(msgspec.Struct, array_like=True):
    hard_state: HardState | None = None
    entries: list[Entry] = []
    prepared: list[PreparedProof] = []
    view: int | None = None
    spoke: tuple[int, int] | None = None


_ENC = msgspec.msgpack.Encoder()
_REC_DEC = msgspec.msgpack.Decoder(_Record)
_SNAP_DEC = msgspec.msgpack.Decoder(Recovered)


def _check_fsync_hook() -> None:
    flag = os.environ.get(FSYNC_FAIL_FLAG_ENV)
    if flag and os.path.exists(flag):
        raise OSError(errno.EIO, f"fsync failed (fault injected through {FSYNC_FAIL_FLAG_ENV})")


def _fsync(fd: int, data_only: bool = False) -> None:
    _check_fsync_hook()
    (os.fdatasync if data_only else os.fsync)(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


class FileWAL:
    """Durable `Storage` in a directory; `fsync=False` is for tests that do not measure durability."""

    def __init__(self, directory: Path, fsync: bool = True) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.snap_path = self.dir / "snapshot"
        self.wal_path = self.dir / "wal"
        self.mirror: Recovered | None = None
        self._fd: int | None = None
        self.bytes_written = 0

    # ------------------------------------------------------------ load
    def load(self) -> Recovered | None:
        """Snapshot plus replayed records; a torn tail is cut off."""
        if not self.snap_path.exists():
            return None
        rec = _SNAP_DEC.decode(self.snap_path.read_bytes())
        good = 0
        if self.wal_path.exists():
            data = self.wal_path.read_bytes()
            pos = 0
            while pos + _HEADER.size <= len(data):
                length, crc = _HEADER.unpack_from(data, pos)
                body = data[pos + _HEADER.size: pos + _HEADER.size + length]
                if len(body) < length or zlib.crc32(body) != crc:
                    break
                try:
                    record = _REC_DEC.decode(body)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    break
                merge(rec, PersistOps(hard_state=record.hard_state, entries=record.entries,
                                      prepared=record.prepared, view=record.view, spoke=record.spoke))
                pos += _HEADER.size + length
                good = pos
            if good < len(data):
                with open(self.wal_path, "r+b") as f:
                    f.truncate(good)
        self.mirror = rec
        return Recovered(rec.epoch, rec.hard_state, rec.snapshot, list(rec.entries), rec.checkpoint,
                         list(rec.prepared), rec.view, rec.spoke)

    # ------------------------------------------------------------ save
    def save(self, ops: PersistOps) -> None:
        """Persist ops; returns once they are on stable storage."""
        if self.mirror is None:
            if ops.epoch_start is None:
                raise ValueError("the first save must start an epoch")
            self.mirror = Recovered(ops.epoch_start)
        merge(self.mirror, ops)
        if ops.epoch_start is not None or ops.snapshot is not None or ops.checkpoint is not None:
            self._rewrite()
            return
        record = _Record(ops.hard_state, ops.entries, ops.prepared, ops.view, ops.spoke)
        self._append(_ENC.encode(record))

    def _frame(self, body: bytes) -> bytes:
        return _HEADER.pack(len(body), zlib.crc32(body)) + body

    def _append(self, body: bytes) -> None:
        if self._fd is None:
            self._fd = os.open(self.wal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        frame = self._frame(body)
        os.write(self._fd, frame)
        self.bytes_written += len(frame)
        if self.fsync:
            _fsync(self._fd, data_only=True)

    def _rewrite(self) -> None:
        assert self.mirror is not None
        m = self.mirror
        base = Recovered(m.epoch, HardState(), m.snapshot, [], m.checkpoint, [], m.view, m.spoke)
        self._atomic_write(self.snap_path, _ENC.encode(base))
        rest = _Record(m.hard_state, m.entries, m.prepared, m.view, m.spoke)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._atomic_write(self.wal_path, self._frame(_ENC.encode(rest)))

    def _atomic_write(self, path: Path, data: bytes) -> None:
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            if self.fsync:
                _fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self.bytes_written += len(data)
        if self.fsync:
            _fsync_dir(self.dir)

    def close(self) -> None:
        """Close the log file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
