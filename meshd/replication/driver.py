"""The trio driver of the replication core: peer links, chunking, timers, write waiters."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio
from pycrdt import Doc

from meshd.logs import RateLimitedLog
from meshd.replication import messages, vectors
from meshd.replication.core import (
    DocEvent,
    Durability,
    Replicator,
    Send,
    VectorReport,
    WriteDone,
    covers,
)
from meshd.transport.deadlines import Deadlines
from meshd.transport.links import PeerLinks
from meshd.wire.validate import WireError

CHUNK_FRAME = 1 << 20  # messages larger than this travel as 1 MiB chunks


@dataclass(frozen=True, slots=True)
class WriteResult:
    ok: bool
    acked: tuple[str, ...]
    needed: int
    total: int


class ReplicationDriver:
    def __init__(self, core: Replicator, log: logging.Logger) -> None:
        self.core = core
        self.log = log
        self.ratelog = RateLimitedLog(log)
        self.links: PeerLinks | None = None
        self.deadlines = Deadlines(core)
        self.doc_listeners: list[Callable[[DocEvent], None]] = []
        self.report_listeners: list[Callable[[VectorReport], None]] = [self._on_report]
        self._queries: dict[int, tuple[set[str], dict[str, bytes], trio.Event]] = {}
        self._waiters: dict[int, tuple[trio.Event, list[WriteDone]]] = {}
        self._reassemblers: dict[str, messages.Reassembler] = {}
        self._transfers = itertools.count(1)

    def attach(self, links: PeerLinks) -> None:
        self.links = links

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.deadlines.run, self._after_tick)
            task_status.started()

    async def _after_tick(self) -> None:
        self.flush()

    # ------------------------------------------------------------------ outputs

    def flush(self) -> None:
        """Act on the core's outputs. Synchronous: it only queues frames and calls listeners,
        so callers can rely on listeners having seen every change before they next await."""
        for out in self.core.take_outputs():
            if isinstance(out, Send):
                self._send(out)
            elif isinstance(out, DocEvent):
                for listener in list(self.doc_listeners):
                    try:
                        listener(out)
                    except Exception:
                        self.log.exception("document listener failed")
            elif isinstance(out, VectorReport):
                for report_listener in list(self.report_listeners):
                    report_listener(out)
            else:
                waiter = self._waiters.pop(out.token, None)
                if waiter is not None:
                    waiter[1].append(out)
                    waiter[0].set()
        self.deadlines.rearm()

    def _send(self, out: Send) -> None:
        if self.links is None:
            return
        payload = messages.encode(out.message)
        frames = (
            [payload]
            if len(payload) <= CHUNK_FRAME
            else messages.split(payload, next(self._transfers), CHUNK_FRAME)
        )
        for frame in frames:
            if not self.links.send(out.peer, frame):
                self.ratelog.warning(("drop", out.peer), "replication frame dropped", peer=out.peer)
                return

    # ------------------------------------------------------------------ inputs

    async def receive(self, peer: str, frame: bytes) -> None:
        """A frame from ``peer``'s link (the PeerLinks receiver callback)."""
        try:
            message = messages.decode(frame)
            if isinstance(message, messages.Chunk):
                assembler = self._reassemblers.setdefault(peer, messages.Reassembler())
                whole = assembler.add(message)
                if whole is None:
                    return
                message = messages.decode(whole)
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
        while self.core.pending_work():
            self.core.work(trio.current_time())
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

    async def write(
        self,
        name: str,
        mutate: Callable[[Doc[Any]], None],
        *,
        epoch: int = 0,
        durability: Durability = "local",
    ) -> WriteResult:
        token = self.core.write(
            trio.current_time(), name, mutate, epoch=epoch, durability=durability
        )
        return await self.wait(token)

    async def wait(self, token: int | None) -> WriteResult:
        """Wait for a majority write's outcome (at once for local writes)."""
        if token is None:
            self.flush()
            return WriteResult(True, (self.core.node,), 1, 1)
        event = trio.Event()
        box: list[WriteDone] = []
        self._waiters[token] = (event, box)
        self.flush()  # may already hold the outcome (no peers: majority of one)
        await event.wait()
        done = box[0]
        return WriteResult(done.ok, done.acked, done.needed, done.total)
