"""Persistent, sealed peer links for one channel: one outgoing connection per peer.

Senders enqueue frames without waiting (a bounded queue per peer; a full queue drops the
frame and counts it — the protocols above repair or retry). A link connects on demand,
introduces itself with a hello frame carrying this node's name, and reconnects with backoff
while the peer is wanted. Inbound connections of the same channel are served by
:meth:`PeerLinks.serve`, which reads the hello and hands every further frame to the
receiver callback with the peer's name.
"""

from __future__ import annotations

import logging
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
    send: trio.MemorySendChannel[bytes]
    receive: trio.MemoryReceiveChannel[bytes]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    connected: bool = False
    aborted: bool = False  # the peer was given up on: discard what is still unsent


@dataclass(slots=True)
class LinkStats:
    frames_queued: int = 0
    frames_dropped: int = 0
    connects: int = 0
    connect_failures: int = 0
    inbound_links: int = 0


class PeerLinks:
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
        self.on_connect: Callable[[str, bool], None] = lambda _peer, _ok: None
        # Told when an established connection to a peer broke (a restarted peer, say).
        self.on_disconnect: Callable[[str], None] = lambda _peer: None
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
            send, receive = trio.open_memory_channel[bytes](self.queue_frames)
            link = _Link(peer, send, receive)
            self._links[peer] = link
            self._nursery.start_soon(self._run_link, link)
        try:
            link.send.send_nowait(frame)
        except trio.WouldBlock:
            self.stats.frames_dropped += 1
            return False
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
            while True:
                try:
                    frame = link.receive.receive_nowait()
                except trio.WouldBlock:
                    with trio.move_on_after(self.idle_timeout) as idle:
                        frame = await link.receive.receive()
                    if idle.cancelled_caught:
                        return  # idle: close; the next send reconnects
                # Whatever else is queued goes out in the same write (bounded).
                frames, size = [frame], len(frame)
                while len(frames) < 64 and size < _BATCH_BYTES:
                    try:
                        frames.append(link.receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                    size += len(frames[-1])
                await stream.send_many(frames)
        except (StreamError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.ratelog.debug(("pump", link.peer), "link broken", peer=link.peer, error=repr(exc))

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
