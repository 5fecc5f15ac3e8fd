"""The trio driver of the store: group commit, durability waits, snapshots, self-repair.

Appends happen on the event loop (they only encode into a buffer). One committer task hands
what waits to a worker thread to write and fsync, at most ``sync_interval`` after the first
change waiting, or at once when someone waits for it (a ``majority`` write, or an ACK a
peer asked for): changes made meanwhile ride along in the next batch. After any write error
the log is not trusted again: the store keeps serving from memory and retries a snapshot of
everything it holds, with back-off, until one succeeds (disk space came back).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio

from meshd.config.model import StorageTuning
from meshd.logs import kv
from meshd.storage.store import Batch, SnapshotPlan, Store, failure_kind

SNAPSHOT_CHUNK_BYTES = 4 << 20  # documents encoded per step, so a snapshot never stalls the loop
# A small batch on a fast disk is written and fsynced on the event loop itself: a worker
# thread costs several GIL hand-offs per commit, which a busy loop makes milliseconds each.
# One commit slower than INLINE_MAX_SECONDS sends commits to the thread for INLINE_BACKOFF.
INLINE_MAX_BYTES = 256 << 10
INLINE_MAX_SECONDS = 0.002
INLINE_BACKOFF = 30.0
RETRY_MIN = 0.5
RETRY_MAX = 30.0


@dataclass(slots=True)
class FsyncHistogram:
    """Latency of write+fsync batches, in seconds (Prometheus buckets)."""

    bounds: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
    counts: list[int] | None = None
    total: float = 0.0
    n: int = 0

    def observe(self, seconds: float) -> None:
        if self.counts is None:
            self.counts = [0] * (len(self.bounds) + 1)
        i = 0
        while i < len(self.bounds) and seconds > self.bounds[i]:
            i += 1
        self.counts[i] += 1
        self.total += seconds
        self.n += 1


# (name, epoch, encoding) of every document, called once a snapshot's log has started.
DocumentSource = Callable[[], Iterable[str]]
Encoder = Callable[[str], tuple[int, bytes] | None]


class StorageDriver:
    """Runs the :class:`~meshd.storage.store.Store` under trio: group commit, durability
    waits, snapshots, recovery after write errors.

    Owns: the committer and snapshot tasks, the fsync latency histogram. Does file I/O only
    through the store (which only uses its :class:`~meshd.storage.files.FileSystem`), off
    the event loop unless a batch is small and the disk fast. Knows documents only as names
    and encodings handed to it."""

    def __init__(
        self,
        store: Store,
        tuning: StorageTuning,
        log: logging.Logger,
        *,
        names: DocumentSource,
        encode: Encoder,
        count: Callable[[], int] = lambda: 0,
    ) -> None:
        self.store = store
        self.tuning = tuning
        self.log = log
        self.names = names  # the documents to snapshot
        self.encode = encode  # a document's (epoch, whole encoding) now, or None if gone
        self.count = count  # how many documents there are (cheap)
        self.fsync = FsyncHistogram()
        self.on_durable: list[Callable[[int], None]] = []
        self.last_sync_wall = 0.0
        self.last_snapshot_wall = 0.0
        self.last_error = ""
        self._wake = trio.Event()
        self._urgent = False
        self._durable_changed = trio.Event()
        self._retry_at = 0.0
        self._retry_delay = RETRY_MIN
        self._threaded_until = 0.0  # commits go to a worker thread until then

    # ------------------------------------------------------------------ on the loop

    def append_update(self, doc: str, epoch: int, update: bytes) -> int:
        lsn = self.store.append_update(doc, epoch, update)
        self._wake.set()
        return lsn

    def append_drop(self, doc: str) -> int:
        lsn = self.store.append_drop(doc)
        self._wake.set()
        return lsn

    def sync_soon(self) -> None:
        """Someone waits for what was appended: commit without the group-commit delay."""
        self._urgent = True
        self._wake.set()

    @property
    def appended(self) -> int:
        return self.store.appended

    @property
    def durable(self) -> int:
        return self.store.durable

    @property
    def writable(self) -> bool:
        return self.store.healthy

    async def wait_durable(self, lsn: int, deadline: float = math.inf) -> bool:
        """Until everything appended before ``lsn`` is on disk; False at the deadline."""
        if self.store.durable >= lsn:
            return True
        self.sync_soon()
        with trio.move_on_at(deadline):
            while self.store.durable < lsn:
                await self._durable_changed.wait()
            return True
        return False

    async def drain(self, timeout: float = 10.0) -> bool:
        """At shutdown: everything appended so far on disk (bounded)."""
        return await self.wait_durable(self.store.appended, trio.current_time() + timeout)

    def _advanced(self) -> None:
        self.last_sync_wall = time.time()
        event, self._durable_changed = self._durable_changed, trio.Event()
        event.set()
        for listener in list(self.on_durable):
            listener(self.store.durable)

    def _failed(self, what: str, exc: BaseException) -> None:
        self.last_error = f"{what}: {exc}"
        self._retry_at = trio.current_time() + self._retry_delay
        self._retry_delay = min(RETRY_MAX, self._retry_delay * 2)
        self.log.error(
            "storage failed; serving from memory until a snapshot succeeds",
            extra=kv(
                kind=failure_kind(exc),
                error=str(exc),
                directory=self.store.directory,
                retry_in=round(self._retry_at - trio.current_time(), 1),
            ),
        )

    # ------------------------------------------------------------------ tasks

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._committer)
            nursery.start_soon(self._snapshots)
            task_status.started()

    async def _committer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if not self._urgent and self.tuning.sync_interval > 0:
                # Group commit: let the changes of the next few milliseconds join.
                with trio.move_on_after(self.tuning.sync_interval):
                    while not self._urgent:
                        await self._wake.wait()
                        self._wake = trio.Event()
            self._urgent = False
            batch = self.store.take_batch()
            if batch is None:
                continue
            await self._commit(batch)
            if self.store.pending_bytes:
                self._wake.set()

    async def _commit(self, batch: Batch) -> None:
        started = time.perf_counter()
        inline = len(batch.data) <= INLINE_MAX_BYTES and trio.current_time() >= self._threaded_until
        try:
            if inline:
                Store.write_batch(batch)
            else:
                await trio.to_thread.run_sync(Store.write_batch, batch)
        except OSError as exc:
            self.store.batch_failed(batch, exc)
            self._failed("log write", exc)
            return
        took = time.perf_counter() - started
        if inline and took > INLINE_MAX_SECONDS:
            self._threaded_until = trio.current_time() + INLINE_BACKOFF
        self.fsync.observe(took)
        self.store.batch_done(batch)
        self._advanced()

    async def _snapshots(self) -> None:
        while True:
            await trio.sleep(self.tuning.snapshot_check)
            due = self.store.snapshot_due(self.count())
            if not due or trio.current_time() < self._retry_at:
                continue
            await self.snapshot()

    async def snapshot(self) -> bool:
        """Write a snapshot of every document now (also the way out of a failure)."""
        plan = self.store.start_snapshot()
        while plan is None:  # a batch is in flight
            await trio.sleep(0.001)
            plan = self.store.start_snapshot()
        started = time.perf_counter()
        try:
            # Never left half rotated: appends would have no log to go to.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.store.rotate, plan)
                self.store.rotated(plan)
            self._wake.set()  # what was appended meanwhile goes to the new log
            try:
                await self._write_documents(plan)
                size = await trio.to_thread.run_sync(self.store.finish_snapshot, plan)
            except trio.Cancelled:
                self.store.abandon_snapshot(plan)  # the logs still hold everything
                raise
        except OSError as exc:
            self.store.snapshot_failed(plan, exc)
            self._failed("snapshot", exc)
            return False
        recovered = plan.failed_before
        self.store.snapshot_done(plan, size)
        self._retry_delay = RETRY_MIN
        self.last_snapshot_wall = time.time()
        self._advanced()
        self.log.info(
            "storage recovered: snapshot written" if recovered else "snapshot written",
            extra=kv(
                generation=plan.generation,
                documents=plan.docs,
                bytes=size,
                seconds=round(time.perf_counter() - started, 3),
            ),
        )
        return True

    async def _write_documents(self, plan: SnapshotPlan) -> None:
        names = list(self.names())
        i = 0
        while i < len(names):
            chunk: list[tuple[str, int, bytes]] = []
            size = 0
            while i < len(names) and size < SNAPSHOT_CHUNK_BYTES:
                found = self.encode(names[i])
                if found is not None:
                    chunk.append((names[i], found[0], found[1]))
                    size += len(found[1])
                i += 1
            data = self.store.encode_documents(plan, chunk)
            await trio.to_thread.run_sync(self.store.write_snapshot_chunk, plan, data)
