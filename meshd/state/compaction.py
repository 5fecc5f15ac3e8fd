"""Compaction of state documents whose encoding is dominated by history.

Yjs keeps a small tombstone for every overwritten or deleted item, so a document that churns
grows even when its content does not. Compaction rewrites it as a fresh document (a new
*epoch*) holding only the current content; replicas that see the higher epoch replace their
copy. Because item ids of the new epoch are unrelated to the old ones, replicas must not
diverge across the switch, so compaction is coordinated:

1. **One coordinator.** Only the live member with the lowest name compacts; every node holds
   every state document, so any node could, and this choice needs no agreement round.
2. **Only when worth it.** The encoded size is at least ``min_bytes`` and at least ``ratio``
   times the size of a fresh encoding of the same content.
3. **Only when quiet and agreed.** The document has not changed for ``quiet`` seconds, and
   every live peer answers a vector query with exactly the coordinator's epoch and state
   vector — so no replica holds a write the snapshot would miss.
4. **Writes that still race it are rebased.** A write made elsewhere after the agreement
   check but before the new epoch arrived is not in the snapshot. The new epoch records the
   state vector it was taken from; a replica whose old copy has operations beyond it
   re-applies the difference to the new epoch at key granularity (changed top-level values
   are set again) and carries every counter writer's newest total into the counter's slots
   (keyed by writer and clock, so replicas re-applying the same increments count them once).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pycrdt import Array, Doc, Map, Text

from meshd.replication import vectors
from meshd.replication.core import DocEvent, VectorReport
from meshd.replication.documents import Documents
from meshd.replication.replica import Replica
from meshd.state import values

META = "meta"
BASE_SV = "compacted_from_sv"
BASE_EPOCH = "compacted_from_epoch"


@dataclass(frozen=True, slots=True)
class CompactionTuning:
    check_interval: float = 60.0
    min_bytes: int = 64 * 1024
    ratio: float = 4.0
    quiet: float = 30.0
    agree_timeout: float = 10.0


@dataclass(slots=True)
class _Check:
    query: int
    started: float
    docs: dict[str, tuple[int, bytes]]  # our (epoch, sv) per candidate when asked
    waiting: set[str]
    disagree: set[str] = field(default_factory=set)


@dataclass(slots=True)
class CompactionStats:
    checks: int = 0
    compactions: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    rebases: int = 0


def fresh_copy(replica: Replica) -> Doc[Any]:
    """A new document with the replica's current content and a record of its origin.

    Counters keep their slot maps, with every writer's total carried over as of its clock
    (see :func:`values.slot_values`), texts stay texts, and the idempotency keys of ``once``
    writes and the retired counter names come along: they are content too."""
    source = replica.doc
    root_before: Map[Any] = source.get(values.ROOT, type=Map)
    fresh: Doc[Any] = Doc()
    with fresh.transaction():
        root: Map[Any] = fresh.get(values.ROOT, type=Map)
        for key, value in root_before.items():
            root[key] = _prelim(_portable(value))
        for name in values.counter_names(root_before):
            slots: Map[Any] = fresh.get(name, type=Map)
            for slot, total in _carried(source.get(name, type=Map), replica.vector).items():
                slots[slot] = total
        for name in (values.ONCE, values.RETIRED):
            _union(source, fresh, name)
        meta: Map[Any] = fresh.get(META, type=Map)
        meta[BASE_SV] = replica.sv
        meta[BASE_EPOCH] = replica.epoch
    return fresh


class _CounterRef(str):
    """A counter in a portable value: the name of its slot map."""

    __slots__ = ()


def _portable(value: Any) -> Any:
    """A document value as plain data that another document can hold as it is: counters as
    references to their slot maps, texts marked as texts. Equal portable values mean equal
    content (counts aside: those live in the slot maps)."""
    if isinstance(value, Map):
        if values.COUNTER in value:
            return _CounterRef(value.get(values.COUNTER))
        return {key: _portable(item) for key, item in value.items()}
    if isinstance(value, Array):
        return [_portable(item) for item in value]
    return values.to_plain(value, marked=True)


def _prelim(value: Any) -> Any:
    """A portable value as pycrdt prelim types."""
    if isinstance(value, _CounterRef):
        return Map({values.COUNTER: str(value)})
    if isinstance(value, values.TextStr):
        return Text(str(value))
    if isinstance(value, dict):
        return Map({key: _prelim(item) for key, item in value.items()})
    if isinstance(value, list):
        return Array([_prelim(item) for item in value])
    return value


def _carried(slots: Map[Any], vector: dict[int, int]) -> dict[str, float]:
    """A counter's slots as the next epoch holds them: each writer's newest total, keyed by
    the writer and its clock, so every replica carrying it writes the same key and value."""
    out: dict[str, float] = {}
    for writer, (seen, total) in values.slot_values(slots).items():
        clock = seen
        if clock == math.inf:  # a writer of this epoch: its clock is in the state vector
            client = writer[1:]
            if not (writer.startswith("c") and client.isdigit()):
                continue
            clock = vector.get(int(client), 0)
        out[f"{writer}@{int(clock)}"] = total
    return out


def _union(source: Doc[Any], target: Doc[Any], name: str) -> None:
    """Add the entries of root map ``name`` that ``target`` lacks (call in a transaction).
    Idempotency keys recorded per writer become plain keys: the new epoch's writers are
    others, and nothing recorded before it can be withdrawn any more."""
    have: Map[Any] = target.get(name, type=Map)
    for entry, value in source.get(name, type=Map).items():
        key = values.once_key(entry) if name == values.ONCE else entry
        if key not in have and not isinstance(value, Map | Array | Text):
            have[key] = value


@dataclass(slots=True)
class Rebase:
    """What a replica's old copy holds beyond the snapshot a new epoch was built from, to
    re-apply to the new epoch (:meth:`apply`, inside a write transaction).

    Top-level values that differ are set again (deleted ones deleted, when that is safe);
    counters are not compared by value: every writer's newest total is carried into the
    counter's slot map, which is idempotent, so increments the snapshot missed count once
    however many replicas re-apply them, and increments made on the new epoch meanwhile
    stay."""

    source: Doc[Any] = field(repr=False)
    sets: dict[str, Any] = field(default_factory=dict)  # top-level key → portable value
    deletes: list[str] = field(default_factory=list)
    slots: dict[str, dict[str, float]] = field(default_factory=dict)  # slot map → entries

    def __bool__(self) -> bool:
        return bool(self.sets or self.deletes or self.slots)

    def apply(self, doc: Doc[Any]) -> None:
        root: Map[Any] = doc.get(values.ROOT, type=Map)
        for key in self.deletes:
            if key in root:
                values.retire(doc, root[key])
                del root[key]
        for key, value in self.sets.items():
            if key in root:
                values.retire(doc, root[key], keep=frozenset(_refs(value)))
            root[key] = _prelim(value)
        live = values.counter_names(root)
        for name, entries in self.slots.items():
            if name not in live:
                continue  # the counter was deleted or replaced meanwhile
            slots: Map[Any] = doc.get(name, type=Map)
            have = values.slot_values(slots)
            for slot, total in entries.items():
                if _newer(slot, have):
                    slots[slot] = total
        for name in (values.ONCE, values.RETIRED):
            _union(self.source, doc, name)


def _refs(value: Any) -> set[str]:
    """The counters a portable value refers to."""
    if isinstance(value, _CounterRef):
        return {str(value)}
    if isinstance(value, dict):
        return set().union(*(_refs(item) for item in value.values()))
    if isinstance(value, list):
        return set().union(*(_refs(item) for item in value))
    return set()


def rebase(old: Replica, new: Replica) -> Rebase | None:
    """What ``old`` holds beyond the snapshot ``new`` was built from (None: nothing)."""
    meta: Map[Any] = new.doc.get(META, type=Map)
    base_sv = meta.get(BASE_SV)
    if not isinstance(base_sv, bytes | bytearray):
        return None
    try:
        base = vectors.decode(bytes(base_sv))
    except vectors.VectorError:
        return None
    if not vectors.has_news(old.vector, base):
        return None
    before_root: Map[Any] = old.doc.get(values.ROOT, type=Map)
    after_root: Map[Any] = new.doc.get(values.ROOT, type=Map)
    before = {key: _portable(value) for key, value in before_root.items()}
    after = {key: _portable(value) for key, value in after_root.items()}
    out = Rebase(old.doc)
    out.sets = {key: value for key, value in before.items() if after.get(key) != value}
    # Deletions that raced: a key the new epoch has and the old copy lacks was deleted after
    # the snapshot, if the old copy held the whole snapshot and the new epoch holds only what
    # the compacting node wrote (otherwise the key may be a newer write made on the new epoch).
    if not vectors.has_news(base, old.vector) and len(new.vector) == 1:
        out.deletes = [key for key in after if key not in before]
    for name in values.counter_names(before_root):
        have = values.slot_values(new.doc.get(name, type=Map))
        entries = {
            slot: total
            for slot, total in _carried(old.doc.get(name, type=Map), old.vector).items()
            if _newer(slot, have)
        }
        if entries:
            out.slots[name] = entries
    return out if out else None


def _newer(slot: str, have: dict[str, tuple[float, float]]) -> bool:
    """Is carried entry ``slot`` (``writer@clock``) newer than what ``have`` holds for it?"""
    writer, _, clock = slot.partition("@")
    return writer not in have or have[writer][0] < int(clock)


class Compactor:
    def __init__(
        self,
        docs: Documents,
        tuning: CompactionTuning,
        is_coordinator: Callable[[], bool],
        prefix: str,
    ) -> None:
        self.docs = docs
        self.tuning = tuning
        self.is_coordinator = is_coordinator
        self.prefix = prefix
        self.stats = CompactionStats()
        # When each document waiting in _dirty last changed (forgotten with it: memory follows
        # the documents changed lately, not every document).
        self.last_change: dict[str, float] = {}
        # Documents changed since they were last examined: a check looks at these only, so
        # its cost follows the changes, not the number of documents. Seeded once with every
        # document (those read back from the store at start).
        self._dirty: set[str] = set()
        self._seeded = False
        # Only the coordinator examines documents, so only it tracks their changes (as it
        # learns at each check); one that becomes coordinator seeds with every document.
        self._coordinating = True
        self._check: _Check | None = None
        self._next_check = 0.0

    def on_doc_event(self, event: DocEvent, now: float) -> None:
        if self._coordinating and event.name.startswith(self.prefix):
            if event.kind == "dropped":
                self._forget(event.name)
            else:
                self.last_change[event.name] = now
                self._dirty.add(event.name)

    @property
    def pending(self) -> int:
        """Documents waiting to be examined (changed since they last were)."""
        return len(self._dirty)

    def candidates(self, now: float) -> list[Replica]:
        """The changed documents that are quiet, large and mostly history. Examined documents
        that are not candidates are forgotten until they change again; candidates stay until
        a compaction replaces them."""
        t = self.tuning
        if not self._seeded:
            self._seeded = True
            self._dirty.update(r.name for r in self.docs.store if r.name.startswith(self.prefix))
        out = []
        for name in sorted(self._dirty):
            replica = self.docs.store.get(name)
            if replica is None:
                self._forget(name)
                continue
            if now - self.last_change.get(name, 0.0) < t.quiet:
                continue
            size = replica.encoded_size()
            if size >= t.min_bytes and size >= t.ratio * len(fresh_copy(replica).get_update()):
                out.append(replica)
            else:
                self._forget(name)
        return out

    def _forget(self, name: str) -> None:
        self._dirty.discard(name)
        self.last_change.pop(name, None)

    def tick(self, now: float) -> None:
        check = self._check
        if check is not None:
            if now - check.started > self.tuning.agree_timeout:
                self._check = None  # someone did not answer: try again next interval
            return
        if now < self._next_check:
            return
        self._next_check = now + self.tuning.check_interval
        if not self.is_coordinator():
            if self._coordinating:
                # Another node examines documents now: forget them, and seed again with
                # every document if this node becomes coordinator once more.
                self._coordinating = False
                self._seeded = False
                self._dirty.clear()
                self.last_change.clear()
            return
        self._coordinating = True
        found = self.candidates(now)
        if not found:
            return
        peers = self.docs.peers
        docs = {r.name: (r.epoch, r.sv) for r in found}
        self.stats.checks += 1
        if not peers:
            self._compact_agreed(now, set(docs))
            return
        query = self.docs.query(docs, peers)
        self._check = _Check(query, now, docs, set(peers))

    def on_report(self, report: VectorReport, now: float) -> None:
        check = self._check
        if check is None or report.query != check.query or report.peer not in check.waiting:
            return
        check.waiting.discard(report.peer)
        for name, ours in check.docs.items():
            if report.vectors.get(name) != ours:
                check.disagree.add(name)
        if not check.waiting:
            self._check = None
            self._compact_agreed(now, set(check.docs) - check.disagree)

    def _compact_agreed(self, now: float, names: set[str]) -> None:
        for name in sorted(names):
            replica = self.docs.store.get(name)
            if replica is None or now - self.last_change.get(name, 0.0) < self.tuning.quiet:
                continue
            before = replica.encoded_size()
            fresh = fresh_copy(replica)
            new = self.docs.replace(name, replica.epoch + 1, fresh)
            self.stats.compactions += 1
            self.stats.bytes_before += before
            self.stats.bytes_after += new.encoded_size()
            self.last_change[name] = now
