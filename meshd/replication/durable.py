"""What ties replication to the store, shared by the driver and the simulation.

A change the core integrates is appended to the store (:func:`persist`); an ACK a peer asked
for waits in the :class:`AckGate` until everything appended before it is fsynced, so an ACK
always means "on disk here".
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from meshd.replication.core import Persist, Send


class Journal(Protocol):
    def append_update(self, doc: str, epoch: int, update: bytes) -> int: ...

    def append_drop(self, doc: str) -> int: ...


def persist(journal: Journal, out: Persist) -> int:
    """Append one change; returns the position (lsn) that makes it durable."""
    if out.update is None:
        return journal.append_drop(out.doc)
    return journal.append_update(out.doc, out.epoch, out.update)


class AckGate:
    """ACKs waiting for the disk, in order, bounded (beyond the limit the oldest is dropped:
    its writer counts the peer as silent and retries or times out)."""

    def __init__(self, limit: int = 65536) -> None:
        self.limit = limit
        self.dropped = 0
        self._held: deque[tuple[int, Send]] = deque()

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, lsn: int, send: Send) -> None:
        self._held.append((lsn, send))
        if len(self._held) > self.limit:
            self._held.popleft()
            self.dropped += 1

    def release(self, durable: int) -> list[Send]:
        """The ACKs whose changes are all on disk now."""
        out: list[Send] = []
        held = self._held
        while held and held[0][0] <= durable:
            out.append(held.popleft()[1])
        return out
