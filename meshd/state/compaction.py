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
   are set again; counters add the increments the snapshot missed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pycrdt import Doc, Map

from meshd.replication import vectors
from meshd.replication.core import DocEvent, Replicator, VectorReport
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
    Counters keep their totals (in the coordinator's slot) and texts stay texts."""
    marked = values.to_plain(replica.doc.get(values.ROOT, type=Map), marked=True)
    fresh: Doc[Any] = Doc()
    with fresh.transaction():
        root: Map[Any] = fresh.get(values.ROOT, type=Map)
        for key, value in marked.items():
            root[key] = values.to_crdt(_unmark(value), fresh)
        meta: Map[Any] = fresh.get(META, type=Map)
        meta[BASE_SV] = replica.sv
        meta[BASE_EPOCH] = replica.epoch
    return fresh


def _unmark(value: Any) -> Any:
    if isinstance(value, values.CounterInt):
        return {values.COUNTER: int(value)}
    if isinstance(value, values.TextStr):
        return {values.TEXT: str(value)}
    if isinstance(value, dict):
        return {k: _unmark(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unmark(v) for v in value]
    return value


def rebase_ops(old: Replica, new: Replica) -> list[dict[str, Any]]:
    """Operations re-applying what ``old`` holds beyond the snapshot ``new`` was built from."""
    meta: Map[Any] = new.doc.get(META, type=Map)
    base_sv = meta.get(BASE_SV)
    if not isinstance(base_sv, bytes | bytearray):
        return []
    try:
        base = vectors.decode(bytes(base_sv))
    except vectors.VectorError:
        return []
    if not vectors.has_news(old.vector, base):
        return []
    before = values.to_plain(old.doc.get(values.ROOT, type=Map), marked=True)
    after = values.to_plain(new.doc.get(values.ROOT, type=Map), marked=True)
    ops: list[dict[str, Any]] = []
    for key, value in before.items():
        current = after.get(key)
        if isinstance(value, values.CounterInt) and isinstance(current, values.CounterInt):
            if value != current:
                ops.append({"op": "incr", "path": [key], "by": int(value) - int(current)})
        elif current != value:
            ops.append({"op": "set", "path": [key], "value": _unmark(value)})
    # Deletions that raced: a key the new epoch has and the old copy lacks was deleted after
    # the snapshot, if the old copy held the whole snapshot and the new epoch holds only what
    # the compacting node wrote (otherwise the key may be a newer write made on the new epoch).
    if not vectors.has_news(base, old.vector) and len(new.vector) == 1:
        ops.extend({"op": "delete", "path": [key]} for key in after if key not in before)
    return ops


class Compactor:
    def __init__(
        self,
        replicator: Replicator,
        tuning: CompactionTuning,
        is_coordinator: Callable[[], bool],
        prefix: str,
    ) -> None:
        self.replicator = replicator
        self.tuning = tuning
        self.is_coordinator = is_coordinator
        self.prefix = prefix
        self.stats = CompactionStats()
        self.last_change: dict[str, float] = {}
        self._check: _Check | None = None
        self._next_check = 0.0

    def on_doc_event(self, event: DocEvent, now: float) -> None:
        if event.name.startswith(self.prefix):
            if event.kind == "dropped":
                self.last_change.pop(event.name, None)
            else:
                self.last_change[event.name] = now

    def candidates(self, now: float) -> list[Replica]:
        t = self.tuning
        out = []
        for replica in self.replicator.store:
            if not replica.name.startswith(self.prefix):
                continue
            if now - self.last_change.get(replica.name, 0.0) < t.quiet:
                continue
            size = replica.encoded_size()
            if size < t.min_bytes:
                continue
            fresh = len(fresh_copy(replica).get_update())
            if size >= t.ratio * fresh:
                out.append(replica)
        return out

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
            return
        found = self.candidates(now)
        if not found:
            return
        peers = self.replicator.peers
        docs = {r.name: (r.epoch, r.sv) for r in found}
        self.stats.checks += 1
        if not peers:
            self._compact_agreed(now, set(docs))
            return
        query = self.replicator.query(docs, peers)
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
            replica = self.replicator.store.get(name)
            if replica is None or now - self.last_change.get(name, 0.0) < self.tuning.quiet:
                continue
            before = replica.encoded_size()
            fresh = fresh_copy(replica)
            new = self.replicator.replace(name, replica.epoch + 1, fresh)
            self.stats.compactions += 1
            self.stats.bytes_before += before
            self.stats.bytes_after += new.encoded_size()
            self.last_change[name] = now
