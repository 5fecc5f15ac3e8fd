"""The trio driver of the membership core: sockets, timers and event delivery.

It owns no protocol logic. It feeds the core what arrives (UDP packets, TCP requests, stream
results, due timers), performs what the core asks for (send a packet, open a stream) and hands
membership events to in-daemon listeners. Every task lives in the nursery of :meth:`run`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from meshd.logs import kv
from meshd.membership.core import Membership
from meshd.membership.events import (
    EventKind,
    MemberEvent,
    ResolveSeeds,
    SendPacket,
    StreamFailure,
    StreamRequest,
)
from meshd.security.envelope import Envelope
from meshd.transport.stats import TransportStats
from meshd.transport.streams import Channel, FramedStream, StreamError, request
from meshd.transport.udp import PacketEndpoint

Listener = Callable[[MemberEvent], None]
# Looks the seeds up (``dns:`` seeds among them); never raises: what did not resolve is left out.
SeedResolver = Callable[[], Awaitable[list[tuple[str, int]]]]
_MAX_STREAMS_IN_FLIGHT = 64


class MembershipDriver:
    """Runs the :class:`~meshd.membership.core.Membership` core under trio.

    Owns: the UDP endpoint's traffic for membership, TCP streams the core asks for (probes,
    push-pull, join), the core's timers, and the listeners of member events. Decides
    nothing: every membership rule lives in the core."""

    def __init__(
        self,
        core: Membership,
        packets: PacketEndpoint,
        envelope: Envelope,
        stats: TransportStats,
        log: logging.Logger,
    ) -> None:
        self.core = core
        self.packets = packets
        self.envelope = envelope
        self.stats = stats
        self.log = log
        self.listeners: list[Listener] = []
        self.joined = trio.Event()
        self.last_tick = trio.current_time()
        self._nursery: trio.Nursery | None = None
        self._timer_scope: trio.CancelScope | None = None
        self._streams_in_flight = 0
        self.seed_resolver: SeedResolver | None = None

    # ------------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._receive_loop)
            await nursery.start(self._timer_loop)
            await self.flush()
            task_status.started()

    async def _receive_loop(self) -> None:
        while True:
            src, payload = await self.packets.receive()
            self.core.handle_packet(trio.current_time(), src, payload)
            await self.flush()

    async def _timer_loop(self, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        while True:
            with trio.CancelScope(deadline=self.core.next_deadline()) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            now = trio.current_time()
            self.last_tick = now
            self.core.tick(now)
            await self.flush()

    # ------------------------------------------------------------------ core outputs

    async def flush(self) -> None:
        """Carry out everything the core asked for, then re-arm the timer."""
        for out in self.core.take_outputs():
            if isinstance(out, SendPacket):
                await self.packets.send(out.addr, out.data)
            elif isinstance(out, StreamRequest):
                self._start_stream(out)
            elif isinstance(out, ResolveSeeds):
                assert self._nursery is not None
                self._nursery.start_soon(self._resolve_seeds)
            else:
                self._deliver(out)
        if self.core.joined and not self.joined.is_set():
            self.joined.set()
        if self._timer_scope is not None:
            self._timer_scope.deadline = self.core.next_deadline()

    def _deliver(self, event: MemberEvent) -> None:
        member = event.member
        addr = f"{member.addr[0]}:{member.addr[1]}"
        if event.kind is EventKind.REAP:
            self.log.info(
                "member reaped",
                extra=kv(
                    member=member.name,
                    addr=addr,
                    status=member.status.name.lower(),
                    gone_s=round(event.at - member.status_since, 1),
                ),
            )
        else:
            level = logging.WARNING if event.kind is EventKind.DEAD else logging.INFO
            self.log.log(
                level,
                f"member {event.kind.value}",
                extra=kv(member=member.name, addr=addr, incarnation=member.incarnation),
            )
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:
                self.log.exception("membership listener failed", extra=kv(event=event.kind.value))

    async def _resolve_seeds(self) -> None:
        """Answer the core's :class:`ResolveSeeds` (the resolver never raises, so the core
        always gets its answer)."""
        seeds: list[tuple[str, int]] = list(self.core.seeds)
        if self.seed_resolver is not None:
            seeds = await self.seed_resolver()
        self.core.seeds_resolved(trio.current_time(), seeds)
        await self.flush()

    def _start_stream(self, req: StreamRequest) -> None:
        assert self._nursery is not None
        if self._streams_in_flight >= _MAX_STREAMS_IN_FLIGHT:
            self.core.stream_result(trio.current_time(), req.token, None, "error")
            return
        self._streams_in_flight += 1
        self._nursery.start_soon(self._run_stream, req)

    async def _run_stream(self, req: StreamRequest) -> None:
        reply: bytes | None = None
        failure: StreamFailure | None = None
        try:
            reply = await request(
                req.addr,
                Channel.MEMBERSHIP,
                req.data,
                self.envelope,
                self.stats,
                timeout=req.timeout,
            )
        except ConnectionRefusedError:
            failure = "refused"
        except trio.TooSlowError:
            failure = "timeout"
        except (OSError, StreamError, trio.BrokenResourceError, trio.ClosedResourceError):
            failure = "error"
        finally:
            self._streams_in_flight -= 1
        self.core.stream_result(trio.current_time(), req.token, reply, failure)
        await self.flush()

    # ------------------------------------------------------------------ inbound streams

    async def serve_stream(self, stream: FramedStream) -> None:
        """The MEMBERSHIP channel: one request frame, at most one reply frame."""
        with trio.fail_after(self.core.tuning.tcp_timeout):
            payload = await stream.receive()
            reply = self.core.handle_stream(trio.current_time(), stream.peer, payload)
            await self.flush()
            if reply is not None:
                await stream.send(reply)

    # ------------------------------------------------------------------ control

    async def leave(self) -> bool:
        """Announce a graceful leave and wait (bounded) for it to spread."""
        self.core.leave(trio.current_time())
        await self.flush()
        with trio.move_on_after(self.core.tuning.leave_timeout):
            while not self.core.leave_done():
                await trio.sleep(self.core.tuning.gossip_interval / 2)
            return True
        return False

    def renew_lease(self, every: float | None) -> None:
        """Ping every member up each ``every`` seconds for placement's lease (None: stop)."""
        self.core.renew_lease(trio.current_time(), every)
        if self._timer_scope is not None:
            self._timer_scope.deadline = self.core.next_deadline()

    async def remove(self, name: str) -> bool:
        """An operator removes a dead member (:meth:`Membership.remove`); True if it was
        removed now, False if it had already left. Raises the core's typed errors."""
        removed = self.core.remove(trio.current_time(), name)
        if removed:
            self.log.warning("member removed by an operator", extra=kv(member=name))
        await self.flush()
        return removed

    async def set_tags(self, tags: dict[str, str]) -> None:
        self.core.set_tags(trio.current_time(), tags)
        await self.flush()
