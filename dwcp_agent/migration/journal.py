"""The receiver's durable record of which chunks of a partial image are written and verified.

Layout: a JSON identity line (size, chunk size, VM id), then fixed 20-byte records
(chunk index u64, chunk checksum u64, crc32 of both). Records are appended in groups: the data
file is fdatasync'd first, then the records are written and the journal fsync'd, so a record
never names bytes that are not on disk. A torn or corrupt trailing record is ignored on load.
An exclusive flock keeps two migrations from writing the same destination.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import threading
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dwcp_agent.migration.safe_files import DestinationDir

_RECORD = struct.Struct("<QQI")


class JournalBusy(RuntimeError):
    """Another migration holds this destination."""


@dataclass(frozen=True)
class Identity:
    """What must match for a partial image to be resumed rather than restarted."""

    size: int
    chunk_size: int
    vm_id: str


class Journal:
    """Chunks durably written to `partial_path`; thread-safe `add`, group-committed by `flush`."""

    def __init__(self, path: Path, identity: Identity, directory: DestinationDir | None = None) -> None:
        """With `directory`, the journal is opened through the destination directory's descriptor
        (O_NOFOLLOW, O_EXCL when new); `created` says whether this call made the file."""
        self.path = path
        self.directory = directory
        self.identity = identity
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one group commit at a time; readers see none half-done
        self._pending: list[tuple[int, int]] = []
        self.have: dict[int, int] = {}
        if directory is not None:
            self._fd, self.created = directory.open_file(path.name)
        else:
            self.created = not path.exists()
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise JournalBusy(f"destination is busy: {path} is locked by another migration") from None
        self.resumed = self._load()

    def _load(self) -> bool:
        with os.fdopen(os.dup(self._fd), "rb") as f:
            first = f.readline()
            try:
                stored = Identity(**json.loads(first)) if first.endswith(b"\n") else None
            except (ValueError, TypeError):
                stored = None
            if stored != self.identity:
                self.reset()
                return False
            while len(raw := f.read(_RECORD.size)) == _RECORD.size:
                index, checksum, crc = _RECORD.unpack(raw)
                if zlib.crc32(raw[:16]) != crc:
                    break
                self.have[index] = checksum
        os.lseek(self._fd, 0, os.SEEK_END)
        return True

    def reset(self) -> None:
        """Forget every record: the partial file is started over."""
        self.have.clear()
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.write(self._fd, json.dumps(asdict(self.identity)).encode() + b"\n")
        os.fsync(self._fd)

    def add(self, index: int, checksum: int) -> None:
        """Note a chunk written to the data file; durable after the next `flush`."""
        with self._lock:
            self._pending.append((index, checksum))

    def flush(self, data_fd: int) -> int:
        """Make pending records durable (data first, then journal); returns how many were written."""
        with self._flush_lock:
            with self._lock:
                pending, self._pending = self._pending, []
            if not pending:
                return 0
            try:
                os.fdatasync(data_fd)
                blob = b"".join(
                    head + struct.pack("<I", zlib.crc32(head))
                    for head in (struct.pack("<QQ", i, c) for i, c in pending)
                )
                os.write(self._fd, blob)
                os.fsync(self._fd)
            except OSError:
                with self._lock:
                    self._pending[:0] = pending
                raise
            with self._lock:
                self.have.update(pending)
            return len(pending)

    def known(self) -> dict[int, int]:
        """Chunks durable or pending (pending ones will be durable before commit)."""
        with self._flush_lock, self._lock:
            merged = dict(self.have)
            merged.update(self._pending)
        return merged

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        """Delete the journal (after commit or cancel)."""
        if self.directory is not None:
            self.directory.unlink(self.path.name)
        else:
            self.path.unlink(missing_ok=True)
        self.close()


def pack_have(have: dict[int, int]) -> bytes:
    """Have-map on the wire: sorted (index u64, checksum u64) pairs."""
    return b"".join(struct.pack("<QQ", i, have[i]) for i in sorted(have))


def unpack_have(blob: bytes) -> dict[int, int]:
    if len(blob) % 16:
        raise ValueError(f"have-map of {len(blob)} bytes is not whole (index, checksum) pairs")
    return {i: c for i, c in struct.iter_unpack("<QQ", blob)}
