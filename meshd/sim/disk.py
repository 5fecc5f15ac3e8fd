"""A simulated disk that forgets what was not fsynced (the idea of Jepsen's LazyFS).

Every file has the bytes a reader sees now and the bytes that would survive a power loss
(those written before its last fsync). Names work the same way: creating, renaming and
removing a file changes what ``listdir`` shows at once, and what survives a power loss only
once the directory is fsynced. :meth:`SimDisk.power_loss` reverts everything to what
survives, optionally keeping a random part of the last unsynced write of each file (a torn
write). A capacity makes writes fail with ENOSPC (after writing what fits, as a real disk
does); :attr:`SimDisk.fail_next` makes chosen operations fail with EIO.

It implements :class:`meshd.storage.files.FileSystem`, so the real store runs on it.
"""

from __future__ import annotations

import errno
import os
import random
from dataclasses import dataclass, field

from meshd.storage.files import StoreLocked


@dataclass(slots=True)
class _Inode:
    data: bytearray = field(default_factory=bytearray)
    synced: bytes = b""


class _SimAppendFile:
    def __init__(self, disk: SimDisk, inode: _Inode) -> None:
        self._disk = disk
        self._inode = inode
        self._open = True

    def write(self, data: bytes) -> None:
        self._disk._check("write")
        room = self._disk.free()
        if len(data) > room:
            self._inode.data += data[:room]
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        self._inode.data += data

    def sync(self) -> None:
        self._disk._check("sync")
        self._inode.synced = bytes(self._inode.data)

    def close(self) -> None:
        self._open = False


class _SimLock:
    def __init__(self, disk: SimDisk, key: str) -> None:
        self._disk = disk
        self._key = key

    def close(self) -> None:
        self._disk._locks.discard(self._key)


class SimDisk:
    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self._names: dict[str, _Inode] = {}  # what listdir shows
        self._durable_names: dict[str, _Inode] = {}  # what survives a power loss
        self._dirs: set[str] = set()
        self._locks: set[str] = set()  # held by a live process (a power loss frees them)
        self.fail_next: dict[str, int] = {}  # operation -> how many calls fail with EIO
        self.syncs = 0

    # ------------------------------------------------------------------ faults

    def _check(self, op: str) -> None:
        if op == "sync":
            self.syncs += 1
        left = self.fail_next.get(op, 0)
        if left > 0:
            self.fail_next[op] = left - 1
            raise OSError(errno.EIO, f"Input/output error (simulated {op})")

    def used(self) -> int:
        unique = {id(inode): inode for inode in self._names.values()}
        return sum(len(inode.data) for inode in unique.values())

    def free(self) -> int:
        if self.capacity is None:
            return 1 << 62
        return max(0, self.capacity - self.used())

    def power_loss(self, rng: random.Random | None = None) -> None:
        """Lose everything not fsynced. With ``rng``, each file keeps a random prefix of
        what it lost (a torn write), as a real disk may."""
        survivors: dict[int, _Inode] = {}
        for inode in self._durable_names.values():
            if id(inode) in survivors:
                continue
            survivors[id(inode)] = inode
            lost = (
                bytes(inode.data[len(inode.synced) :])
                if inode.data.startswith(inode.synced)
                else b""
            )
            kept = lost[: rng.randrange(len(lost) + 1)] if rng is not None and lost else b""
            inode.data = bytearray(inode.synced + kept)
            inode.synced = bytes(inode.data)
        self._names = dict(self._durable_names)
        self._locks.clear()

    # ------------------------------------------------------------------ FileSystem

    def makedirs(self, path: str) -> None:
        self._dirs.add(os.path.normpath(path))

    def lock(self, path: str) -> _SimLock:
        key = os.path.normpath(path)
        if key in self._locks:
            raise StoreLocked(errno.EWOULDBLOCK, "locked (simulated)", path)
        self._locks.add(key)
        return _SimLock(self, key)

    def listdir(self, path: str) -> list[str]:
        prefix = os.path.normpath(path) + os.sep
        return sorted(n[len(prefix) :] for n in self._names if n.startswith(prefix))

    def _inode(self, path: str) -> _Inode:
        try:
            return self._names[os.path.normpath(path)]
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, "No such file (simulated)", path) from None

    def read(self, path: str) -> bytes:
        self._check("read")
        return bytes(self._inode(path).data)

    def size(self, path: str) -> int:
        return len(self._inode(path).data)

    def append(self, path: str) -> _SimAppendFile:
        self._check("open")
        key = os.path.normpath(path)
        inode = self._names.get(key)
        if inode is None:
            inode = self._names[key] = _Inode()
        return _SimAppendFile(self, inode)

    def truncate(self, path: str, size: int) -> None:
        self._check("truncate")
        inode = self._inode(path)
        del inode.data[size:]
        inode.synced = bytes(inode.data)

    def rename(self, src: str, dst: str) -> None:
        self._check("rename")
        inode = self._inode(src)
        del self._names[os.path.normpath(src)]
        self._names[os.path.normpath(dst)] = inode

    def remove(self, path: str) -> None:
        self._check("remove")
        self._inode(path)
        del self._names[os.path.normpath(path)]

    def sync_dir(self, path: str) -> None:
        self._check("sync_dir")
        prefix = os.path.normpath(path) + os.sep
        for name in [n for n in self._durable_names if n.startswith(prefix)]:
            del self._durable_names[name]
        for name, inode in self._names.items():
            if name.startswith(prefix):
                self._durable_names[name] = inode

    # ------------------------------------------------------------------ test helpers

    def process_died(self) -> None:
        """The process using the disk is gone (its locks go; its written data stays)."""
        self._locks.clear()

    def corrupt(self, path: str, offset: int, data: bytes) -> None:
        """Overwrite bytes in place, durably (bit rot, a bad sector, an operator's editor)."""
        inode = self._inode(path)
        inode.data[offset : offset + len(data)] = data
        inode.synced = bytes(inode.data)
