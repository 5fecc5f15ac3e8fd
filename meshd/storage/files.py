"""The file operations the store needs, as a protocol with one real implementation.

The store never calls ``os`` itself: tests and the simulation hand it a disk that drops
un-fsynced writes on a crash, tears the last write, or runs out of space
(:mod:`meshd.sim.disk`), and the real daemon hands it :class:`OsFiles`. Every call may
raise :class:`OSError`, as the real ones do.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Protocol


class AppendFile(Protocol):
    """A file open for appending."""

    def write(self, data: bytes) -> None:
        """Append all of ``data``; raises OSError (after writing part of it, perhaps)."""

    def sync(self) -> None:
        """fsync: everything written so far survives a power loss once this returns."""

    def close(self) -> None: ...


class Lock(Protocol):
    def close(self) -> None: ...


class StoreLocked(OSError):
    """Another process holds the store (two daemons must never share a data directory)."""


class FileSystem(Protocol):
    def makedirs(self, path: str) -> None: ...

    def lock(self, path: str) -> Lock:
        """Take an exclusive lock on ``path`` (created if missing) for this process's life;
        raises StoreLocked if another process holds it."""

    def listdir(self, path: str) -> list[str]: ...

    def read(self, path: str) -> bytes: ...

    def size(self, path: str) -> int: ...

    def append(self, path: str) -> AppendFile:
        """Open ``path`` for appending, creating it if missing."""

    def truncate(self, path: str, size: int) -> None:
        """Cut ``path`` to ``size`` bytes and fsync it."""

    def rename(self, src: str, dst: str) -> None: ...

    def remove(self, path: str) -> None: ...

    def sync_dir(self, path: str) -> None:
        """fsync a directory: names created, renamed or removed in it survive a power loss."""


class _OsAppendFile:
    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _OsLock:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class OsFiles:
    """The real file system."""

    def lock(self, path: str) -> Lock:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLocked(
                errno.EWOULDBLOCK, "another process uses this store (is meshd running?)", path
            ) from None
        return _OsLock(fd)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, mode=0o700, exist_ok=True)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def read(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def size(self, path: str) -> int:
        return os.stat(path).st_size

    def append(self, path: str) -> AppendFile:
        return _OsAppendFile(path)

    def truncate(self, path: str, size: int) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def remove(self, path: str) -> None:
        os.remove(path)

    def sync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
