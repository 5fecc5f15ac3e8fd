"""The trio driver of the replication core, and the one write path of the daemon.

Every change to a replicated document — a local write, a push, a repair, a new epoch, a
drop — leaves the core as outputs, and this driver acts on them in order, in one place: it
persists each change to the store, hands frames to the peer links, tells listeners, and wakes
writers. Components change documents only through it (:class:`~meshd.replication.documents.
Documents`): each method runs the core and acts on its outputs before it returns, so nobody
has a ``flush()`` to remember. An ACK a peer asked for leaves only once what it acknowledges
is fsynced here.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import trio
from pycrdt import Doc

from meshd.logs import RateLimitedLog, kv
from meshd.metrics.histogram import Histogram
from meshd.replication import messages, vectors
from meshd.replication.core import (
    DocEvent,
    Durability,
    Persist,
    RepairStalled,
    Replicator,
    Send,
    VectorReport,
    WriteDone,
    covers,
)
from meshd.replication.durable import AckGate, persist
from meshd.replication.replica import DocStore, Replica
from meshd.storage.driver import StorageDriver
from meshd.transport.deadlines import Deadlines
from meshd.transport.links import PeerLinks
from meshd.wire.validate import WireError

ROUND_MESSAGES = (
    messages.Tree,
    messages.Nodes,
    messages.ListRange,
    messages.Page,
    messages.Sync,
    messages.Updates,
)
CHUNK_FRAME = 1 << 20  # messages larger than this travel as 1 MiB chunks
MAX_HELD_ACKS = 65536  # ACKs waiting for an fsync; beyond, the oldest are dropped (writers retry)
MAX_DECIDED = 4096  # outcomes of majority writes decided before their writer waited


def _slice(seconds: float) -> Callable[[], bool]:
    """A time slice starting now: True once it is used up."""
    until = time.perf_counter() + seconds
    return lambda: time.perf_counter() > until


@dataclass(frozen=True, slots=True)
class WriteResult:
    ok: bool
    acked: tuple[str, ...]
    needed: int
    total: int
    # Why it failed: "majority" (too few members hold it), "not_joined" (no cluster to count),
    # "storage" (not on this node's disk in time).
    reason: str = ""
    # An undoable write that failed was taken back (see ReplicationDriver.write).
    withdrawn: bool = False


class ReplicationDriver:
    """Runs the :class:`Replicator` under trio, and is the one write path into it.

    Owns: the peer links' replication frames (chunking, reassembly), the core's timers, the
    ACKs waiting for the disk, majority-write waiters, catch-up queries. Persists every
    change through the storage driver before anything else hears of it. Components change
    documents only through its :class:`~meshd.replication.documents.Documents` methods."""

    def __init__(
        self, core: Replicator, log: logging.Logger, storage: StorageDriver | None = None
    ) -> None:
        self.core = core
        self.log = log
        self.storage = storage
        self.ratelog = RateLimitedLog(log)
        self.links: PeerLinks | None = None
        self.deadlines = Deadlines(core)
        self.doc_listeners: list[Callable[[DocEvent], None]] = []
        self.report_listeners: list[Callable[[VectorReport], None]] = [self._on_report]
        self._queries: dict[int, tuple[set[str], dict[str, bytes], trio.Event]] = {}
        self._waiters: dict[int, tuple[trio.Event, list[WriteDone]]] = {}
        self._reassemblers: dict[str, messages.Reassembler] = {}
        self._transfers = itertools.count(1)
        self._flushing = False
        self._decided: dict[int, WriteDone] = {}
        # How long majority writes waited for a majority of the cluster to hold them (the
        # replication lag a writer sees), whatever the outcome.
        self.majority_wait = Histogram()
        self._acks = AckGate(MAX_HELD_ACKS)  # ACKs waiting for the disk
        if storage is not None:
            storage.on_durable.append(self._release)

    def attach(self, links: PeerLinks) -> None:
        self.links = links

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.deadlines.run, self._after_tick)
            task_status.started()

    async def _after_tick(self) -> None:
        self.flush()

    # ------------------------------------------------------------------ the write path

    @property
    def store(self) -> DocStore:
        """Every replica this node holds (read them; change them through this driver)."""
        return self.core.store

    @property
    def peers(self) -> list[str]:
        return self.core.peers

    def write(
        self,
        now: float,
        name: str,
        mutate: Callable[[Doc[Any]], None],
        *,
        epoch: int | None = None,
        durability: Durability = "local",
        undo_roots: Collection[str] | None = None,
    ) -> int | None:
        """Change ``name`` (at its current epoch unless one is given), persist and push the
        change. Returns a token to :meth:`wait` on for ``majority`` writes. With
        ``undo_roots`` a ``majority`` write is all or nothing: if :meth:`wait` does not see
        it succeed (it failed, or the wait was cancelled) it is withdrawn."""
        if epoch is None:
            replica = self.core.store.get(name)
            epoch = replica.epoch if replica is not None else 0
        token = self.core.write(
            now, name, mutate, epoch=epoch, durability=durability, undo_roots=undo_roots
        )
        self.flush()
        return token

    def open(self, name: str, epoch: int = 0) -> Replica:
        replica = self.core.open(name, epoch)
        self.flush()
        return replica

    def replace(self, name: str, epoch: int, doc: Doc[Any]) -> Replica:
        replica = self.core.replace(name, epoch, doc)
        self.flush()
        return replica

    def drop(self, name: str) -> None:
        self.core.drop(name)
        self.flush()

    def query(self, docs: Iterable[str], peers: Iterable[str]) -> int:
        query = self.core.query(docs, peers)
        self.flush()
        return query

    def sync_with(self, now: float, peer: str) -> None:
        self.core.sync_with(now, peer)
        self.flush()

    def request_sync(self, now: float, peer: str) -> None:
        self.core.request_sync(now, peer)
        self.flush()

    def set_members(self, live: Iterable[str], reference: Iterable[str] | None) -> None:
        """The live peers to replicate with, and the reference membership majority writes
        count (None: this node does not know its cluster yet)."""
        self.core.set_reference(reference)
        self.core.set_peers(live)
        self.flush()

    def load(self, docs: Iterable[tuple[str, int, list[bytes]]]) -> int:
        """Install the documents read back from this node's store; returns how many."""
        count = 0
        for name, epoch, updates in docs:
            if self.core.load(name, epoch, updates) is not None:
                count += 1
        self.flush()
        return count

    # ------------------------------------------------------------------ outputs

    def flush(self) -> None:
        """Act on the core's outputs, in order. Synchronous: it only appends to the store's
        buffer, queues frames and calls listeners, so a caller can rely on listeners having
        seen every change before it next awaits. A listener that changes a document (through
        this driver) has its outputs acted on by the same loop, after what came before."""
        if self._flushing:
            return
        self._flushing = True
        try:
            while outputs := self.core.take_outputs():
                for out in outputs:
                    self._act(out)
        finally:
            self._flushing = False
        self.deadlines.rearm()

    def _act(self, out: Any) -> None:
        if isinstance(out, Persist):
            if self.storage is not None:
                persist(self.storage, out)
        elif isinstance(out, Send):
            if out.durable and self.storage is not None:
                self._hold(out)
            else:
                self._send(out)
        elif isinstance(out, DocEvent):
            for listener in list(self.doc_listeners):
                try:
                    listener(out)
                except Exception:
                    self.log.exception("document listener failed")
        elif isinstance(out, RepairStalled):
            self.log.warning(
                "anti-entropy rounds with a peer make no progress; backing off",
                extra=kv(peer=out.peer, backoff=out.backoff),
            )
        elif isinstance(out, VectorReport):
            for report_listener in list(self.report_listeners):
                report_listener(out)
        elif isinstance(out, WriteDone):
            waiter = self._waiters.pop(out.token, None)
            if waiter is not None:
                waiter[1].append(out)
                waiter[0].set()
            else:
                # Decided before anyone waited (a majority of one): kept for wait(), bounded.
                self._decided[out.token] = out
                while len(self._decided) > MAX_DECIDED:
                    del self._decided[next(iter(self._decided))]

    def _hold(self, out: Send) -> None:
        assert self.storage is not None
        lsn = self.storage.appended
        if self.storage.durable >= lsn:
            self._send(out)
            return
        self._acks.hold(lsn, out)
        self.storage.sync_soon()

    @property
    def acks_held(self) -> int:
        """ACKs waiting for this node's disk."""
        return len(self._acks)

    def _release(self, durable: int) -> None:
        for out in self._acks.release(durable):
            self._send(out)

    def _send(self, out: Send) -> None:
        if self.links is None:
            return
        payload = messages.encode(out.message)
        frames = (
            [payload]
            if len(payload) <= CHUNK_FRAME
            else messages.split(payload, next(self._transfers), CHUNK_FRAME)
        )
        if isinstance(out.message, ROUND_MESSAGES):
            self.core.stats.round_bytes_sent += len(payload)
        for frame in frames:
            if not self.links.send(out.peer, frame):
                # The link's queue is full: what the frame carried is repaired by a round
                # with the peer once the link drains (counted, never silently lost).
                self.core.frame_dropped(trio.current_time(), out.peer)
                self.ratelog.warning(("drop", out.peer), "replication frame dropped", peer=out.peer)
                return

    # ------------------------------------------------------------------ inputs

    async def receive(self, peer: str, frame: bytes) -> None:
        """A frame from ``peer``'s link (the PeerLinks receiver callback)."""
        try:
            max_docs = self.core.tuning.max_docs_per_message
            message = messages.decode(frame, max_docs)
            if isinstance(message, messages.Chunk):
                assembler = self._reassemblers.setdefault(peer, messages.Reassembler())
                whole = assembler.add(message)
                if whole is None:
                    return
                message = messages.decode(whole, max_docs)
                if isinstance(message, messages.Chunk):
                    raise WireError("nested chunk")
        except WireError as exc:
            self.core.stats.reject("malformed_message")
            self.ratelog.warning(
                ("bad", peer), "dropped malformed replication message", peer=peer, error=str(exc)
            )
            return
        self.core.handle(trio.current_time(), peer, message)
        self.flush()
        await trio.lowlevel.checkpoint()
        slice_seconds = self.core.tuning.work_slice
        while self.core.pending_work():
            self.core.work(trio.current_time(), _slice(slice_seconds))
            self.flush()
            await trio.sleep(0)  # probes, API calls and other peers get their turn

    def forget_peer(self, peer: str) -> None:
        self._reassemblers.pop(peer, None)

    # ------------------------------------------------------------------ catching up

    def _on_report(self, report: VectorReport) -> None:
        query = self._queries.get(report.query)
        if query is None:
            return
        waiting, found, done = query
        waiting.discard(report.peer)
        for _, sv in report.vectors.values():
            found[report.peer] = sv
        if not waiting:
            done.set()

    async def catch_up(self, doc: str, peers: list[str], timeout: float) -> bool:
        """Make sure this node holds everything any of ``peers`` holds of ``doc`` (before an
        agent starts here on failover or a move). True once it does, False at the timeout."""
        if not peers:
            return True
        deadline = trio.current_time() + timeout
        done = trio.Event()
        waiting = set(peers)
        found: dict[str, bytes] = {}
        query = self.core.query([doc], peers)
        self._queries[query] = (waiting, found, done)
        self.flush()
        try:
            with trio.move_on_at(trio.current_time() + timeout / 2):
                await done.wait()
        finally:
            self._queries.pop(query, None)
        target: dict[int, int] = {}
        ahead = []
        mine = self.core.store.get(doc)
        for peer, sv in found.items():
            try:
                theirs = vectors.decode(sv)
            except vectors.VectorError:
                continue
            for client, clock in theirs.items():
                target[client] = max(target.get(client, 0), clock)
            if mine is None or vectors.has_news(theirs, mine.vector):
                ahead.append(peer)
        for peer in ahead:
            self.core.sync_with(trio.current_time(), peer)
        self.flush()
        while trio.current_time() < deadline:
            mine = self.core.store.get(doc)
            if not target or (mine is not None and covers(mine.vector, target)):
                return True
            await trio.sleep(0.01)
        return False

    # ------------------------------------------------------------------ writes

    async def update(
        self,
        name: str,
        mutate: Callable[[Doc[Any]], None],
        *,
        epoch: int | None = None,
        durability: Durability = "local",
        undo_roots: Collection[str] | None = None,
    ) -> WriteResult:
        """Write and wait for the durability asked for."""
        token = self.write(
            trio.current_time(),
            name,
            mutate,
            epoch=epoch,
            durability=durability,
            undo_roots=undo_roots,
        )
        return await self.wait(token)

    async def wait(self, token: int | None) -> WriteResult:
        """Wait for a write's outcome: at once for ``local`` writes; for ``majority`` ones,
        until a majority of the cluster holds the write *and* it is on this node's disk."""
        if token is None:
            self.flush()
            return WriteResult(True, (self.core.node,), 1, 1)
        result: WriteResult | None = None
        try:
            result = await self._wait_majority(token)
        finally:
            # An undoable write stays only if it succeeded (a cancelled wait withdraws it).
            withdrawn = self.core.settle(
                trio.current_time(), token, keep=result is not None and result.ok
            )
            self.flush()
        assert result is not None  # the wait returned (else its exception is on its way)
        if withdrawn is not None:
            self.log.info(
                "a once-keyed majority write failed and was withdrawn",
                extra=kv(doc=withdrawn, reason=result.reason, acked=len(result.acked)),
            )
            result = dataclasses.replace(result, withdrawn=True)
        return result

    async def _wait_majority(self, token: int) -> WriteResult:
        lsn = self.storage.appended if self.storage is not None else 0
        deadline = trio.current_time() + self.core.tuning.majority_timeout
        if self.storage is not None:
            self.storage.sync_soon()
        started = trio.current_time()
        done = self._decided.pop(token, None)
        if done is None:
            event = trio.Event()
            box: list[WriteDone] = []
            self._waiters[token] = (event, box)
            self.flush()
            await event.wait()
            done = box[0]
        self.majority_wait.observe(trio.current_time() - started)
        if not done.ok:
            reason = "not_joined" if done.total == 0 else "majority"
            return WriteResult(False, done.acked, done.needed, done.total, reason)
        if self.storage is not None and not await self.storage.wait_durable(
            lsn, max(deadline, trio.current_time() + 0.001)
        ):
            others = tuple(n for n in done.acked if n != self.core.node)
            return WriteResult(False, others, done.needed, done.total, "storage")
        return WriteResult(True, done.acked, done.needed, done.total)
