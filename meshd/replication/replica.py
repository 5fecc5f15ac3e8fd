"""Replicas (a document with its identity) and the store that digests them.

A document is identified by name and *epoch*. A higher epoch replaces the document outright:
that is how a restarted node's fresh registry document supersedes its old one, and how a
compacted document supersedes its history-laden predecessor.

**Hot and cold** (docs/replication.md#memory-model). A replica is either *hot*, a live
pycrdt ``Doc``, or *cold*, its Yjs v1 encoding (``bytes``) and nothing else but its
canonical state vector and hash. A cold replica serves everything replication needs from
the encoding: its vector, what a peer lacks (``pycrdt.get_update(encoded, sv)``), its full
update, and it integrates remote updates by merging encodings (``merge_updates``) without
ever building a ``Doc``. Reading :attr:`Replica.doc` (or writing) materializes it; the
store's :class:`HotSet` keeps at most ``hot_documents`` replicas hot and evicts the least
recently used back to their encoding. A replica whose ``Doc`` someone follows (the registry
observes its documents' content) is *pinned*: never evicted.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from typing import Any, Final

from pycrdt import Doc, Map, Subscription, TransactionEvent, UndoManager, merge_updates
from pycrdt import get_state as state_of_update
from pycrdt import get_update as diff_update

from meshd.replication import vectors
from meshd.replication.tree import DigestTree, Key, NodeId, leaf_of

# A root map a write touches when it only deleted: deletions do not move the state vector, so
# without it a peer that missed a delete could not be told apart from one that holds it.
DELETE_MARK: Final = "replica:deletes"
# Remote updates kept because part of them waits for an update they build on (see apply).
MAX_PARKED: Final = 256
# The encoding of an empty document (no structs, empty delete set), and its state vector.
EMPTY_UPDATE: Final = b"\x00\x00"
EMPTY_STATE: Final = b"\x00"
# A cold replica's encoding is re-encoded through a scratch ``Doc`` once merged updates have
# grown it past twice its last normalized size plus this (merging keeps the content of
# items a later update deleted; a ``Doc`` garbage-collects it).
NORMALIZE_SLACK: Final = 1024
# The fewest hot documents a store keeps (a write or read may touch a few at once).
MIN_HOT: Final = 16
DEFAULT_HOT: Final = 1024


class UpdateRejected(ValueError):
    """An update that cannot be decoded; the document was not touched."""


def _scratch_apply_public(update: bytes) -> None:
    Doc().apply_update(update)


def _scratch_apply() -> Callable[[bytes], None]:
    """Applies an update to a scratch document. pycrdt's ``Doc`` wrapper costs about 10 µs
    to build (it sets up async primitives a scratch document never uses), half of what
    checking a small update costs, so the binding's document is used when it is there."""
    try:
        from pycrdt._pycrdt import Doc as RawDoc

        def apply(update: bytes) -> None:
            raw = RawDoc(None, False, None)
            txn = raw.create_transaction()
            try:
                raw.apply_update(txn, update)
            finally:
                txn.commit()
                txn.drop()

        apply(EMPTY_UPDATE)  # the binding still has this shape
    except Exception:  # another pycrdt: the public way
        return _scratch_apply_public
    return apply


_SCRATCH_APPLY: Final = _scratch_apply()


def check_update(update: bytes) -> bool:
    """Does ``update`` decode on its own? (A scratch document must accept it.)"""
    try:
        _SCRATCH_APPLY(update)
    except (ValueError, RuntimeError):
        return False
    return True


def _normalized(encoded: bytes) -> bytes:
    doc: Doc[Any] = Doc()
    doc.apply_update(encoded)
    return bytes(doc.get_update())


class Undo:
    """What it takes to withdraw one local write (:meth:`Replica.write_undoable`): an undo
    manager that captured that write's transaction alone (a private origin), over the root
    types the caller named. While one is outstanding its replica stays hot, since the
    manager belongs to that ``Doc``."""

    __slots__ = ("doc", "manager")

    def __init__(self, doc: Doc[Any], manager: UndoManager) -> None:
        self.doc = doc
        self.manager = manager


class Replica:
    """One document. Local writes go through :meth:`write`, which captures the exact delta
    (``Doc.get_update(sv)`` would also carry the whole delete set every time)."""

    __slots__ = (
        "_captured",
        "_doc",
        "_encoded",
        "_normal",
        "_parked",
        "_subscription",
        "epoch",
        "hash",
        "hot_set",
        "journal",
        "leaf",
        "name",
        "pinned",
        "sv",
        "undos",
    )

    def __init__(self, name: str, epoch: int, doc: Doc[Any] | None = None) -> None:
        self.name = name
        self.epoch = epoch
        self.leaf = leaf_of(name)
        # Called with every change the document integrates, local or remote, in order: the
        # store's log (set by the Replicator once the replica's initial content is in).
        self.journal: Callable[[Replica, bytes], None] | None = None
        self.pinned = False
        # Writes that may still be withdrawn (each holds an undo manager on the live Doc).
        self.undos = 0
        # The hot set of the store holding this replica (None while it is in none).
        self.hot_set: HotSet | None = None
        self._doc: Doc[Any] | None = None
        self._encoded: bytes | None = EMPTY_UPDATE
        self._normal = len(EMPTY_UPDATE)
        self._subscription: Subscription | None = None
        # The deltas of the write under way (None outside a write).
        self._captured: list[bytes] | None = None
        self._parked: list[bytes] | None = None
        self.sv = b""
        self.hash = 0
        if doc is not None:
            self._attach(doc)
            self.refresh()
        else:
            self.refresh(EMPTY_STATE)  # an empty document's vector is known

    def install(self, encoded: bytes) -> None:
        """Give a new, empty, cold replica its first content: an update checked already with
        :func:`check_update` (as a repair that creates a document brings it) — the encoding
        as it is, one vector and one hash, instead of a merge into the empty encoding."""
        assert self._doc is None and self._encoded == EMPTY_UPDATE
        if encoded == EMPTY_UPDATE:
            return
        self._encoded = encoded
        self._normal = len(encoded)
        self.refresh(bytes(state_of_update(encoded)))

    # ------------------------------------------------------------------ hot and cold

    @property
    def hot(self) -> bool:
        return self._doc is not None

    @property
    def doc(self) -> Doc[Any]:
        """The live document, materialized from the encoding if cold (and marked recently
        used). Change it only through :meth:`write`."""
        doc = self._doc
        if doc is None:
            doc = Doc()
            assert self._encoded is not None
            if self._encoded != EMPTY_UPDATE:
                doc.apply_update(self._encoded)
            self._attach(doc)
        if self.hot_set is not None:
            self.hot_set.touch(self)
        return doc

    def _attach(self, doc: Doc[Any]) -> None:
        self._doc = doc
        self._encoded = None
        self._subscription = doc.observe(self._on_transaction)

    def evict(self) -> bool:
        """Back to the encoding (False if pinned, cold already, or in a write)."""
        doc = self._doc
        if doc is None or self.pinned or self._captured is not None or self.undos:
            return False
        self._encoded = bytes(doc.get_update())
        self._normal = len(self._encoded)
        if self._subscription is not None:
            doc.unobserve(self._subscription)
        self._subscription = None
        self._doc = None
        self._parked = None  # the encoding holds what waits (a Doc keeps it pending)
        return True

    def pin(self) -> None:
        """Keep this replica hot for good: someone follows its ``Doc``."""
        self.pinned = True
        self.doc  # noqa: B018 (materializes it)
        if self.hot_set is not None:
            self.hot_set.discard(self)

    # ------------------------------------------------------------------ identity

    @property
    def vector(self) -> dict[int, int]:
        """The state vector, decoded (clients with a clock > 0)."""
        return vectors.decode(self.sv)

    def _on_transaction(self, event: TransactionEvent) -> None:
        if self._captured is not None:
            self._captured.append(event.update)
        if self.journal is not None:
            self.journal(self, event.update)

    def _state(self) -> bytes:
        if self._doc is not None:
            return bytes(self._doc.get_state())
        assert self._encoded is not None
        return bytes(state_of_update(self._encoded))

    def refresh(self, state: bytes | None = None) -> bool:
        """Recompute the state vector (from ``state``, the raw one, if given) and hash; True
        if they changed."""
        raw = self._state() if state is None else state
        # Canonical (equal vectors, equal bytes); one client with a clock > 0, as a document
        # one writer made, is canonical as pycrdt writes it.
        one_writer = raw[:1] == b"\x01" and raw[-1] != 0
        sv = raw if one_writer else vectors.encode(vectors.decode(raw))
        if sv == self.sv and self.hash:
            return False
        self.sv = sv
        digest = hashlib.blake2b(digest_size=8)
        digest.update(self.name.encode())
        digest.update(self.epoch.to_bytes(8, "big"))
        digest.update(sv)
        self.hash = int.from_bytes(digest.digest(), "big") or 1
        return True

    # ------------------------------------------------------------------ changes

    def write(self, mutate: Callable[[Doc[Any]], None]) -> bytes | None:
        """Run ``mutate`` in one transaction; returns the delta it produced (None if none)."""
        doc = self.doc

        def run() -> None:
            with doc.transaction(origin="local"):
                mutate(doc)

        return self._capture(run)

    def write_undoable(
        self, mutate: Callable[[Doc[Any]], None], roots: Collection[str]
    ) -> tuple[bytes | None, Undo]:
        """:meth:`write`, keeping what :meth:`withdraw` needs to take it back later: every
        change ``mutate`` makes must fall under the root types named in ``roots`` (an undo
        manager only sees the types it was given before the transaction). Pair it with
        :meth:`withdraw` or :meth:`settle`."""
        doc = self.doc
        scopes = []
        for root in roots:
            try:
                scopes.append(doc.get(root, type=Map))
            except (TypeError, ValueError):
                continue  # a root of another type (from a peer): nothing ours to undo there
        manager = UndoManager(scopes=scopes, capture_timeout_millis=0)
        origin = object()
        manager.include_origin(origin)
        self.undos += 1

        def run() -> None:
            with doc.transaction(origin=origin):
                mutate(doc)

        try:
            delta = self._capture(run)
        except BaseException:
            self.undos -= 1
            raise
        return delta, Undo(doc, manager)

    def withdraw(self, undo: Undo) -> bytes | None:
        """Take back the write ``undo`` captured, as a new local change (Yjs undo: it removes
        what that write inserted and restores what it overwrote, and leaves everyone
        else's changes alone); returns its delta. None if there is nothing to take back."""
        self.undos -= 1
        if undo.doc is not self._doc or not undo.manager.can_undo():
            return None
        return self._capture(undo.manager.undo)

    def settle(self, undo: Undo) -> None:
        """The write ``undo`` captured stays: forget how to take it back."""
        self.undos -= 1
        undo.manager.clear()

    def _capture(self, run: Callable[[], object]) -> bytes | None:
        doc = self.doc
        before = vectors.decode(doc.get_state())
        captured: list[bytes] = []
        self._captured = captured
        try:
            run()
            if captured and vectors.decode(doc.get_state()) == before:
                # Only deletions: they live in the delete set, which the state vector does not
                # reflect. One small write moves the vector, so anti-entropy, forwarding and
                # majority acks (which all compare vectors) see the change; the delta carries
                # both, and a repair (get_update(vector)) always carries the whole delete set.
                with doc.transaction(origin="local"):
                    doc.get(DELETE_MARK, type=Map)["at"] = True
        finally:
            self._captured = None
        self.refresh()
        if not captured:
            return None
        if len(captured) == 1:
            return captured[0]
        return bytes(merge_updates(*captured))

    def apply(self, update: bytes, *, checked: bool = False) -> bool:
        """Apply a remote update; True if the document learned something. ``checked``: the
        caller already validated it with :func:`check_update`."""
        # Validate first: a scratch document must accept the update on its own, so a
        # malformed update is refused before the real document is touched.
        if not checked and not check_update(update):
            raise UpdateRejected("update does not decode")
        if self._doc is None:
            return self._apply_cold(update)
        try:
            self._doc.apply_update(update)
        except (ValueError, RuntimeError) as exc:
            raise UpdateRejected(str(exc)) from None
        changed = self.refresh()
        if not self._holds(update):
            # Part of it waits for an update it builds on. Yrs keeps that part pending, but
            # once the gap fills it integrates only one level of what waits (pycrdt 0.14), so
            # it is offered again whenever the vector moves. Bounded: anti-entropy repairs
            # whatever is left, since the vector does not cover it.
            parked = self._parked if self._parked is not None else []
            parked.append(update)
            self._parked = parked[-MAX_PARKED:]
        if changed and self._parked:
            self._retry_parked()
        return changed

    def _apply_cold(self, update: bytes) -> bool:
        """Merge ``update`` into the encoding, no ``Doc`` built. The merged encoding keeps
        every struct, those that wait for an update they build on included; the vector read
        from it stops at the first gap of each client, as a ``Doc``'s would."""
        encoded = self._encoded
        assert encoded is not None
        try:
            merged = update if encoded == EMPTY_UPDATE else bytes(merge_updates(encoded, update))
            if merged == encoded:
                return False  # nothing new (merging what it holds gives the same bytes)
            normal = len(merged) if encoded == EMPTY_UPDATE else self._normal
            if len(merged) > 2 * normal + NORMALIZE_SLACK:
                merged = _normalized(merged)
                normal = len(merged)
            state = bytes(state_of_update(merged))
        except (ValueError, RuntimeError) as exc:
            raise UpdateRejected(str(exc)) from None
        self._encoded, self._normal = merged, max(normal, len(EMPTY_UPDATE))
        changed = self.refresh(state)
        if self.journal is not None:
            # The update as it came: replaying it onto what the log held gives this state.
            self.journal(self, update)
        return changed

    def _holds(self, update: bytes) -> bool:
        """Is every struct of ``update`` integrated here? (Its part beyond our vector holds no
        structs: a lib0 v1 update starts with its number of clients.)"""
        assert self._doc is not None
        try:
            return diff_update(update, self._doc.get_state())[:1] == b"\x00"
        except ValueError:
            return True

    def _retry_parked(self) -> None:
        while self._parked and self._doc is not None:
            for update in self._parked:
                self._doc.apply_update(update)
            self._parked = [u for u in self._parked if not self._holds(u)]
            if not self.refresh():
                return

    # ------------------------------------------------------------------ reading

    def missing_for(self, their_vector: dict[int, int], their_sv: bytes) -> bytes | None:
        """The update the holder of ``their_sv`` lacks, or None if it lacks nothing."""
        if not vectors.has_news(self.vector, their_vector):
            return None
        if self._doc is None:
            assert self._encoded is not None
            return bytes(diff_update(self._encoded, their_sv))
        return bytes(self._doc.get_update(their_sv))

    def full_update(self) -> bytes:
        if self._doc is None:
            assert self._encoded is not None
            return self._encoded
        return bytes(self._doc.get_update())

    def encoded_size(self) -> int:
        return len(self.full_update())

    def close(self) -> None:
        if self._doc is not None and self._subscription is not None:
            self._doc.unobserve(self._subscription)
            self._subscription = None
        if self.hot_set is not None:
            self.hot_set.discard(self)


class HotSet:
    """The replicas kept hot (a live ``Doc``), at most ``limit`` of them besides the pinned
    ones; the least recently used beyond that goes back to its encoding."""

    def __init__(self, limit: int = DEFAULT_HOT) -> None:
        self.limit = max(MIN_HOT, limit)
        self.evictions = 0
        self._lru: OrderedDict[int, Replica] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def touch(self, replica: Replica) -> None:
        if replica.pinned:
            return
        key = id(replica)
        if key in self._lru:
            self._lru.move_to_end(key)
            return
        self._lru[key] = replica
        while len(self._lru) > self.limit:
            _key, oldest = self._lru.popitem(last=False)
            if oldest.evict():
                self.evictions += 1
            elif not oldest.pinned and oldest.hot:
                # In a write (or one that may be withdrawn): it stays hot, back of the queue.
                self._lru[id(oldest)] = oldest
                break

    def discard(self, replica: Replica) -> None:
        self._lru.pop(id(replica), None)


class DocStore:
    """Every replica this node holds, with the digest tree kept up to date
    (:mod:`meshd.replication.tree`) and at most ``hot_documents`` of them hot."""

    def __init__(self, hot_documents: int = DEFAULT_HOT) -> None:
        self._replicas: dict[str, Replica] = {}
        self._hashes: dict[str, int] = {}
        # How many documents per kind (the name up to its first "/"), kept as they come and
        # go, so a metrics scrape costs nothing per document.
        self.kinds: dict[str, int] = {}
        self.tree = DigestTree()
        self.hot = HotSet(hot_documents)

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
        kind = replica.name.partition("/")[0]
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        self._hashes[replica.name] = replica.hash
        self.tree.insert(replica.leaf, replica.name, replica.hash)
        replica.hot_set = self.hot
        if replica.hot:
            self.hot.touch(replica)
        return old

    def remove(self, name: str) -> Replica | None:
        replica = self._replicas.pop(name, None)
        if replica is None:
            return None
        kind = name.partition("/")[0]
        left = self.kinds[kind] - 1
        if left:
            self.kinds[kind] = left
        else:
            del self.kinds[kind]
        self.tree.delete(replica.leaf, name, self._hashes.pop(name, 0))
        replica.close()
        replica.hot_set = None
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
