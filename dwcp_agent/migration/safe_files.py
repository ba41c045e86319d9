"""Opening migration files so that nobody can steer them: source, destination, partial, journal.

A peer names the destination and an admin names the source; a local user may plant symlinks or
hard links next to either. So:
- the source is opened once, at validation, with O_NOFOLLOW, and only a regular file or block
  device is accepted; the migration reads that descriptor and never the path again;
- the destination directory is opened once and checked by what the descriptor really is
  (/proc/self/fd), and every file beside the destination (partial, journal, baseline) is opened
  relative to it with O_NOFOLLOW; new files are created with O_EXCL, existing ones must be
  regular files with a single link;
- the destination must be a regular file strictly inside an allowed directory;
- partials and journals abandoned longer than a TTL are removed (`sweep_abandoned`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

PARTIAL_SUFFIX = ".dwcp-part"
JOURNAL_SUFFIX = ".dwcp-journal"
RESERVE_SUFFIX = ".dwcp-reserve"  # disk space held for the partial (migration/space.py)
_NEW = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_EXISTING = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(Exception):
    """A path was refused; `error_type` labels the metric (forbidden, bad_request, unwritable)."""

    def __init__(self, message: str, error_type: str) -> None:
        super().__init__(message)
        self.error_type = error_type


def _fd_path(fd: int) -> Path:
    """What an open descriptor really is, whatever path was used to open it."""
    return Path(os.readlink(f"/proc/self/fd/{fd}"))


def _inside(path: Path, allowed: list[Path]) -> bool:
    return any(path == d or path.is_relative_to(d) for d in allowed)


def _check_name(path: str, what: str, absolute: bool = True) -> Path:
    if "\x00" in path:
        raise UnsafePath(f"{what} contains a NUL byte", "bad_request")
    p = Path(path)
    if absolute and not p.is_absolute():
        raise UnsafePath(f"{what} {path!r} must be an absolute path", "bad_request")
    if p.name in ("", ".", ".."):
        raise UnsafePath(f"{what} {path!r} does not name a file", "bad_request")
    return p


def _open_dir(path: Path, allowed: list[Path], what: str) -> int:
    """The directory `path` (symlinked parents resolved) as a descriptor proven inside `allowed`."""
    try:
        fd = os.open(path.resolve(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise UnsafePath(f"{what} directory {path} does not exist", "bad_request") from exc
    if not _inside(_fd_path(fd), allowed):
        os.close(fd)
        raise UnsafePath(f"{what} {path} is outside the allowed directories "
                         f"({', '.join(map(str, allowed))})", "forbidden")
    return fd


@dataclass
class SourceImage:
    """The source, opened once: every read of the migration goes through `fd`."""

    path: Path
    fd: int
    size: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_source(path: str | os.PathLike[str], allowed: list[Path]) -> SourceImage:
    """Open a source image read-only without following a final symlink; it must be a regular
    file or a block device strictly inside an allowed directory."""
    p = _check_name(os.fspath(path), "source", absolute=False)
    dir_fd = _open_dir(p.parent, allowed, "source")
    try:
        try:
            fd = os.open(p.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePath(f"source {p} is a symbolic link", "forbidden") from exc
            raise UnsafePath(f"source {p} cannot be opened: {exc.strerror}", "bad_request") from exc
        real = _fd_path(dir_fd) / p.name
    finally:
        os.close(dir_fd)
    st = os.fstat(fd)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        os.close(fd)
        raise UnsafePath(f"source {p} is not a regular file or block device", "bad_request")
    if any(real == d for d in allowed):
        os.close(fd)
        raise UnsafePath(f"source {p} is an allowed directory itself", "forbidden")
    size = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size
    return SourceImage(real, fd, size)


class DestinationDir:
    """The destination's directory, held open; the partial, journal and baseline are opened through it."""

    def __init__(self, dest_path: str, allowed: list[Path]) -> None:
        p = _check_name(dest_path, "destination")
        resolved = p.parent.resolve() / p.name
        if any(resolved == d for d in allowed) or not any(resolved.is_relative_to(d) for d in allowed):
            raise UnsafePath(f"destination {resolved} is outside the allowed directories "
                             f"({', '.join(map(str, allowed))}; see config key dest_dirs): it must name a file "
                             "strictly inside one", "forbidden")
        self.fd = _open_dir(resolved.parent, allowed, "destination")
        self.name = p.name
        self.path = _fd_path(self.fd) / p.name
        if not os.access(f"/proc/self/fd/{self.fd}", os.W_OK):
            self.close()
            raise UnsafePath(f"destination directory {self.path.parent} is not writable", "unwritable")
        try:
            st = os.stat(self.name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            self.close()
            raise UnsafePath(f"destination {self.path} is a directory", "bad_request")

    @property
    def partial_name(self) -> str:
        return self.name + PARTIAL_SUFFIX

    @property
    def journal_name(self) -> str:
        return self.name + JOURNAL_SUFFIX

    @property
    def reserve_name(self) -> str:
        return self.name + RESERVE_SUFFIX

    def open_file(self, name: str) -> tuple[int, bool]:
        """(descriptor, created): an existing regular single-link file, or a new one (O_EXCL)."""
        try:
            return os.open(name, _NEW, 0o600, dir_fd=self.fd), True
        except FileExistsError:
            pass
        try:
            fd = os.open(name, _EXISTING, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePath(f"{self.path.parent / name} is a symbolic link; refusing to follow it",
                                 "forbidden") from exc
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise UnsafePath(f"{self.path.parent / name} is not a regular file of its own "
                             "(special file or hard link); refusing to write it", "forbidden")
        return fd, False

    def open_baseline(self) -> int | None:
        """The current destination file read-only, if it is a regular file (never through a symlink)."""
        try:
            fd = os.open(self.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=self.fd)
        except OSError:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return fd

    def unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)

    def commit(self, partial_name: str) -> None:
        """Rename the partial over the destination and make the rename durable."""
        os.rename(partial_name, self.name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def sweep_abandoned(dirs: list[Path], ttl_s: float, now: float | None = None) -> list[str]:
    """Remove partials, journals and reservations untouched for `ttl_s` whose journal no migration holds;
    returns the names removed."""
    now = time.time() if now is None else now
    removed: list[str] = []
    for directory in dirs:
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            for name in os.listdir(dir_fd):
                base = _base_name(name)
                if base is None:
                    continue
                try:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if now - st.st_mtime < ttl_s or _journal_locked(dir_fd, base + JOURNAL_SUFFIX):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dir_fd)
                    removed.append(str(directory / name))
        finally:
            os.close(dir_fd)
    return removed


def _base_name(name: str) -> str | None:
    for suffix in (PARTIAL_SUFFIX, JOURNAL_SUFFIX, RESERVE_SUFFIX):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _journal_locked(dir_fd: int, journal: str) -> bool:
    """A running migration holds an flock on its journal."""
    try:
        fd = os.open(journal, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
