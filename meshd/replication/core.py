"""The replication protocol, sans IO.

Fast path: a local write's delta is queued and, after a short coalescing delay, pushed to
``push_fanout`` random live peers; a peer that learns something from a push forwards it to
``push_fanout`` others while hops remain (rumor mongering). Slow path: every
``anti_entropy_interval`` the node runs a round with a random peer:

    TREE (hash and count of digest-tree nodes, the 16 level-1 nodes first)  →
    NODES (the peer's hash and count of those that differ), descending while they differ →
    LIST (the differing ranges, from a key)  →  PAGE (the peer's vectors there, bounded)  →
    SYNC (updates the peer lacks, vectors of what we lack)  →  UPDATES (what we lacked),
    then the next page, until the ranges are done

so any divergence — a lost push, a partition, a fresh node — is repaired in one round with
that peer, at the cost of a few hundred bytes when nothing differs and O(differences × tree
depth) otherwise; every message is bounded (paged), whatever the number of documents.

Every change a document integrates — a local write, a push, a repair, a new epoch — comes
out as one :class:`Persist` output, in order, for the store's log; a dropped document as a
``Persist`` without an update. An ACK a peer asked for (``majority`` writes) is marked
``durable``: the driver sends it only once everything persisted before it is fsynced, so an
ACK means "on disk here".

``majority`` counts the **reference membership** (every member that has not left:
alive, suspect and dead-but-not-reaped, see :mod:`meshd.membership.reference`), not the
members that look alive: a side of a partition that declared the rest dead is still a
minority. A write pushes the delta to the live peers asking for an ACK with the peer's state
vector; a peer counts once its vector covers the write (otherwise it is sent the missing
part). A member that comes back while the write waits is sent it too. The write completes
when a majority of the reference (this node included) hold it, or fails at the deadline
naming how many did.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pycrdt import Doc

from meshd.rejections import Rejections
from meshd.replication import paging, vectors
from meshd.replication.messages import (
    MAX_DOCS_PER_MESSAGE,
    MAX_RANGES_PER_MESSAGE,
    Ack,
    Chunk,
    Cursor,
    DocUpdate,
    DocVector,
    ListRange,
    Message,
    Nodes,
    Page,
    Push,
    Query,
    Sync,
    Tree,
    TreeNode,
    Updates,
    Vectors,
)
from meshd.replication.replica import (
    DEFAULT_HOT,
    DocStore,
    Replica,
    Undo,
    UpdateRejected,
    check_update,
)
from meshd.replication.tree import LEAF_LEVEL, NodeId, children
from meshd.timers import TimerHeap

EMPTY_SV = b"\x00"
Durability = Literal["local", "majority"]
DocEventKind = Literal["opened", "replaced", "updated", "dropped"]


@dataclass(frozen=True, slots=True)
class ReplicationTuning:
    # Peers a writer pushes to in larger clusters; None: ⌈ln n⌉ + 3, enough that the rumor
    # reaches nearly everyone before anti-entropy has to repair it.
    push_fanout: int | None = None
    push_hops: int = 3
    # Up to this many peers a writer pushes to all of them directly (one hop, no forwarding):
    # cheaper and faster than rumor mongering in small clusters.
    push_all_up_to: int = 32
    # Repair updates are applied at most this many bytes per work() call, so a node catching
    # up on a large registry keeps answering probes and API calls in between.
    repair_slice_bytes: int = 1 << 20
    # ... and for at most this long (seconds of CPU on the event loop) per slice.
    work_slice: float = 0.005
    push_delay: float = 0.005
    anti_entropy_interval: float = 1.0
    # A round that makes no progress for this long fails; rounds with that peer then back
    # off, doubling from anti_entropy_interval up to repair_backoff_max.
    round_timeout: float = 10.0
    repair_backoff_max: float = 60.0
    # Paging (docs/replication.md#paging): documents per PAGE, SYNC or UPDATES message, and
    # bytes of vectors or updates per message (one larger update travels alone).
    page_docs: int = 1000
    page_bytes: int = 4 << 20
    # The most documents a message from a peer may carry (the decoder's bound).
    max_docs_per_message: int = MAX_DOCS_PER_MESSAGE
    # Digest-tree nodes per TREE message, and the size under which a differing subtree is
    # listed instead of descended into.
    tree_nodes: int = 1024
    list_below: int = 16
    # How long a listing with one peer keeps this node from listing with another (a fresh
    # node is filled once, from one peer).
    listing_hold: float = 2.0
    majority_timeout: float = 5.0
    majority_repairs: int = 3
    # Documents kept hot (a live pycrdt Doc) besides the pinned ones; the rest are kept
    # encoded (docs/replication.md#memory-model). ``[storage] hot_documents``.
    hot_documents: int = DEFAULT_HOT


@dataclass(frozen=True, slots=True)
class Send:
    peer: str
    message: Message
    # Send only once everything persisted before it is on disk (an ACK: "I hold it").
    durable: bool = False


@dataclass(frozen=True, slots=True)
class Persist:
    """A change to keep: ``update`` integrated into ``doc`` at ``epoch`` (an empty update
    records a new epoch), or, with ``update`` None, the document was dropped."""

    doc: str
    epoch: int
    update: bytes | None


@dataclass(frozen=True, slots=True)
class DocEvent:
    kind: DocEventKind
    name: str
    local: bool = False


@dataclass(frozen=True, slots=True)
class VectorReport:
    """A peer's answer to :meth:`Replicator.query`: its (epoch, state vector) per document."""

    query: int
    peer: str
    vectors: dict[str, tuple[int, bytes]]


@dataclass(frozen=True, slots=True)
class WriteDone:
    token: int
    ok: bool
    acked: tuple[str, ...]
    needed: int
    total: int


@dataclass(frozen=True, slots=True)
class RepairStalled:
    """Rounds with ``peer`` stopped making progress (its answers are lost or it refuses our
    messages): it is left alone for ``backoff`` seconds, doubling while it lasts."""

    peer: str
    backoff: float


Output = Send | DocEvent | WriteDone | VectorReport | Persist | RepairStalled
AcceptPolicy = Callable[[str, int], bool]


@dataclass(slots=True)
class ReplicationStats(Rejections):
    pushes_sent: int = 0
    pushes_received: int = 0
    pushes_forwarded: int = 0
    deltas_applied: int = 0
    bytes_pushed: int = 0
    rounds_started: int = 0
    rounds_completed: int = 0
    rounds_failed: int = 0
    rounds_busy: int = 0
    pages_sent: int = 0
    pages_received: int = 0
    pages_busy: int = 0
    round_bytes_sent: int = 0  # encoded TREE … UPDATES messages (counted by the driver)
    frames_dropped: int = 0  # frames a full link queue refused; repaired by a round
    repair_updates_sent: int = 0
    repair_bytes_sent: int = 0
    repair_updates_received: int = 0
    repair_bytes_received: int = 0
    docs_replaced: int = 0
    stale_epochs: int = 0
    majority_ok: int = 0
    majority_failed: int = 0
    withdrawn: int = 0  # undoable majority writes taken back after they failed
    withdraw_failed: int = 0  # ... that could not be (the document was replaced meanwhile)


@dataclass(slots=True)
class _Majority:
    doc: str
    epoch: int
    update: bytes
    required: dict[int, int]
    needed: int  # acks needed from peers (this node holds the write)
    total: int
    members: set[str]  # the reference at the time of the write, this node excluded
    possible: set[str]  # reference members that may still ack
    waiting: set[str]  # those the write was sent to
    acked: set[str] = field(default_factory=set)
    repairs: dict[str, int] = field(default_factory=dict)
    done: bool = False


@dataclass(slots=True)
class _Round:
    """An anti-entropy round this node started: the tree descent, then the paged listing of
    the ranges that differ."""

    peer: str
    started: float  # of the last progress
    frontier: deque[NodeId]  # digest-tree nodes still to compare
    sent: list[NodeId] = field(default_factory=list)  # those of the TREE in flight
    ranges: list[NodeId] = field(default_factory=list)  # differing ranges still to list
    batch: tuple[NodeId, ...] = ()  # the ranges being listed
    cursor: Cursor | None = None  # the listing's position
    next: Cursor | None = None  # where to resume once the wanted updates came
    wants: dict[str, DocVector] = field(default_factory=dict)
    phase: Literal["tree", "list", "want"] = "tree"


def covers(vector: dict[int, int], required: dict[int, int]) -> bool:
    return all(vector.get(client, 0) >= clock for client, clock in required.items())


class Replicator:
    """The replication protocol, sans IO: pushes, anti-entropy rounds, majority writes,
    vector queries.

    Owns: every replica (``store``), the pending pushes, repair rounds, majority writes under
    way, the peer and reference sets it is given. Emits every integrated change as a
    :class:`Persist` output and everything else as outputs too; it never does I/O, and
    nothing outside the replication driver should change a replica directly."""

    def __init__(
        self,
        *,
        node: str,
        tuning: ReplicationTuning,
        rng: random.Random,
        now: float,
        accept: AcceptPolicy | None = None,
        on_open: Callable[[Replica], None] | None = None,
        on_drop: Callable[[str], None] | None = None,
        on_replaced: Callable[[Replica, Replica], None] | None = None,
    ) -> None:
        self.node = node
        self.tuning = tuning
        self.rng = rng
        self.store = DocStore(tuning.hot_documents)
        self.stats = ReplicationStats()
        self.accept: AcceptPolicy = accept or (lambda _name, _epoch: True)
        # Called with every new replica (or new epoch) before anything is applied to it, so
        # an owner can subscribe to its content and see the first update as changes.
        self.on_open: Callable[[Replica], None] = on_open or (lambda _replica: None)
        self.on_drop: Callable[[str], None] = on_drop or (lambda _name: None)
        # Called after a remote update installed a new epoch of a document we held, with the
        # replica it replaced (state documents rebase writes that raced a compaction).
        self.on_replaced: Callable[[Replica, Replica], None] = on_replaced or (
            lambda _old, _new: None
        )
        self._query_seq = 0
        self._peers: list[str] = []
        # The reference membership majority writes count (this node included); None while
        # the node does not know its cluster (majority writes then fail at once). Until an
        # owner sets it, every member ever seen live counts.
        self._reference: frozenset[str] | None = frozenset({node})
        self._reference_set = False
        self._outputs: list[Output] = []
        self._timers = TimerHeap()
        self._pending_push: dict[str, tuple[int, list[bytes]]] = {}  # name → (epoch, deltas)
        self._flush_at: float | None = None
        self._token = 0
        self._majority: dict[int, _Majority] = {}
        # Undoable majority writes whose outcome is not settled yet (token -> replica, undo).
        self._undos: dict[int, tuple[Replica, Undo]] = {}
        self._rounds: dict[int, _Round] = {}
        self._backoff: dict[str, tuple[int, float]] = {}  # peer → (failures, until)
        # The fill under way: (peer, last progress, whether this node started the round).
        self._listing: tuple[str, float, bool] | None = None
        self._repair_soon: set[str] = set()  # peers a frame to was dropped
        self._round_seq = rng.getrandbits(31)
        self._last_requested = -math.inf
        self._repairs: deque[DocUpdate] = deque()
        # One bound method for every replica's journal (not one object per document).
        self._journal_hook: Callable[[Replica, bytes], None] = self._journal
        self._at(now + tuning.anti_entropy_interval * self.rng.random(), self._anti_entropy, None)

    # ------------------------------------------------------------------ plumbing

    def _at(self, when: float, fn: Callable[[float, Any], None], arg: Any) -> None:
        self._timers.at(when, fn, arg)

    def next_deadline(self) -> float:
        return self._timers.next_deadline()

    def tick(self, now: float) -> None:
        self._timers.run(now)

    def take_outputs(self) -> list[Output]:
        out, self._outputs = self._outputs, []
        return out

    def _send(self, peer: str, message: Message) -> None:
        self._outputs.append(Send(peer, message))

    def _sample(self, k: int, exclude: set[str] | None = None) -> list[str]:
        pool = [p for p in self._peers if not exclude or p not in exclude]
        return self.rng.sample(pool, min(k, len(pool)))

    # ------------------------------------------------------------------ peers & documents

    @property
    def peers(self) -> list[str]:
        return list(self._peers)

    def set_peers(self, peers: Iterable[str]) -> None:
        """The live members (other than this node) to replicate with."""
        self._peers = sorted(p for p in set(peers) if p != self.node)
        live = set(self._peers)
        if not self._reference_set and self._reference is not None:
            self._reference |= live
        for round_id, rnd in list(self._rounds.items()):
            if rnd.peer not in live:  # gone: its round will not finish
                self._end_round(round_id, rnd)
        for peer in list(self._backoff):
            if peer not in live:
                del self._backoff[peer]
        for token, pending in list(self._majority.items()):
            # A member that went down still counts (it may come back before the deadline);
            # one of the reference that is back, or new, is sent the write.
            pending.waiting &= live
            for peer in self._peers:
                if (
                    peer in pending.possible
                    and peer not in pending.waiting
                    and peer not in pending.acked
                ):
                    pending.waiting.add(peer)
                    self._push_majority(token, pending, peer)

    @property
    def reference(self) -> frozenset[str] | None:
        return self._reference

    def set_reference(self, members: Iterable[str] | None) -> None:
        """The reference membership (every member that has not left, this node included),
        or None while this node does not know its cluster. A member removed from it (reaped,
        or removed by an operator) stops counting for writes that wait."""
        self._reference_set = True
        self._reference = None if members is None else frozenset(members) | {self.node}
        if self._reference is None:
            return
        for token, pending in list(self._majority.items()):
            # Members that joined meanwhile do not raise the bar; those that left lower it.
            gone = pending.members - self._reference
            if not gone:
                continue
            pending.members -= gone
            pending.possible -= gone
            pending.waiting -= gone
            pending.acked -= gone
            pending.total = len(pending.members) + 1
            pending.needed = pending.total // 2
            if len(pending.acked) >= pending.needed:
                self._finish_majority(token, pending, ok=True)
            elif len(pending.acked) + len(pending.possible - pending.acked) < pending.needed:
                self._finish_majority(token, pending, ok=False)

    def _new_replica(
        self, name: str, epoch: int, doc: Doc[Any] | None = None, *, encoded: bytes | None = None
    ) -> Replica:
        """A replica the store's log follows from its first change on. Its epoch (and any
        content ``doc`` or ``encoded`` brings) is persisted first. ``on_open`` sees it before
        ``encoded`` is in: whoever follows a document (the registry) hears of that content
        as a change, as of any later one."""
        replica = Replica(name, epoch, doc)
        self.on_open(replica)
        content = replica.full_update() if doc is not None else b""
        if encoded is not None:
            if replica.hot:
                replica.apply(encoded, checked=True)  # followed: its observers see it
            else:
                replica.install(encoded)
            content = encoded
        self._outputs.append(Persist(name, epoch, content))
        replica.journal = self._journal_hook
        return replica

    def _journal(self, replica: Replica, update: bytes) -> None:
        self._outputs.append(Persist(replica.name, replica.epoch, update))

    def load(self, name: str, epoch: int, updates: list[bytes]) -> Replica | None:
        """Install a document read back from this node's store (at start, before any peer
        is heard): not persisted again, not pushed. None if the updates do not decode."""
        if not updates:
            update = b""
        elif len(updates) == 1:
            update = updates[0]
        else:
            from pycrdt import merge_updates

            try:
                update = bytes(merge_updates(*updates))
            except (ValueError, RuntimeError):
                self.stats.reject("bad_stored_update")
                return None
        replica = Replica(name, epoch)
        self.on_open(replica)
        if update:
            try:
                # Checksummed on our own disk and validated when it first arrived.
                replica.apply(update, checked=True)
            except UpdateRejected:
                self.stats.reject("bad_stored_update")
                replica.close()
                return None
        replica.journal = self._journal_hook
        self.store.add(replica)
        self._outputs.append(DocEvent("opened", name))
        return replica

    def open(self, name: str, epoch: int = 0) -> Replica:
        """This node's replica of ``name``, created empty if missing (or if older)."""
        replica = self.store.get(name)
        if replica is not None and replica.epoch >= epoch:
            return replica
        replica = self._new_replica(name, epoch)
        replaced = self.store.add(replica)
        self._outputs.append(DocEvent("replaced" if replaced else "opened", name, local=True))
        return replica

    def replace(self, name: str, epoch: int, doc: Doc[Any]) -> Replica:
        """Install ``doc`` as a new epoch of ``name`` (compaction, a fresh node document)."""
        replica = self._new_replica(name, epoch, doc)
        replaced = self.store.add(replica)
        self._outputs.append(DocEvent("replaced" if replaced else "opened", name, local=True))
        self._queue_push(replica, replica.full_update())
        return replica

    def drop(self, name: str) -> None:
        if self.store.remove(name) is not None:
            self._pending_push.pop(name, None)
            self._outputs.append(Persist(name, 0, None))
            self.on_drop(name)
            self._outputs.append(DocEvent("dropped", name))

    # ------------------------------------------------------------------ local writes

    def write(
        self,
        now: float,
        name: str,
        mutate: Callable[[Doc[Any]], None],
        *,
        epoch: int = 0,
        durability: Durability = "local",
        undo_roots: Collection[str] | None = None,
    ) -> int | None:
        """Apply a local change. Returns a token for ``majority`` writes (a WriteDone output
        follows), else None. With ``undo_roots`` (the root types ``mutate`` changes), a
        ``majority`` write can be withdrawn: :meth:`settle` it once its outcome is known."""
        replica = self.open(name, epoch)
        undo: Undo | None = None
        if undo_roots is not None and durability == "majority":
            delta, undo = replica.write_undoable(mutate, undo_roots)
        else:
            delta = replica.write(mutate)
        self._changed_locally(now, replica, delta, push=durability == "local")
        if durability == "local":
            return None
        token = self._start_majority(now, replica, delta)
        if undo is not None:
            self._undos[token] = (replica, undo)
        return token

    def settle(self, now: float, token: int, *, keep: bool) -> str | None:
        """The outcome of an undoable ``majority`` write is known: keep it, or withdraw it (its
        undo is a new local change, logged and pushed like any write, so it follows the
        write wherever that went). Returns the document's name if something was withdrawn."""
        entry = self._undos.pop(token, None)
        if entry is None:
            return None
        replica, undo = entry
        if keep:
            replica.settle(undo)
            return None
        if self.store.get(replica.name) is not replica:
            # Replaced by a newer epoch (a compaction carried the write over): it stays.
            replica.settle(undo)
            self.stats.withdraw_failed += 1
            return None
        delta = replica.withdraw(undo)
        if delta is None:
            return None
        self.stats.withdrawn += 1
        self._changed_locally(now, replica, delta, push=True)
        return replica.name

    def _changed_locally(
        self, now: float, replica: Replica, delta: bytes | None, *, push: bool
    ) -> None:
        self.store.rehash(replica)
        if delta is None:
            return
        self._outputs.append(DocEvent("updated", replica.name, local=True))
        if push:
            self._queue_push(replica, delta, now)

    def _queue_push(self, replica: Replica, delta: bytes, now: float | None = None) -> None:
        epoch, deltas = self._pending_push.get(replica.name, (replica.epoch, []))
        if epoch != replica.epoch:
            deltas = []  # deltas of a replaced epoch: they mean nothing to the new one
        deltas.append(delta)
        self._pending_push[replica.name] = (replica.epoch, deltas)
        if self._flush_at is None:
            self._flush_at = (now or 0.0) + self.tuning.push_delay
            self._at(self._flush_at, self._flush_pushes, None)

    def _flush_pushes(self, now: float, _arg: object) -> None:
        self._flush_at = None
        pending, self._pending_push = self._pending_push, {}
        for name, (epoch, deltas) in pending.items():
            replica = self.store.get(name)
            if replica is None or replica.epoch != epoch:
                continue  # dropped, or replaced by a newer epoch since the write
            if len(deltas) == 1:
                update = deltas[0]
            else:
                from pycrdt import merge_updates

                update = bytes(merge_updates(*deltas))
            if len(self._peers) <= self.tuning.push_all_up_to:
                targets, hops = self._peers, 0
            else:
                targets, hops = self._sample(self._fanout()), self.tuning.push_hops
            for peer in targets:
                self.stats.pushes_sent += 1
                self.stats.bytes_pushed += len(update)
                self._send(peer, Push(name, replica.epoch, update, 0, hops))

    def _fanout(self) -> int:
        if self.tuning.push_fanout is not None:
            return self.tuning.push_fanout
        return math.ceil(math.log(max(2, len(self._peers)))) + 3

    def _start_majority(self, now: float, replica: Replica, delta: bytes | None) -> int:
        self._token += 1
        token = self._token
        update = delta if delta is not None else replica.full_update()
        if self._reference is None:
            # No cluster to count a majority of: fail now (total 0 says why).
            pending = _Majority(replica.name, replica.epoch, update, {}, 0, 0, set(), set(), set())
            self._majority[token] = pending
            self._finish_majority(token, pending, ok=False)
            if delta is not None:
                self._queue_push(replica, delta, now)
            return token
        total = len(self._reference)
        needed = total // 2 + 1 - 1  # acks needed from peers; this node holds the write
        others = set(self._reference) - {self.node}
        live = others & set(self._peers)
        pending = _Majority(
            replica.name,
            replica.epoch,
            update,
            dict(replica.vector),
            needed,
            total,
            set(others),
            set(others),
            live,
        )
        self._majority[token] = pending
        if needed <= 0:
            self._finish_majority(token, pending, ok=True)
            if delta is not None:
                self._queue_push(replica, delta, now)
            return token
        for peer in sorted(live):
            self._push_majority(token, pending, peer)
        # Live peers outside the reference (not yet in it) hear of it as of any write.
        if delta is not None:
            for peer in self._peers:
                if peer not in others:
                    self._send(peer, Push(replica.name, replica.epoch, delta, 0, 0))
        self._at(now + self.tuning.majority_timeout, self._majority_deadline, token)
        return token

    def _push_majority(self, token: int, pending: _Majority, peer: str) -> None:
        self.stats.pushes_sent += 1
        self.stats.bytes_pushed += len(pending.update)
        self._send(peer, Push(pending.doc, pending.epoch, pending.update, token, 0))

    def _finish_majority(self, token: int, pending: _Majority, *, ok: bool) -> None:
        if pending.done:
            return
        pending.done = True
        self._majority.pop(token, None)
        if ok:
            self.stats.majority_ok += 1
        else:
            self.stats.majority_failed += 1
        acked = (self.node, *sorted(pending.acked))
        self._outputs.append(WriteDone(token, ok, acked, pending.needed + 1, pending.total))

    def _majority_deadline(self, now: float, token: int) -> None:
        pending = self._majority.get(token)
        if pending is not None:
            self._finish_majority(token, pending, ok=False)

    # ------------------------------------------------------------------ inbound

    def handle(self, now: float, peer: str, message: Message) -> None:
        if isinstance(message, Push):
            self._on_push(now, peer, message)
        elif isinstance(message, Ack):
            self._on_ack(peer, message)
        elif isinstance(message, Tree):
            self._on_tree(peer, message)
        elif isinstance(message, Nodes):
            self._on_nodes(now, peer, message)
        elif isinstance(message, ListRange):
            self._on_list(now, peer, message)
        elif isinstance(message, Page):
            self._on_page(now, peer, message)
        elif isinstance(message, Sync):
            self._on_sync(now, peer, message)
        elif isinstance(message, Updates):
            self._on_updates(now, peer, message)
        elif isinstance(message, Query):
            self._on_query(peer, message)
        elif isinstance(message, Vectors):
            vectors_by_doc = {d.doc: (d.epoch, d.sv) for d in message.docs}
            self._outputs.append(VectorReport(message.query, peer, vectors_by_doc))
        elif isinstance(message, Chunk):
            self.stats.reject("unexpected_chunk")  # the driver reassembles chunks

    def _target(
        self, name: str, epoch: int, update: bytes
    ) -> tuple[Replica | None, DocEventKind | None, Replica | None]:
        """The replica an incoming update for (name, epoch) should go to, creating or
        replacing it as the epochs say (None if the update is stale, refused or malformed),
        how, and the replica it replaced."""
        replica = self.store.get(name)
        if replica is None:
            if not self.accept(name, epoch):
                self.stats.reject("doc_refused")
                return None, None, None
            if not check_update(update):  # before anything is created
                self.stats.reject("bad_update")
                return None, None, None
            # Created holding the update (one vector, one hash, one log record): the
            # common case of a join, where every document arrives this way.
            replica = self._new_replica(name, epoch, encoded=update)
            self.store.add(replica)
            return replica, "opened", None
        if epoch < replica.epoch:
            self.stats.stale_epochs += 1
            return None, None, None
        if epoch > replica.epoch:
            if not self.accept(name, epoch):
                self.stats.reject("doc_refused")
                return None, None, None
            if not check_update(update):  # the current epoch stays
                self.stats.reject("bad_update")
                return None, None, None
            self.stats.docs_replaced += 1
            old = replica
            replica = self._new_replica(name, epoch)
            self.store.add(replica)
            return replica, "replaced", old
        return replica, None, None

    def _apply(self, name: str, epoch: int, update: bytes) -> tuple[Replica | None, bool]:
        replica, created, old = self._target(name, epoch, update)
        if replica is None:
            return None, False
        try:
            # _target validated the update already when it created or replaced a document;
            # a created one holds it already.
            changed = created == "opened" or replica.apply(update, checked=created is not None)
        except UpdateRejected:
            self.stats.reject("bad_update")
            if created is not None and replica.sv == EMPTY_SV:
                self.drop(name)
            return None, False
        self.store.rehash(replica)
        if old is not None:
            self.on_replaced(old, replica)
        if created is not None:
            self._outputs.append(DocEvent(created, name))
        elif changed:
            self._outputs.append(DocEvent("updated", name))
        if changed:
            self.stats.deltas_applied += 1
        return replica, changed or created is not None

    def _on_push(self, now: float, peer: str, msg: Push) -> None:
        self.stats.pushes_received += 1
        replica, changed = self._apply(msg.doc, msg.epoch, msg.update)
        if msg.ack:
            ok = replica is not None
            ack = Ack(msg.ack, ok, replica.sv if replica is not None else b"")
            self._outputs.append(Send(peer, ack, durable=ok))
        if changed and msg.hops > 0 and replica is not None:
            for target in self._sample(self._fanout(), {peer}):
                self.stats.pushes_forwarded += 1
                self._send(target, Push(msg.doc, msg.epoch, msg.update, 0, msg.hops - 1))

    def _on_ack(self, peer: str, msg: Ack) -> None:
        pending = self._majority.get(msg.ack)
        if pending is None or peer not in pending.waiting:
            return
        try:
            their = vectors.decode(msg.sv) if msg.ok else None
        except vectors.VectorError:
            their = None
        if their is not None and covers(their, pending.required):
            pending.waiting.discard(peer)
            pending.acked.add(peer)
            if len(pending.acked) >= pending.needed:
                self._finish_majority(msg.ack, pending, ok=True)
            return
        replica = self.store.get(pending.doc)
        attempts = pending.repairs.get(peer, 0)
        if their is None or replica is None or attempts >= self.tuning.majority_repairs:
            # This peer cannot hold it (refused, or it keeps lacking what the write builds
            # on): it no longer counts as possible.
            pending.waiting.discard(peer)
            pending.possible.discard(peer)
            if len(pending.acked) + len(pending.possible - pending.acked) < pending.needed:
                self._finish_majority(msg.ack, pending, ok=False)
            return
        # The peer lacks something the write depends on: send it what it misses.
        pending.repairs[peer] = attempts + 1
        missing = replica.missing_for(their, msg.sv) or replica.full_update()
        self._send(peer, Push(pending.doc, replica.epoch, missing, msg.ack, 0))

    # ------------------------------------------------------------------ vector queries

    def query(self, docs: Iterable[str], peers: Iterable[str]) -> int:
        """Ask ``peers`` for their state vectors of ``docs``; VectorReport outputs follow."""
        self._query_seq += 1
        names = tuple(docs)
        for peer in peers:
            self._send(peer, Query(self._query_seq, names))
        return self._query_seq

    def _on_query(self, peer: str, msg: Query) -> None:
        found = tuple(
            DocVector(r.name, r.epoch, r.sv)
            for r in (self.store.get(name) for name in msg.docs)
            if r is not None
        )
        self._send(peer, Vectors(msg.query, found))

    # ------------------------------------------------------------------ anti-entropy

    def _anti_entropy(self, now: float, _arg: object) -> None:
        interval = self.tuning.anti_entropy_interval
        self._at(now + interval * (0.75 + 0.5 * self.rng.random()), self._anti_entropy, None)
        for round_id, rnd in list(self._rounds.items()):
            if now - rnd.started > self.tuning.round_timeout:
                self._end_round(round_id, rnd)
                self._round_failed(now, rnd.peer)
        if any(now - rnd.started < 2 * interval for rnd in self._rounds.values()):
            # One round of our own at a time while it makes progress: a large repair is not
            # joined by more. A round that went quiet (its peer restarting, a frame lost)
            # does not hold the others back until it times out.
            return
        busy = {rnd.peer for rnd in self._rounds.values()}
        ready = [
            p
            for p in self._peers
            if p not in busy and self._backoff.get(p, (0, -math.inf))[1] <= now
        ]
        self._repair_soon.intersection_update(self._peers)
        owed = sorted(self._repair_soon.intersection(ready))
        if owed:
            peer = self.rng.choice(owed)
            self._repair_soon.discard(peer)
            self.sync_with(now, peer)
        elif ready:
            self.sync_with(now, self.rng.choice(ready))

    def request_sync(self, now: float, peer: str) -> None:
        """An extra round with ``peer`` (it just joined or came back), at most one such round
        per ``push_delay`` burst so a heal that brings back many members at once costs one."""
        if (
            peer not in self._peers
            or now - self._last_requested < self.tuning.anti_entropy_interval / 4
        ):
            return
        self._backoff.pop(peer, None)
        self._last_requested = now
        self.sync_with(now, peer)

    def frame_dropped(self, now: float, peer: str) -> None:
        """A frame to ``peer`` was refused by its full link queue: counted, and repaired by
        a round with that peer at the next anti-entropy tick (not at once: the queue is
        full). A round of ours with that peer is abandoned (not counted as failed)."""
        self.stats.frames_dropped += 1
        self._repair_soon.add(peer)
        for round_id, rnd in list(self._rounds.items()):
            if rnd.peer == peer:
                # Its next message may be the one that was dropped: start over next tick
                # rather than wait round_timeout for an answer that cannot come.
                self._end_round(round_id, rnd)

    def sync_with(self, now: float, peer: str) -> None:
        """Start an anti-entropy round with ``peer`` (also used on join and heal)."""
        self._round_seq = (self._round_seq + 1) & 0x7FFFFFFF
        rnd = _Round(peer, now, deque(children(0, 0)))
        self._rounds[self._round_seq] = rnd
        self.stats.rounds_started += 1
        self._send_tree(self._round_seq, rnd)

    def _round(self, now: float, peer: str, round_id: int, phase: str) -> _Round | None:
        rnd = self._rounds.get(round_id)
        if rnd is None or rnd.peer != peer or rnd.phase != phase:
            self.stats.reject("unexpected_round")
            return None
        rnd.started = now  # progress
        if self._listing is not None and self._listing[0] == peer and self._listing[2]:
            self._listing = (peer, now, True)
        return rnd

    def _end_round(self, round_id: int, rnd: _Round) -> None:
        self._rounds.pop(round_id, None)
        self._release_listing(rnd.peer)

    def _complete_round(self, round_id: int, rnd: _Round) -> None:
        self._end_round(round_id, rnd)
        self._backoff.pop(rnd.peer, None)
        self.stats.rounds_completed += 1

    def _round_failed(self, now: float, peer: str) -> None:
        """No progress for ``round_timeout`` (lost, or refused by the peer): back off from
        it, doubling, and say so once."""
        failures = self._backoff.get(peer, (0, 0.0))[0] + 1
        delay = min(self.tuning.anti_entropy_interval * 2**failures, self.tuning.repair_backoff_max)
        self._backoff[peer] = (failures, now + delay)
        self.stats.rounds_failed += 1
        if failures == 1:
            self._outputs.append(RepairStalled(peer, delay))

    # -- listing slot: a listing of several pages (a fill) runs with one peer at a time;
    #    one-page listings (the usual repair) never wait for it

    def _listing_busy(self, now: float, peer: str, *, mine: bool) -> bool:
        """Is this node in a fill other than the one with ``peer`` in this direction
        (``mine``: a round this node started)?"""
        held = self._listing
        if held is None or now - held[1] >= self.tuning.listing_hold:
            return False
        return held[0] != peer or held[2] != mine

    def _release_listing(self, peer: str) -> None:
        if self._listing is not None and self._listing[0] == peer and self._listing[2]:
            self._listing = None

    # -- the tree descent (initiator sends TREE, responder answers NODES)

    def _send_tree(self, round_id: int, rnd: _Round) -> None:
        batch = [
            rnd.frontier.popleft() for _ in range(min(len(rnd.frontier), self.tuning.tree_nodes))
        ]
        rnd.sent = batch
        nodes = tuple(TreeNode(lv, i, *self.store.node(lv, i)) for lv, i in batch)
        self._send(rnd.peer, Tree(round_id, nodes))

    def _on_tree(self, peer: str, msg: Tree) -> None:
        differing = []
        for n in msg.nodes:
            mine = self.store.node(n.level, n.index)
            if mine != (n.hash, n.count):
                differing.append(TreeNode(n.level, n.index, *mine))
        self._send(peer, Nodes(msg.round, tuple(differing)))

    def _on_nodes(self, now: float, peer: str, msg: Nodes) -> None:
        rnd = self._round(now, peer, msg.round, "tree")
        if rnd is None:
            return
        theirs = {(n.level, n.index): n for n in msg.nodes}
        for level, index in rnd.sent:
            other = theirs.get((level, index))
            if other is None:
                continue  # the responder agrees
            mine_hash, mine_count = self.store.node(level, index)
            if (mine_hash, mine_count) == (other.hash, other.count):
                continue  # repaired meanwhile
            if level == LEAF_LEVEL or min(mine_count, other.count) <= self.tuning.list_below:
                rnd.ranges.append((level, index))
            else:
                rnd.frontier.extend(children(level, index))
        rnd.sent = []
        if rnd.frontier:
            self._send_tree(msg.round, rnd)
        else:
            self._next_batch(now, msg.round, rnd)

    # -- paged listing (initiator sends LIST, responder answers PAGE; then SYNC / UPDATES)

    def _limits(self) -> paging.Limits:
        return paging.Limits(self.tuning.page_docs, self.tuning.page_bytes)

    def _next_batch(self, now: float, round_id: int, rnd: _Round) -> None:
        if not rnd.ranges:
            self._complete_round(round_id, rnd)
            return
        if self._listing_busy(now, rnd.peer, mine=True):
            # Being filled by (or filling) another peer: one stream at a time.
            self.stats.rounds_busy += 1
            self._end_round(round_id, rnd)
            return
        rnd.ranges.sort()
        rnd.batch = tuple(rnd.ranges[:MAX_RANGES_PER_MESSAGE])
        del rnd.ranges[:MAX_RANGES_PER_MESSAGE]
        self._list_from(round_id, rnd, None)

    def _list_from(self, round_id: int, rnd: _Round, after: Cursor | None) -> None:
        rnd.phase = "list"
        rnd.cursor = after
        self._send(rnd.peer, ListRange(round_id, rnd.batch, after))

    def _on_list(self, now: float, peer: str, msg: ListRange) -> None:
        if self._listing_busy(now, peer, mine=False):
            self.stats.pages_busy += 1
            self._send(peer, Page(msg.round, (), None, busy=True))
            return
        docs, end = paging.page(self.store, list(msg.ranges), msg.after, self._limits())
        if msg.after is not None or end is not None:
            # A listing of several pages, or the initiator streaming more than one message
            # of updates here: a fill, which no other peer joins while it makes progress.
            self._listing = (peer, now, False)
        self.stats.pages_sent += 1
        self._send(peer, Page(msg.round, tuple(docs), end))

    def _on_page(self, now: float, peer: str, msg: Page) -> None:
        rnd = self._round(now, peer, msg.round, "list")
        if rnd is None:
            return
        if msg.busy:
            self.stats.rounds_busy += 1
            self._end_round(msg.round, rnd)
            return
        if msg.end is not None and rnd.cursor is not None and msg.end <= rnd.cursor:
            self.stats.reject("page_no_progress")  # a page must move forward
            self._end_round(msg.round, rnd)
            self._round_failed(now, peer)
            return
        self.stats.pages_received += 1
        if msg.end is not None:
            self._listing = (peer, now, True)  # a listing of several pages: one at a time
        result = paging.compare(
            self.store,
            list(rnd.batch),
            rnd.cursor,
            msg.docs,
            msg.end,
            self._limits(),
            self.accept,
        )
        for _ in result.refused:
            self.stats.reject("page_out_of_range")
        for _ in range(result.bad_vectors):
            self.stats.reject("bad_vector")
        self.stats.repair_updates_sent += len(result.updates)
        self.stats.repair_bytes_sent += sum(len(u.update) for u in result.updates)
        if result.updates or result.want:
            self._send(peer, Sync(msg.round, tuple(result.updates), tuple(result.want)))
        if result.want:
            rnd.phase = "want"
            rnd.wants = {w.doc: w for w in result.want}
            rnd.next = result.next
            return
        self._advance(now, msg.round, rnd, result.next)

    def _advance(self, now: float, round_id: int, rnd: _Round, after: Cursor | None) -> None:
        if after is not None:
            self._list_from(round_id, rnd, after)
        else:
            self._next_batch(now, round_id, rnd)

    def _on_sync(self, now: float, peer: str, msg: Sync) -> None:
        full = len(msg.updates) >= self.tuning.page_docs or (
            sum(len(u.update) for u in msg.updates) >= self.tuning.page_bytes // 2
        )
        held = self._listing
        if (held is not None and held[0] == peer and not held[2]) or (
            full and not self._listing_busy(now, peer, mine=False)
        ):
            # An initiator streaming more than one message of updates here: a fill.
            self._listing = (peer, now, False)
        for u in msg.updates:
            self._receive_repair(u)
        if not msg.want:  # the initiator wants nothing: no answer
            return
        replies, bad = paging.answer(self.store, msg.want, self._limits())
        for _ in range(bad):
            self.stats.reject("bad_vector")
        self.stats.repair_updates_sent += len(replies)
        self.stats.repair_bytes_sent += sum(len(u.update) for u in replies)
        self._send(peer, Updates(msg.round, tuple(replies)))

    def _on_updates(self, now: float, peer: str, msg: Updates) -> None:
        rnd = self._round(now, peer, msg.round, "want")
        if rnd is None:
            return
        for u in msg.updates:
            self._receive_repair(u)
            rnd.wants.pop(u.doc, None)
        if rnd.wants and msg.updates:
            # The answer filled its bounds: ask for the rest.
            rest = tuple(rnd.wants.values())[: self.tuning.page_docs]
            self._send(peer, Sync(msg.round, (), rest))
            return
        rnd.wants = {}
        self._advance(now, msg.round, rnd, rnd.next)

    def _receive_repair(self, u: DocUpdate) -> None:
        self.stats.repair_updates_received += 1
        self.stats.repair_bytes_received += len(u.update)
        self._repairs.append(u)

    def pending_work(self) -> bool:
        """Repair updates received but not applied yet (see :meth:`work`)."""
        return bool(self._repairs)

    def work(self, now: float, spent: Callable[[], bool] | None = None) -> None:
        """Apply queued repair updates, at most ``repair_slice_bytes`` at a time (at least
        one), and stop early once ``spent()`` says the caller's time slice is used up: the
        driver yields between calls so a large catch-up never stalls membership."""
        budget = self.tuning.repair_slice_bytes
        while self._repairs and budget > 0:
            u = self._repairs.popleft()
            budget -= len(u.update)
            self._apply(u.doc, u.epoch, u.update)
            if spent is not None and spent():
                return
