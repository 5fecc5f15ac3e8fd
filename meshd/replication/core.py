"""The replication protocol, sans IO.

Fast path: a local write's delta is queued and, after a short coalescing delay, pushed to
``push_fanout`` random live peers; a peer that learns something from a push forwards it to
``push_fanout`` others while hops remain (rumor mongering). Slow path: every
``anti_entropy_interval`` the node runs a round with a random peer:

    DIGEST (XOR hash per bucket of documents)  →
    BUCKETS (the peer's state vectors in the buckets that differ)  →
    SYNC (updates the peer lacks, vectors of what we lack)  →
    UPDATES (what we lacked)

so any divergence — a lost push, a partition, a fresh node — is repaired in one round with
that peer, at the cost of one 2 KiB digest when nothing differs.

``majority`` writes push the delta to every live peer asking for an ACK that carries the
peer's state vector; a peer counts once its vector covers the write (otherwise it is sent
the missing part), and the write completes when a majority of the live members (this node
included) hold it, or fails at the deadline naming how many did.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pycrdt import Doc

from meshd.replication import vectors
from meshd.replication.messages import (
    Ack,
    Buckets,
    Chunk,
    Digest,
    DocUpdate,
    DocVector,
    Message,
    Push,
    Query,
    Sync,
    Updates,
    Vectors,
)
from meshd.replication.replica import DocStore, Replica, UpdateRejected, check_update

EMPTY_SV = b"\x00"
MAX_SYNC_BYTES = 32 << 20  # one SYNC/UPDATES message; the rest waits for the next round
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
    push_delay: float = 0.005
    anti_entropy_interval: float = 1.0
    round_timeout: float = 10.0
    majority_timeout: float = 5.0
    majority_repairs: int = 3


@dataclass(frozen=True, slots=True)
class Send:
    peer: str
    message: Message


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


Output = Send | DocEvent | WriteDone | VectorReport
AcceptPolicy = Callable[[str, int], bool]


@dataclass(slots=True)
class ReplicationStats:
    pushes_sent: int = 0
    pushes_received: int = 0
    pushes_forwarded: int = 0
    deltas_applied: int = 0
    bytes_pushed: int = 0
    rounds_started: int = 0
    rounds_completed: int = 0
    repair_updates_sent: int = 0
    repair_bytes_sent: int = 0
    repair_updates_received: int = 0
    repair_bytes_received: int = 0
    docs_replaced: int = 0
    stale_epochs: int = 0
    majority_ok: int = 0
    majority_failed: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


@dataclass(slots=True)
class _Majority:
    doc: str
    required: dict[int, int]
    needed: int
    total: int
    waiting: set[str]
    acked: set[str] = field(default_factory=set)
    repairs: dict[str, int] = field(default_factory=dict)
    done: bool = False


@dataclass(slots=True)
class _Round:
    peer: str
    started: float


def covers(vector: dict[int, int], required: dict[int, int]) -> bool:
    return all(vector.get(client, 0) >= clock for client, clock in required.items())


class Replicator:
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
    ) -> None:
        self.node = node
        self.tuning = tuning
        self.rng = rng
        self.store = DocStore()
        self.stats = ReplicationStats()
        self.accept: AcceptPolicy = accept or (lambda _name, _epoch: True)
        # Called with every new replica (or new epoch) before anything is applied to it, so
        # an owner can subscribe to its content and see the first update as changes.
        self.on_open: Callable[[Replica], None] = on_open or (lambda _replica: None)
        self.on_drop: Callable[[str], None] = on_drop or (lambda _name: None)
        # Called after a remote update installed a new epoch of a document we held, with the
        # replica it replaced (state documents rebase writes that raced a compaction).
        self.on_replaced: Callable[[Replica, Replica], None] = lambda _old, _new: None
        self._query_seq = 0
        self._peers: list[str] = []
        self._outputs: list[Output] = []
        self._timers: list[tuple[float, int, Callable[[float, Any], None], Any]] = []
        self._timer_seq = 0
        self._pending_push: dict[str, tuple[int, list[bytes]]] = {}  # name → (epoch, deltas)
        self._flush_at: float | None = None
        self._token = 0
        self._majority: dict[int, _Majority] = {}
        self._rounds: dict[int, _Round] = {}
        self._round_seq = rng.getrandbits(31)
        self._last_requested = -math.inf
        self._repairs: deque[DocUpdate] = deque()
        self._at(now + tuning.anti_entropy_interval * self.rng.random(), self._anti_entropy, None)

    # ------------------------------------------------------------------ plumbing

    def _at(self, when: float, fn: Callable[[float, Any], None], arg: Any) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (when, self._timer_seq, fn, arg))

    def next_deadline(self) -> float:
        return self._timers[0][0] if self._timers else math.inf

    def tick(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            _, _, fn, arg = heapq.heappop(self._timers)
            fn(now, arg)

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
        for token, pending in list(self._majority.items()):
            # A peer that died will never answer: stop waiting, so failure is reported early
            # when the majority has become impossible.
            pending.waiting &= set(self._peers)
            if len(pending.acked) + len(pending.waiting) < pending.needed and not pending.done:
                self._finish_majority(token, pending, ok=False)

    def open(self, name: str, epoch: int = 0) -> Replica:
        """This node's replica of ``name``, created empty if missing (or if older)."""
        replica = self.store.get(name)
        if replica is not None and replica.epoch >= epoch:
            return replica
        replica = Replica(name, epoch)
        self.on_open(replica)
        replaced = self.store.add(replica)
        self._outputs.append(DocEvent("replaced" if replaced else "opened", name, local=True))
        return replica

    def replace(self, name: str, epoch: int, doc: Doc[Any]) -> Replica:
        """Install ``doc`` as a new epoch of ``name`` (compaction, a fresh node document)."""
        replica = Replica(name, epoch, doc)
        self.on_open(replica)
        replaced = self.store.add(replica)
        self._outputs.append(DocEvent("replaced" if replaced else "opened", name, local=True))
        self._queue_push(replica, replica.full_update())
        return replica

    def drop(self, name: str) -> None:
        if self.store.remove(name) is not None:
            self._pending_push.pop(name, None)
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
    ) -> int | None:
        """Apply a local change. Returns a token for ``majority`` writes (a WriteDone output
        follows), else None."""
        replica = self.open(name, epoch)
        delta = replica.write(mutate)
        self.store.rehash(replica)
        if delta is not None:
            self._outputs.append(DocEvent("updated", name, local=True))
        if durability == "local":
            if delta is not None:
                self._queue_push(replica, delta, now)
            return None
        return self._start_majority(now, replica, delta)

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
        total = len(self._peers) + 1
        needed = total // 2 + 1 - 1  # acks needed from peers; this node holds the write
        pending = _Majority(replica.name, dict(replica.vector), needed, total, set(self._peers))
        self._majority[token] = pending
        if needed <= 0:
            self._finish_majority(token, pending, ok=True)
            if delta is not None:
                self._queue_push(replica, delta, now)
            return token
        update = delta if delta is not None else replica.full_update()
        for peer in self._peers:
            self.stats.pushes_sent += 1
            self.stats.bytes_pushed += len(update)
            self._send(peer, Push(replica.name, replica.epoch, update, token, 0))
        self._at(now + self.tuning.majority_timeout, self._majority_deadline, token)
        return token

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
        elif isinstance(message, Digest):
            self._on_digest(peer, message)
        elif isinstance(message, Buckets):
            self._on_buckets(now, peer, message)
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
            replica = Replica(name, epoch)
            self.on_open(replica)
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
            replica = Replica(name, epoch)
            self.on_open(replica)
            self.store.add(replica)
            return replica, "replaced", old
        return replica, None, None

    def _apply(self, name: str, epoch: int, update: bytes) -> tuple[Replica | None, bool]:
        replica, created, old = self._target(name, epoch, update)
        if replica is None:
            return None, False
        try:
            # _target validated the update already when it created or replaced a document.
            changed = replica.apply(update, checked=created is not None)
        except UpdateRejected:
            self.stats.reject("bad_update")
            if created is not None and replica.doc.get_state() == EMPTY_SV:
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
            self._send(peer, Ack(msg.ack, ok, replica.sv if replica is not None else b""))
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
            pending.waiting.discard(peer)
            if len(pending.acked) + len(pending.waiting) < pending.needed:
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
                del self._rounds[round_id]
        if not self._peers:
            return
        self.sync_with(now, self.rng.choice(self._peers))

    def request_sync(self, now: float, peer: str) -> None:
        """An extra round with ``peer`` (it just joined or came back), at most one such round
        per ``push_delay`` burst so a heal that brings back many members at once costs one."""
        if (
            peer not in self._peers
            or now - self._last_requested < self.tuning.anti_entropy_interval / 4
        ):
            return
        self._last_requested = now
        self.sync_with(now, peer)

    def sync_with(self, now: float, peer: str) -> None:
        """Start an anti-entropy round with ``peer`` (also used on join and heal)."""
        self._round_seq = (self._round_seq + 1) & 0x7FFFFFFF
        self._rounds[self._round_seq] = _Round(peer, now)
        self.stats.rounds_started += 1
        self._send(peer, Digest(self._round_seq, self.store.digest()))

    def _on_digest(self, peer: str, msg: Digest) -> None:
        differing = self.store.differing(msg.buckets)
        docs = tuple(DocVector(r.name, r.epoch, r.sv) for r in self.store.in_buckets(differing))
        self._send(peer, Buckets(msg.round, docs, tuple(differing)))

    def _on_buckets(self, now: float, peer: str, msg: Buckets) -> None:
        rnd = self._rounds.get(msg.round)
        if rnd is None or rnd.peer != peer:
            self.stats.reject("unexpected_round")
            return
        theirs = {d.doc: d for d in msg.docs}
        updates: list[DocUpdate] = []
        want: list[DocVector] = []
        budget = MAX_SYNC_BYTES
        for replica in self.store.in_buckets(list(msg.buckets)):
            other = theirs.pop(replica.name, None)
            update: bytes | None = None
            if other is None or other.epoch < replica.epoch:
                update = replica.full_update()
            elif other.epoch > replica.epoch:
                want.append(DocVector(replica.name, other.epoch, EMPTY_SV))
            else:
                try:
                    their_vector = vectors.decode(other.sv)
                except vectors.VectorError:
                    self.stats.reject("bad_vector")
                    continue
                update = replica.missing_for(their_vector, other.sv)
                if vectors.has_news(their_vector, replica.vector):
                    want.append(DocVector(replica.name, replica.epoch, replica.sv))
            # One update larger than the whole budget still travels (alone), or that
            # document could never be repaired.
            if update is not None and (len(update) <= budget or not updates):
                budget -= len(update)
                updates.append(DocUpdate(replica.name, replica.epoch, update))
        want.extend(  # documents only the peer has
            DocVector(other.doc, other.epoch, EMPTY_SV)
            for other in theirs.values()
            if self.accept(other.doc, other.epoch)
        )
        self.stats.repair_updates_sent += len(updates)
        self.stats.repair_bytes_sent += sum(len(u.update) for u in updates)
        if updates or want:
            self._send(peer, Sync(msg.round, tuple(updates), tuple(want)))
        if not want:
            del self._rounds[msg.round]
            self.stats.rounds_completed += 1

    def _on_sync(self, now: float, peer: str, msg: Sync) -> None:
        for u in msg.updates:
            self._receive_repair(u)
        replies: list[DocUpdate] = []
        budget = MAX_SYNC_BYTES
        for w in msg.want:
            replica = self.store.get(w.doc)
            if replica is None or replica.epoch < w.epoch:
                continue
            if replica.epoch > w.epoch or w.sv == EMPTY_SV:
                update: bytes | None = replica.full_update()
            else:
                try:
                    update = replica.missing_for(vectors.decode(w.sv), w.sv)
                except vectors.VectorError:
                    self.stats.reject("bad_vector")
                    continue
            if update is not None and (len(update) <= budget or not replies):
                budget -= len(update)
                replies.append(DocUpdate(replica.name, replica.epoch, update))
        self.stats.repair_updates_sent += len(replies)
        self.stats.repair_bytes_sent += sum(len(u.update) for u in replies)
        if msg.want:  # the initiator closed a round in which it wanted nothing
            self._send(peer, Updates(msg.round, tuple(replies)))

    def _on_updates(self, now: float, peer: str, msg: Updates) -> None:
        rnd = self._rounds.get(msg.round)
        if rnd is None or rnd.peer != peer:
            self.stats.reject("unexpected_round")
            return
        del self._rounds[msg.round]
        for u in msg.updates:
            self._receive_repair(u)
        self.stats.rounds_completed += 1

    def _receive_repair(self, u: DocUpdate) -> None:
        self.stats.repair_updates_received += 1
        self.stats.repair_bytes_received += len(u.update)
        self._repairs.append(u)

    def pending_work(self) -> bool:
        """Repair updates received but not applied yet (see :meth:`work`)."""
        return bool(self._repairs)

    def work(self, now: float) -> None:
        """Apply queued repair updates, about ``repair_slice_bytes`` at a time (at least
        one): the driver yields between calls so a large catch-up never stalls the node."""
        budget = self.tuning.repair_slice_bytes
        while self._repairs and budget > 0:
            u = self._repairs.popleft()
            budget -= len(u.update)
            self._apply(u.doc, u.epoch, u.update)
