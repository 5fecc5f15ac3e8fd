"""Small disks that can be filled: the ``disk-full`` fault.

A host whose scenario asks for a small disk gets a tmpfs of that size mounted at its
daemon's data directory *before* the daemon starts (a mount over a directory the daemon
already holds files in would not be seen through its open descriptors). The mount is listed
in the host layer's state file before it is made, and removed by ``close`` and ``cleanup``
like every other resource of a run (:mod:`chaos.netns`).

Filling writes one file, ``chaos-filler``, into that directory until the kernel answers
``ENOSPC``; freeing deletes it. tmpfs gives the same error a full disk does, needs no loop
device or image file, and disappears with its mount. (Its ``fsync`` is a no-op, so this
fault is about a disk that is full, not one that loses data.) Both refuse to touch anything
but a tmpfs mount point, so a mistake can never fill the machine's real disk.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

FILLER = "chaos-filler"
_SIZE = re.compile(r"^(\d+)([kmg]?)$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
MIN_SIZE = 1 << 20
MAX_SIZE = 1 << 30


def parse_size(text: str) -> int:
    """``"16m"`` -> 16777216. Plain bytes or k/m/g (powers of 1024), 1 MiB .. 1 GiB."""
    m = _SIZE.match(text.strip())
    if m is None:
        raise ValueError(f"disk size {text!r}: use bytes or k/m/g, e.g. 16m")
    size = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"disk size {text!r}: between 1m and 1g")
    return size


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_fstype(path: str | os.PathLike[str], mountinfo: str | None = None) -> str | None:
    """The file system type mounted exactly at ``path`` (the last mount wins), or None."""
    target = os.path.realpath(path)
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    found: str | None = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        if _unescape(fields[4]) == target:
            found = right.split()[0]
    return found


def _require_tmpfs(directory: str | os.PathLike[str]) -> str:
    if mount_fstype(directory) != "tmpfs":
        raise OSError(
            errno.EINVAL, f"{directory} is not a tmpfs mount point: refusing to fill or free it"
        )
    return os.path.join(directory, FILLER)


def fill(directory: str | os.PathLike[str]) -> int:
    """Write the filler file until the tmpfs at ``directory`` is full; bytes written.

    Ever smaller blocks, down to 512 bytes, so that nothing but the partly filled last
    pages of existing files is left (those a daemon may still append to, briefly)."""
    path = _require_tmpfs(directory)
    capacity = os.statvfs(directory)
    bound = capacity.f_blocks * capacity.f_frsize  # the loop below never writes more
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 64 << 10, 4 << 10, 512):
            block = bytes(size)
            for _ in range(bound // size + 2):
                try:
                    n = os.write(fd, block)
                except OSError as exc:
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                        break
                    raise
                written += n
                if n < size:
                    break
    finally:
        os.close(fd)
    return written


def free(directory: str | os.PathLike[str]) -> int:
    """Delete the filler file; the bytes it held (0 if there was none)."""
    path = _require_tmpfs(directory)
    try:
        size = os.stat(path).st_size
        os.unlink(path)
    except FileNotFoundError:
        return 0
    return size


def filled(directory: str | os.PathLike[str]) -> bool:
    return os.path.exists(os.path.join(directory, FILLER))
