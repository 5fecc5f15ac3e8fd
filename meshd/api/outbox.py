"""What a session has to say to its client, on its way to the socket, in order.

A frame is written the moment it is ready, by whoever produced it, unless earlier frames are
still waiting for room in the socket: then it queues behind them and the session's writer
task sends them as room appears. While the session's read loop answers the frames of one
read, the outbox is *corked*: the answers gather and leave in one write. Bounded: past
``OUTGOING_FRAMES`` frames or ``OUTGOING_BYTES`` bytes it is *backlogged* (streams end
``overloaded``, replies wait); the session closes a client whose replies pass
``OUTGOING_HARD`` bytes.
"""

from __future__ import annotations

import socket
from collections import deque
from typing import Final

import trio

OUTGOING_FRAMES: Final = 1024
# Bytes queued for a client that does not read: past the first, streams end ``overloaded``
# and replies wait; past the second (replies to requests already in flight), the session is
# closed — a client that never reads holds at most this much of the daemon's memory.
OUTGOING_BYTES: Final = 4 << 20
OUTGOING_HARD: Final = 16 << 20
CORK_FRAMES: Final = 256  # answers of one read gathered into one write, at most


class Outbox:
    """The frames not yet handed to one non-blocking socket. Owns the socket's writing side
    and nothing else: what the frames say, and when a session ends, are the session's."""

    __slots__ = ("_room", "_unblock", "blocked", "broken", "bytes", "corked", "frames", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.frames: deque[bytes] = deque()
        self.bytes = 0  # in ``frames``
        self.blocked = False  # the socket is full: the writer task owns what is queued
        self.corked = False  # the read loop is answering one read: write when it is done
        self.broken = False  # the socket failed: nothing more can be written
        self._unblock = trio.Event()  # set for the writer when a write left bytes behind
        self._room = trio.Event()  # set when the queue drained

    def backlogged(self) -> bool:
        return len(self.frames) >= OUTGOING_FRAMES or self.bytes >= OUTGOING_BYTES

    def over_hard_limit(self, more: int) -> bool:
        return self.bytes + more > OUTGOING_HARD

    def push(self, data: bytes) -> None:
        out = self.frames
        out.append(data)
        self.bytes += len(data)
        if not self.blocked and (not self.corked or len(out) >= CORK_FRAMES):
            self.flush()

    def flush(self) -> None:
        """Write what is queued, as far as the socket takes it now."""
        out = self.frames
        if not out or self.blocked or self.broken:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.fail()  # the client went away; the reader sees it too
            return
        out.clear()
        self.bytes = len(data) - sent
        if sent < len(data):
            out.append(data[sent:])
            self.blocked = True
            self._unblock.set()
            return
        self._room.set()
        self._room = trio.Event()

    def uncork(self) -> None:
        self.corked = False
        self.flush()

    def fail(self) -> None:
        """Nothing more can be written: drop what is queued, wake whoever waits for room."""
        self.broken = True
        self.frames.clear()
        self.bytes = 0
        self._room.set()

    def release(self) -> None:
        """The session ended: whoever waits for room stops waiting."""
        self._room.set()

    async def wait_room(self) -> None:
        """Until the queue next drains (or the outbox fails or is released)."""
        await self._room.wait()

    async def writer(self) -> None:
        """Sends what a full socket left behind, as room appears."""
        try:
            while True:
                await self._unblock.wait()
                self._unblock = trio.Event()
                while self.blocked and not self.broken:
                    await trio.lowlevel.wait_writable(self.sock)
                    self.blocked = False
                    self.flush()
        except (trio.ClosedResourceError, OSError):
            self.fail()

    async def drain(self) -> None:
        """Until every queued frame went to the socket (or the socket failed)."""
        while self.frames and not self.broken:
            await self._room.wait()


def close_socket(sock: socket.socket) -> None:
    """Close a socket trio may be waiting on (its waiters get ClosedResourceError)."""
    if sock.fileno() != -1:
        trio.lowlevel.notify_closing(sock)
        sock.close()
