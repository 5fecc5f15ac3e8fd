"""The peers snapshot: a restarted daemon finds its cluster again without seeds.

Like Serf's snapshot, each daemon keeps the name and address of the members it knows in
``<data_dir>/peers.json``; at start, those addresses are tried as seeds after the configured
ones (``[node] rejoin``). It is a hint, never an authority: a missing file is normal, and one
that cannot be read or parsed is logged and ignored.

What is kept: every member that has not left (alive, suspect, dead until reaped), this node
excluded, plus two kinds of peers that a restart would otherwise lose:

* a member that left less than ``keep_left`` seconds ago. When a whole cluster is stopped,
  every daemon hears the others leave while it is leaving itself; each must still find the
  others when they all come back. A member that left earlier than that is dropped: a host
  retired, or removed by an operator, is not dialled again.
* a peer remembered from the last run that this run has not seen yet (its host is still
  down), for as long as a dead member would be remembered (``reconnect_timeout``).

The pure part (:func:`snapshot_peers`, :func:`encode_peers`, :func:`decode_peers`) knows no
files and no clock; :class:`PeersSnapshot` writes under trio, debounced, off the event loop:
to a temporary file in the same directory, fsynced, renamed over the old one, and the
directory fsynced, so a crash leaves the old snapshot or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import random
import tempfile
from collections.abc import Callable, Iterable
from typing import Any, Final, NamedTuple

import trio

from meshd.logs import kv
from meshd.membership.events import EventKind, MemberEvent, MemberView
from meshd.wire.membership import Status
from meshd.wire.validate import Address, WireError, expect_name

PEERS_FILE: Final = "peers.json"
VERSION: Final = 1
WRITE_INTERVAL: Final = 5.0  # seconds: at most one write per interval while members change
MAX_BYTES: Final = 32 << 20  # a file larger than this is not read
MAX_PEERS: Final = 1_000_000  # membership's own upper bound on max_members
MAX_REJOIN_SEEDS: Final = 32  # remembered addresses tried at start (a random choice beyond)
_CHANGES: Final = (EventKind.JOIN, EventKind.UPDATE, EventKind.LEAVE, EventKind.REAP)


class SnapshotError(ValueError):
    """A peers snapshot that cannot be used; the message says why."""


class Peer(NamedTuple):
    name: str
    addr: Address


# ---------------------------------------------------------------------------- pure part


def snapshot_peers(
    members: Iterable[MemberView],
    me: str,
    *,
    now: float,
    keep_left: float,
    remembered: Iterable[Peer] = (),
) -> tuple[list[Peer], bool]:
    """The peers to persist, sorted by name, and whether the same table will give a shorter
    list later (a member that left is kept only ``keep_left`` seconds after its leave).

    ``now`` is on the members' ``status_since`` clock. ``remembered`` peers are kept unless
    the table knows their name (then the table decides).
    """
    peers: dict[str, Peer] = {}
    known: set[str] = set()
    expiring = False
    for m in members:
        known.add(m.name)
        if m.name == me:
            continue
        if m.status is Status.LEFT:
            if now - m.status_since >= keep_left:
                continue
            expiring = True
        peers[m.name] = Peer(m.name, m.addr)
    for peer in remembered:
        if peer.name not in known and peer.name != me:
            peers.setdefault(peer.name, peer)
    return sorted(peers.values()), expiring


def encode_peers(peers: Iterable[Peer]) -> bytes:
    """The file's content: small, stable JSON (one peer per line, sorted by name)."""
    rows = [
        json.dumps({"name": p.name, "host": p.addr[0], "port": p.addr[1]}, sort_keys=True)
        for p in sorted(peers)
    ]
    body = ",\n    ".join(rows)
    peers_json = f"[\n    {body}\n  ]" if rows else "[]"
    return f'{{\n  "version": {VERSION},\n  "peers": {peers_json}\n}}\n'.encode()


def decode_peers(data: bytes) -> list[Peer]:
    """Parse a snapshot; raises :class:`SnapshotError` naming the first problem.

    Unknown keys are ignored (a newer daemon may add some); a peer named twice is taken once.
    """
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise SnapshotError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise SnapshotError("not a JSON object")
    version = doc.get("version")
    if type(version) is not int or version != VERSION:
        raise SnapshotError(f"unknown version {version!r} (expected {VERSION})")
    rows = doc.get("peers")
    if not isinstance(rows, list):
        raise SnapshotError("peers: expected a list")
    if len(rows) > MAX_PEERS:
        raise SnapshotError(f"peers: {len(rows)} entries, more than {MAX_PEERS}")
    peers: dict[str, Peer] = {}
    for index, row in enumerate(rows, 1):
        peer = _decode_peer(row, f"peers[{index}]")
        peers.setdefault(peer.name, peer)
    return list(peers.values())


def _decode_peer(row: Any, where: str) -> Peer:
    if not isinstance(row, dict):
        raise SnapshotError(f"{where}: expected an object")
    try:
        name = expect_name(row.get("name"), f"{where}.name")
    except WireError as exc:
        raise SnapshotError(str(exc)) from None
    host, port = row.get("host"), row.get("port")
    if not isinstance(host, str):
        raise SnapshotError(f"{where}.host: expected an IP address")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise SnapshotError(f"{where}.host: {host!r} is not an IP address") from None
    if type(port) is not int or not 0 < port <= 65535:
        raise SnapshotError(f"{where}.port: expected an integer in 1..65535")
    return Peer(name, (str(ip), port))


def rejoin_seeds(
    peers: list[Peer], rng: random.Random, limit: int = MAX_REJOIN_SEEDS
) -> list[Address]:
    """The remembered addresses to try at start: all of them, or ``limit`` chosen at random
    (every seed is tried at once; a few live ones among them are enough to join)."""
    chosen = peers if len(peers) <= limit else rng.sample(peers, limit)
    return [p.addr for p in chosen]


# ---------------------------------------------------------------------------- files


def read_peers(path: str) -> list[Peer] | None:
    """The snapshot at ``path``; None if there is none. Raises OSError or SnapshotError."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(data) > MAX_BYTES:
        raise SnapshotError(f"larger than {MAX_BYTES} bytes")
    return decode_peers(data)


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` (mode 0600) so that a crash leaves the old content or
    the new, never a mix: temporary file, fsync, rename, fsync of the directory."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ---------------------------------------------------------------------------- trio writer


class PeersSnapshot:
    """Keeps the snapshot file up to date: written at most every ``interval`` seconds while
    the membership changes (debounced), and once more as the daemon stops (:meth:`close`)."""

    def __init__(
        self,
        path: str,
        members: Callable[[], Iterable[MemberView]],
        me: str,
        log: logging.Logger,
        *,
        remembered: Iterable[Peer] = (),
        forget_after: float = float("inf"),
        interval: float = WRITE_INTERVAL,
    ) -> None:
        self.path = path
        self.members = members
        self.me = me
        self.log = log
        self.interval = interval
        self.writes = 0  # writes done
        self.write_errors = 0  # writes that failed (logged)
        self._remembered = {p.name: p for p in remembered}
        self._forget_at = trio.current_time() + forget_after
        self._written: list[Peer] | None = None
        self._dirty = trio.Event()
        self._closed = False
        self._lock = trio.Lock()
        self._wrote = trio.Event()

    def on_member_event(self, event: MemberEvent) -> None:
        """A membership listener: the set of members or an address may have changed."""
        if event.kind in _CHANGES:
            self._dirty.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._dirty.wait()
            await trio.sleep(self.interval)
            if self._closed:
                return
            self._dirty = trio.Event()
            if await self._write():
                self._dirty.set()  # once keep_left has passed, drop who left

    async def wait_writes(self, count: int) -> None:
        """Until ``count`` writes have been attempted, done or failed. They run in a worker
        thread, so a test on trio's virtual clock cannot tell by the clock alone."""
        while self.writes + self.write_errors < count:
            await self._wrote.wait()

    async def close(self) -> None:
        """The last write, as the daemon stops; later membership changes are not recorded."""
        if not self._closed:
            self._closed = True
            await self._write()

    async def _write(self) -> bool:
        async with self._lock:
            now = trio.current_time()
            members = list(self.members())
            known = {m.name for m in members}
            if now >= self._forget_at:
                self._remembered.clear()
            for name in known & self._remembered.keys():
                del self._remembered[name]  # seen in this run: the table decides from now on
            peers, expiring = snapshot_peers(
                members,
                self.me,
                now=now,
                keep_left=self.interval,
                remembered=self._remembered.values(),
            )
            if peers == self._written:
                return expiring
            try:
                await trio.to_thread.run_sync(write_atomic, self.path, encode_peers(peers))
            except OSError as exc:
                self.write_errors += 1
                self.log.warning(
                    "cannot write the peers snapshot",
                    extra=kv(file=self.path, error=exc.strerror or str(exc)),
                )
            else:
                self._written = peers
                self.writes += 1
            self._wrote.set()
            self._wrote = trio.Event()
            return expiring
