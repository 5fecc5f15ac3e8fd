"""Replicas (a pycrdt document with its identity) and the store that digests them.

A document is identified by name and *epoch*. A higher epoch replaces the document outright:
that is how a restarted node's fresh registry document supersedes its old one, and how a
compacted document supersedes its history-laden predecessor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any, Final

from pycrdt import Doc, Map, TransactionEvent
from pycrdt import get_update as diff_update

from meshd.replication import vectors
from meshd.replication.tree import DigestTree, Key, NodeId, leaf_of

# A root map a write touches when it only deleted: deletions do not move the state vector, so
# without it a peer that missed a delete could not be told apart from one that holds it.
DELETE_MARK: Final = "replica:deletes"
# Remote updates kept because part of them waits for an update they build on (see apply).
MAX_PARKED: Final = 256


class UpdateRejected(ValueError):
    """An update that cannot be decoded; the document was not touched."""


def check_update(update: bytes) -> bool:
    """Does ``update`` decode on its own? (A scratch document must accept it.)"""
    try:
        Doc().apply_update(update)
    except (ValueError, RuntimeError):
        return False
    return True


class Replica:
    """One document. Local writes go through :meth:`write`, which captures the exact delta
    (``Doc.get_update(sv)`` would also carry the whole delete set every time)."""

    def __init__(self, name: str, epoch: int, doc: Doc[Any] | None = None) -> None:
        self.name = name
        self.epoch = epoch
        self.doc: Doc[Any] = doc if doc is not None else Doc()
        self.leaf = leaf_of(name)
        self._captured: list[bytes] = []
        self._capturing = False
        # Called with every change the document integrates, local or remote, in order: the
        # store's log (set by the Replicator once the replica's initial content is in).
        self.journal: Callable[[Replica, bytes], None] | None = None
        self._parked: list[bytes] = []
        self._subscription = self.doc.observe(self._on_transaction)
        self.sv = b""
        self.vector: dict[int, int] = {}
        self.hash = 0
        self.refresh()

    def _on_transaction(self, event: TransactionEvent) -> None:
        if self._capturing:
            self._captured.append(event.update)
        if self.journal is not None:
            self.journal(self, event.update)

    def refresh(self) -> bool:
        """Recompute the state vector and hash; True if they changed."""
        vector = vectors.decode(self.doc.get_state())
        sv = vectors.encode(vector)  # canonical: equal vectors, equal bytes on every replica
        if sv == self.sv and self.hash:
            return False
        self.sv = sv
        self.vector = {client: clock for client, clock in vector.items() if clock > 0}
        digest = hashlib.blake2b(digest_size=8)
        digest.update(self.name.encode())
        digest.update(self.epoch.to_bytes(8, "big"))
        digest.update(sv)
        self.hash = int.from_bytes(digest.digest(), "big") or 1
        return True

    def write(self, mutate: Callable[[Doc[Any]], None]) -> bytes | None:
        """Run ``mutate`` in one transaction; returns the delta it produced (None if none)."""
        before = vectors.decode(self.doc.get_state())
        self._captured = []
        self._capturing = True
        try:
            with self.doc.transaction(origin="local"):
                mutate(self.doc)
            if self._captured and vectors.decode(self.doc.get_state()) == before:
                # Only deletions: they live in the delete set, which the state vector does not
                # reflect. One small write moves the vector, so anti-entropy, forwarding and
                # majority acks (which all compare vectors) see the change; the delta carries
                # both, and a repair (get_update(vector)) always carries the whole delete set.
                with self.doc.transaction(origin="local"):
                    self.doc.get(DELETE_MARK, type=Map)["at"] = True
        finally:
            self._capturing = False
        captured, self._captured = self._captured, []
        self.refresh()
        if not captured:
            return None
        if len(captured) == 1:
            return captured[0]
        from pycrdt import merge_updates

        return bytes(merge_updates(*captured))

    def apply(self, update: bytes, *, checked: bool = False) -> bool:
        """Apply a remote update; True if the document learned something. ``checked``: the
        caller already validated it with :func:`check_update`."""
        # Validate first: a scratch document must accept the update on its own, so a
        # malformed update is refused before the real document is touched.
        if not checked and not check_update(update):
            raise UpdateRejected("update does not decode")
        try:
            self.doc.apply_update(update)
        except (ValueError, RuntimeError) as exc:
            raise UpdateRejected(str(exc)) from None
        changed = self.refresh()
        if not self._holds(update):
            # Part of it waits for an update it builds on. Yrs keeps that part pending, but
            # once the gap fills it integrates only one level of what waits (pycrdt 0.14), so
            # it is offered again whenever the vector moves. Bounded: anti-entropy repairs
            # whatever is left, since the vector does not cover it.
            self._parked.append(update)
            del self._parked[:-MAX_PARKED]
        if changed and self._parked:
            self._retry_parked()
        return changed

    def _holds(self, update: bytes) -> bool:
        """Is every struct of ``update`` integrated here? (Its part beyond our vector holds no
        structs: a lib0 v1 update starts with its number of clients.)"""
        try:
            return diff_update(update, self.doc.get_state())[:1] == b"\x00"
        except ValueError:
            return True

    def _retry_parked(self) -> None:
        while self._parked:
            for update in self._parked:
                self.doc.apply_update(update)
            self._parked = [u for u in self._parked if not self._holds(u)]
            if not self.refresh():
                return

    def missing_for(self, their_vector: dict[int, int], their_sv: bytes) -> bytes | None:
        """The update the holder of ``their_sv`` lacks, or None if it lacks nothing."""
        if not vectors.has_news(self.vector, their_vector):
            return None
        return bytes(self.doc.get_update(their_sv))

    def full_update(self) -> bytes:
        return bytes(self.doc.get_update())

    def encoded_size(self) -> int:
        return len(self.doc.get_update())

    def close(self) -> None:
        self.doc.unobserve(self._subscription)


class DocStore:
    """Every replica this node holds, with the digest tree kept up to date
    (:mod:`meshd.replication.tree`)."""

    def __init__(self) -> None:
        self._replicas: dict[str, Replica] = {}
        self._hashes: dict[str, int] = {}
        self.tree = DigestTree()

    def __len__(self) -> int:
        return len(self._replicas)

    def __iter__(self) -> Iterator[Replica]:
        return iter(self._replicas.values())

    def get(self, name: str) -> Replica | None:
        return self._replicas.get(name)

    def add(self, replica: Replica) -> Replica | None:
        """Insert (or replace) a replica; returns the one it replaced."""
        old = self._replicas.get(replica.name)
        if old is not None:
            self.remove(old.name)
        self._replicas[replica.name] = replica
        self._hashes[replica.name] = replica.hash
        self.tree.insert(replica.leaf, replica.name, replica.hash)
        return old

    def remove(self, name: str) -> Replica | None:
        replica = self._replicas.pop(name, None)
        if replica is None:
            return None
        self.tree.delete(replica.leaf, name, self._hashes.pop(name, 0))
        replica.close()
        return replica

    def rehash(self, replica: Replica) -> None:
        old = self._hashes.get(replica.name)
        if old is None or self._replicas.get(replica.name) is not replica:
            return
        self.tree.rehash(replica.leaf, old, replica.hash)
        self._hashes[replica.name] = replica.hash

    def digest(self) -> bytes:
        """The level-1 hashes (16 × 8 bytes): equal stores, equal digests."""
        return self.tree.level(1)

    def node(self, level: int, index: int) -> tuple[int, int]:
        return self.tree.node(level, index)

    def listing(
        self, nodes: list[NodeId], after: Key | None = None, until: Key | None = None
    ) -> Iterator[Replica]:
        """The replicas under ``nodes`` with ``after < key <= until``, in key order."""
        for _leaf, name in self.tree.keys(nodes, after, until):
            yield self._replicas[name]
