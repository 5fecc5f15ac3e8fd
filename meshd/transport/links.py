"""Persistent, sealed peer links for one channel: one outgoing connection per peer.

Senders hand over frames without waiting (a bounded queue per peer; a full queue drops the
frame and counts it — the protocols above repair or retry). A link connects on demand,
introduces itself with a hello frame carrying this node's name, and reconnects with backoff
while the peer is wanted. Inbound connections of the same channel are served by
:meth:`PeerLinks.serve`, which reads the hello and hands every further frame to the
receiver callback with the peer's name.

A frame for a connected link with nothing queued or being written is sealed and written at
once, by the sender (the socket takes it without waiting, or takes part of it and the link's
pump writes the rest before anything else): no hop through the pump task, whose wake-up
cost a scheduling round on the path of every routed message. Otherwise it queues behind the
others, in order, and the pump writes the queue in batches.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from meshd.logs import RateLimitedLog
from meshd.security.envelope import Envelope
from meshd.transport.stats import TransportStats
from meshd.transport.streams import Channel, FramedStream, StreamError, dial
from meshd.wire.validate import Address, WireError, expect_list, expect_name
from meshd_client.protocol import cbor

_BATCH_BYTES = 1 << 20
Resolver = Callable[[str], Address | None]
Receiver = Callable[[str, bytes], Awaitable[None]]


@dataclass(slots=True)
class _Link:
    peer: str
    queue: deque[bytes] = field(default_factory=deque)  # frames waiting for the pump
    wake: trio.Event = field(default_factory=trio.Event)  # set when the queue got a frame
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    connected: bool = False
    aborted: bool = False  # the peer was given up on: discard what is still unsent
    # While connected and the pump is not writing, senders write directly to this stream.
    stream: FramedStream | None = None
    busy: bool = False  # the pump is writing: a direct write would interleave with it
    rest: bytes = b""  # what a direct write left unwritten, to go out first
    rest_frames: int = 0
    direct: int = 0  # direct writes so far (they keep the link from idling out)


@dataclass(slots=True)
class LinkStats:
    frames_queued: int = 0
    frames_dropped: int = 0
    connects: int = 0
    connect_failures: int = 0
    inbound_links: int = 0


class PeerLinks:
    """One persistent, sealed TCP link per peer for one channel (replication or routing).

    Owns: the links, their send queues (bounded; frames beyond are dropped and counted),
    reconnection with back-off, the receiver callback it is given. Frames are opaque bytes
    to it: it never decodes one."""

    def __init__(
        self,
        channel: Channel,
        self_name: str,
        envelope: Envelope,
        transport_stats: TransportStats,
        resolve: Resolver,
        receiver: Receiver,
        log: logging.Logger,
        *,
        queue_frames: int = 4096,
        connect_timeout: float = 5.0,
        idle_timeout: float = 300.0,
        on_connect: Callable[[str, bool], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
    ) -> None:
        self.channel = channel
        self.self_name = self_name
        self.envelope = envelope
        self.transport_stats = transport_stats
        self.resolve = resolve
        self.receiver = receiver
        self.log = log
        self.ratelog = RateLimitedLog(log)
        self.queue_frames = queue_frames
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.stats = LinkStats()
        # Told whether each connection attempt to a peer worked (circuit breakers listen).
        self.on_connect: Callable[[str, bool], None] = on_connect or (lambda _peer, _ok: None)
        # Told when an established connection to a peer broke (a restarted peer, say).
        self.on_disconnect: Callable[[str], None] = on_disconnect or (lambda _peer: None)
        self._links: dict[str, _Link] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def send(self, peer: str, frame: bytes) -> bool:
        """Queue a frame for ``peer``; False if it was dropped (queue full, no nursery)."""
        link = self._links.get(peer)
        if link is None:
            if self._nursery is None:
                return False
            link = _Link(peer)
            self._links[peer] = link
            self._nursery.start_soon(self._run_link, link)
        stream = link.stream
        if stream is not None and not link.busy and not link.queue:
            self.stats.frames_queued += 1
            try:
                data = stream.seal([frame])
                sent = stream.write_now(data, 1)
            except StreamError as exc:
                # Too large to seal (dropped), or the connection broke: the pump finds out
                # too, reconnects, and sends what is queued.
                if exc.reason == "frame_too_large":
                    self.stats.frames_dropped += 1
                    return False
                link.stream = None
                link.queue.append(frame)
                link.wake.set()
                return True
            link.direct += 1
            if sent < len(data):
                link.rest, link.rest_frames = data[sent:], 1
                link.busy = True
                link.wake.set()
            return True
        if len(link.queue) >= self.queue_frames:
            self.stats.frames_dropped += 1
            return False
        link.queue.append(frame)
        link.wake.set()
        self.stats.frames_queued += 1
        return True

    def close(self, peer: str) -> None:
        """Forget a peer (it died or left): its link and queued frames go away, and so do
        bytes the kernel still holds for it (the connection is reset, not closed)."""
        link = self._links.pop(peer, None)
        if link is not None:
            link.aborted = True
            link.scope.cancel()

    def connected(self, peer: str) -> bool:
        link = self._links.get(peer)
        return link is not None and link.connected

    async def _run_link(self, link: _Link) -> None:
        backoff = 0.1
        with link.scope:
            try:
                while self._links.get(link.peer) is link:
                    addr = self.resolve(link.peer)
                    if addr is None:
                        break
                    try:
                        stream = await dial(
                            addr,
                            self.channel,
                            self.envelope,
                            self.transport_stats,
                            timeout=self.connect_timeout,
                        )
                    except (OSError, trio.TooSlowError, StreamError) as exc:
                        self.stats.connect_failures += 1
                        self.on_connect(link.peer, False)
                        self.ratelog.debug(
                            ("connect", link.peer),
                            "link connect failed",
                            peer=link.peer,
                            error=repr(exc),
                        )
                        await trio.sleep(backoff)
                        backoff = min(5.0, backoff * 2)
                        continue
                    self.stats.connects += 1
                    self.on_connect(link.peer, True)
                    backoff = 0.1
                    try:
                        await self._pump(link, stream)
                    finally:
                        link.connected = False
                        self.on_disconnect(link.peer)
                        with trio.CancelScope(shield=True):
                            await (stream.abort() if link.aborted else stream.aclose())
            finally:
                if self._links.get(link.peer) is link:
                    del self._links[link.peer]

    async def _pump(self, link: _Link, stream: FramedStream) -> None:
        try:
            await stream.send(cbor.dumps([self.self_name]))
            link.connected = True
            link.stream = stream
            while True:
                if link.rest:
                    # The rest of a direct write that found the socket full goes first.
                    rest, frames = link.rest, link.rest_frames
                    link.rest, link.rest_frames = b"", 0
                    await stream.send_sealed(rest, frames)
                    link.busy = False
                if not link.queue:
                    link.wake = trio.Event()
                    direct = link.direct
                    with trio.move_on_after(self.idle_timeout) as idle:
                        await link.wake.wait()
                    if idle.cancelled_caught and link.direct == direct:
                        return  # idle: close; the next send reconnects
                    continue
                # Whatever is queued goes out in the same write (bounded).
                queue = link.queue
                batch, size = [queue.popleft()], 0
                size = len(batch[0])
                while queue and len(batch) < 64 and size < _BATCH_BYTES:
                    batch.append(queue.popleft())
                    size += len(batch[-1])
                link.busy = True
                await stream.send_many(batch)
                link.busy = False
        except (StreamError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.ratelog.debug(("pump", link.peer), "link broken", peer=link.peer, error=repr(exc))
        finally:
            # Whatever was half written belonged to this connection; the next one starts clean.
            link.stream = None
            link.busy = False
            link.rest, link.rest_frames = b"", 0

    async def serve(self, stream: FramedStream) -> None:
        """Inbound connection on this channel: hello, then frames until it closes."""
        hello = await stream.receive()
        try:
            value = cbor.loads(hello)
            peer = expect_name(expect_list(value, 1, 1, "hello")[0], "peer")
        except (cbor.CodecError, WireError):
            self.transport_stats.reject("link_bad_hello")
            return
        self.stats.inbound_links += 1
        while True:
            try:
                frame = await stream.receive()
            except StreamError as exc:
                if exc.reason != "closed":
                    self.transport_stats.reject(f"link_{exc.reason}")
                return
            await self.receiver(peer, frame)
