"""Message routing: deliver to an agent wherever it runs.

A call names an agent, never a host. The router resolves the name in the local registry
index; if the agent is hosted by this daemon the message goes straight to its client session,
otherwise it is forwarded once over the sealed ROUTING link to the hosting daemon, which
delivers it and sends back the result. Guarantees, per call:

* ``send`` (at most once): handed to the local agent or to the link; no answer awaited.
* ``send``/``request`` with ``at_least_once``: the hosting daemon remembers message ids
  (:class:`~meshd.routing.dedup.DedupWindow`), so a retry with the same id — from a client
  whose earlier attempt timed out or whose daemon restarted — does not run the handler again:
  it waits for, or receives, the first attempt's outcome.
* Order is kept per sender and receiver: one link per host pair, one queue per agent.

Calls to a host that membership reports dead, or whose circuit breaker is open, fail at once
with ``unreachable``.

No task waits for a reply on the request path: :meth:`Router.begin_call` starts a call and
registers what to do with its outcome, and whoever learns the outcome — the link reader
taking a RESULT, the API session taking an agent's reply — completes it on the spot (and the
hosting daemon answers a DELIVER the same way); deadlines are kept by one timer task. Each
task per call cost a spawn and a wake-up, a scheduling round each, on every routed request.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import trio
from pycrdt import Map

from meshd.logs import RateLimitedLog
from meshd.membership.core import Membership
from meshd.registry.model import Entry
from meshd.registry.registry import Registry, node_root
from meshd.replication.core import DocEvent
from meshd.replication.documents import Documents
from meshd.routing import messages, topics
from meshd.routing.breaker import Breaker, BreakerState
from meshd.routing.dedup import DedupWindow, InProgress, Outcome
from meshd.routing.messages import Activate, Control, Deliver, DeliveryKind, Result, Signal
from meshd.routing.ports import Activator, EventSink
from meshd.timers import Timer, TimerHeap
from meshd.transport.links import PeerLinks
from meshd.wire.membership import Status
from meshd.wire.validate import WireError
from meshd_client.protocol import cbor, errors
from meshd_client.protocol.errors import MeshError

SUBSCRIPTIONS: Final = "subscriptions"
MAX_BODY: Final = 512 * 1024
MAX_PENDING_PER_AGENT: Final = 1024
_ADVERTISE_EVERY: Final = 0.02  # seconds between writes of this node's subscription patterns


_log = logging.getLogger("meshd.routing")


@dataclass(slots=True)
class _Waiter:
    """The outcome of something under way: awaited (``event``), or handed on by a callback
    (``then``, called once when it is settled)."""

    event: trio.Event = field(default_factory=trio.Event)
    ok: bool = False
    payload: Any = None
    then: Callable[[], None] | None = None

    def settle(self, ok: bool, payload: Any) -> None:
        """Record the outcome (the first one counts) and wake whoever waits for it."""
        if self.event.is_set():
            return
        self.ok = ok
        self.payload = payload
        self.event.set()
        then, self.then = self.then, None
        if then is not None:
            then()


def _fire_deadline(_now: float, arg: tuple[Callable[[], None], logging.Logger]) -> None:
    fire, log = arg
    try:
        fire()
    except Exception:
        log.exception("a call's deadline handling failed")


class _Done:
    """Hands a call's outcome to its ``done`` callback, once: ``(True, reply)`` (None for a
    send) or ``(False, error map)``."""

    __slots__ = ("callback", "request")

    def __init__(self, callback: Callable[[bool, Any], None], request: bool) -> None:
        self.callback: Callable[[bool, Any], None] | None = callback
        self.request = request

    def __call__(self, ok: bool, payload: Any) -> None:
        callback, self.callback = self.callback, None
        if callback is None:
            return
        try:
            callback(ok, payload if not ok or self.request else None)
        except Exception:
            _log.exception("a call's completion failed")


@dataclass(slots=True)
class _Delivery:
    """A delivery begun on this host: settled at once (``outcome``), or waiting for the
    agent's answer (``waiter``, registered in ``agent``'s pending map), or, for a duplicate
    of an at-least-once message still in progress, for the first delivery's outcome."""

    key: str
    outcome: tuple[bool, Any] | None = None
    waiter: _Waiter | None = None
    agent: LocalAgent | None = None
    duplicate: bool = False


@dataclass(slots=True)
class LocalAgent:
    """An agent served by a client session on this host."""

    entry: Entry
    owner: object  # the client serving it (compared by identity)
    stream: EventSink
    pending: dict[str, _Waiter] = field(default_factory=dict)
    notices: Callable[[dict[str, Any]], None] | None = None


@dataclass(slots=True)
class RouterStats:
    local_deliveries: int = 0
    forwarded: int = 0
    received: int = 0
    results: int = 0
    duplicates: int = 0
    unreachable: int = 0
    timeouts: int = 0
    signals_published: int = 0
    signals_delivered: int = 0
    signal_hosts: int = 0


def body_size(body: Any) -> int:
    try:
        return len(cbor.dumps(body))
    except cbor.CodecError:
        raise errors.Invalid("the body is not encodable as CBOR") from None


def error_payload(exc: MeshError) -> dict[str, Any]:
    return exc.to_wire()


class Router:
    """Routes messages, requests and signals to agents by name.

    Owns: the agents served by this host's clients (``local``), the calls under way and
    their deadlines, the receiver's at-least-once window (``dedup``), one circuit breaker per
    host, this host's signal subscriptions and the subscription patterns of every host.
    Reads the registry index and membership; writes only this node's ``subscriptions`` map
    (through the registry). Must not start agents itself: a name active nowhere goes to the
    :class:`~meshd.routing.ports.Activator` (placement). Never blocks the API session that
    called it: calls complete by callback (:meth:`begin_call`)."""

    def __init__(
        self,
        *,
        node: str,
        registry: Registry,
        docs: Documents,
        membership: Membership,
        log: logging.Logger,
        activator: Activator | None = None,
    ) -> None:
        self.node = node
        self.registry = registry
        self.docs = docs
        self.membership = membership
        self.log = log
        self.ratelog = RateLimitedLog(log)
        self.links: PeerLinks | None = None
        # Placement, as routing sees it (None: this router starts no agents itself).
        self.activator = activator
        # Operator commands other daemons may send this one (e.g. "drain").
        self.control_handlers: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {}
        self.stats = RouterStats()
        self.local: dict[str, LocalAgent] = {}
        self.breakers: dict[str, Breaker] = {}
        self.dedup = DedupWindow()
        self._outbound: dict[str, _Waiter] = {}
        self._dedup_waiters: dict[str, list[_Waiter]] = {}
        # Local subscriptions: pattern -> {token: stream}, and the patterns as an index.
        self._subscribers: dict[str, dict[int, EventSink]] = {}
        self._local_index = topics.PatternIndex()
        self._tokens = itertools.count()
        # Patterns that gained their first or lost their last local subscriber since this
        # node's registry document last said so (written in batches by ``_advertiser``).
        self._unadvertised: set[str] = set()
        self._advertise_wake = trio.Event()
        # Other hosts' subscription patterns: per host, and pattern -> hosts, indexed.
        self._host_patterns: dict[str, frozenset[str]] = {}
        self._pattern_hosts: dict[str, set[str]] = {}
        self._host_index = topics.PatternIndex()
        self._nursery: trio.Nursery | None = None
        self.leaving = False  # set when this daemon announces its leave: deliver nothing more
        # Deadlines of calls nobody waits for in a task.
        self._timers = TimerHeap()
        self._timer_scope: trio.CancelScope | None = None

    def attach_links(self, links: PeerLinks) -> None:
        self.links = links

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._expire)
            nursery.start_soon(self._advertiser)
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # ------------------------------------------------------------------ deadlines

    def _at(
        self, deadline: float, fire: Callable[[], None]
    ) -> Timer[tuple[Callable[[], None], logging.Logger]]:
        """Call ``fire`` at ``deadline`` unless the returned timer is cancelled first."""
        timer = self._timers.at(deadline, _fire_deadline, (fire, self.log))
        scope = self._timer_scope
        if scope is not None and deadline < scope.deadline:
            scope.deadline = deadline
        return timer

    def _cancel_timer(self, timer: Timer[Any]) -> None:
        # Most calls end long before their deadline: the heap sweeps what they leave.
        self._timers.cancel(timer)

    async def _expire(self) -> None:
        while True:
            with trio.CancelScope(deadline=self._timers.next_deadline()) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            self._timers.run(trio.current_time())

    # ------------------------------------------------------------------ health & breakers

    def breaker(self, host: str) -> Breaker:
        breaker = self.breakers.get(host)
        if breaker is None:
            breaker = self.breakers[host] = Breaker()
        return breaker

    def host_down(self, host: str) -> None:
        self.breaker(host).trip(trio.current_time())
        for msg_id, waiter in list(self._outbound.items()):
            # Calls waiting on a host that just died fail now, not at their timeout.
            if msg_id.startswith(f"{host}\x00"):
                waiter.settle(False, errors.Unreachable(f"host {host} died").to_wire())

    def host_up(self, host: str) -> None:
        self.breaker(host).host_up()

    def link_lost(self, host: str) -> None:
        """Our connection to ``host`` broke: results of requests sent on it will not come
        (a restarted daemon forgot them), so fail them now instead of at their timeout."""
        prefix = f"{host}\x00"
        for key, waiter in list(self._outbound.items()):
            if key.startswith(prefix) and not waiter.event.is_set():
                error = errors.Unreachable(f"the connection to {host} broke")
                waiter.settle(False, error.to_wire())

    def link_status(self, host: str, connected: bool) -> None:
        """PeerLinks tells us whether connecting to ``host`` worked."""
        breaker = self.breaker(host)
        if connected:
            breaker.success()
        else:
            breaker.failure(trio.current_time())

    def health(self, name: str) -> dict[str, Any]:
        entry = self.registry.lookup(name)
        if entry is None:
            gone = self.registry.last_known(name)
            if gone is not None:
                return {
                    "name": name,
                    "node": gone.node,
                    "health": "unreachable",
                    "reason": "its host is down or unreachable",
                }
            return {"name": name, "health": "not_found"}
        out: dict[str, Any] = {"name": name, "node": entry.node}
        if entry.node == self.node:
            out["health"] = "healthy" if name in self.local else "unreachable"
            if name not in self.local:
                out["reason"] = "registered but not served by a client"
            return out
        state = self.membership.peek(entry.node)
        breaker = self.breaker(entry.node)
        out["breaker"] = breaker.state.value
        if state is None or not state[0].up or breaker.state is BreakerState.OPEN:
            out["health"] = "unreachable"
        elif state[0] is Status.SUSPECT or breaker.state is BreakerState.HALF_OPEN:
            out["health"] = "degraded"
        else:
            out["health"] = "healthy"
        return out

    # ------------------------------------------------------------------ calls

    async def call(
        self,
        *,
        to: str,
        body: Any,
        sender: str = "",
        kind: DeliveryKind,
        at_least_once: bool = False,
        timeout: float = 10.0,
        msg_id: str | None = None,
    ) -> Any:
        """Deliver a message or request; returns the reply body (None for sends)."""
        if body_size(body) > MAX_BODY:
            raise errors.Invalid(f"message body larger than {MAX_BODY} bytes")
        msg_id = msg_id or uuid.uuid4().hex
        deadline = trio.current_time() + timeout
        entry = self.registry.lookup(to)
        if entry is None and self.activator is not None:
            try:
                # A virtual agent (or one whose host died): activate it where it belongs.
                entry = await self.activator.ensure_active(to, None, deadline)
            except errors.NotFound:
                entry = None
        if entry is None:
            raise self._missing(to)
        msg = Deliver(msg_id, to, sender, kind, at_least_once, max(1, int(timeout * 1000)), body)
        if entry.node == self.node:
            ok, payload = await self._deliver_local(
                msg, deadline, wait=kind is DeliveryKind.REQUEST or at_least_once
            )
        else:
            ok, payload = await self._forward(entry.node, msg, deadline)
        if not ok:
            raise errors.error_from_wire(payload)
        return payload if kind is DeliveryKind.REQUEST else None

    def begin_call(
        self,
        *,
        to: str,
        body: Any,
        sender: str = "",
        kind: DeliveryKind,
        at_least_once: bool = False,
        timeout: float = 10.0,
        msg_id: str | None = None,
        done: Callable[[bool, Any], None],
    ) -> bool:
        """:meth:`call` without waiting: ``done(True, reply)`` (None for a send) or
        ``done(False, error map)`` is called once with the outcome, possibly before this
        returns. Calls refused at once raise. Returns False, having done nothing, if the
        call cannot start without waiting (the agent is not active anywhere yet, so
        placement must activate it first): use :meth:`call` then."""
        if self._nursery is None:
            return False
        if body_size(body) > MAX_BODY:
            raise errors.Invalid(f"message body larger than {MAX_BODY} bytes")
        entry = self.registry.lookup(to)
        if entry is None:
            if self.activator is not None:
                return False
            raise self._missing(to)
        msg_id = msg_id or uuid.uuid4().hex
        deadline = trio.current_time() + timeout
        msg = Deliver(msg_id, to, sender, kind, at_least_once, max(1, int(timeout * 1000)), body)
        finish = _Done(done, kind is DeliveryKind.REQUEST)
        if entry.node == self.node:
            delivery = self._begin_local(msg, wait=kind is DeliveryKind.REQUEST or at_least_once)
            self._when_local_done(msg, delivery, deadline, finish)
            return True
        host = entry.node
        if kind is DeliveryKind.SEND and not at_least_once:
            finish(*self._forward_send(host, msg))
            return True
        self.stats.forwarded += 1
        key, waiter = self._exchange_begin(host, msg_id, msg, what=to)

        def end() -> None:
            try:
                finish(*self._exchange_end(host, key, waiter, what=to))
            except MeshError as exc:
                finish(False, exc.to_wire())

        self._when_settled(waiter, deadline, end)
        return True

    def _when_settled(self, waiter: _Waiter, deadline: float, end: Callable[[], None]) -> None:
        """Run ``end`` once ``waiter`` is settled, or at ``deadline`` if it is not by then."""

        def expired() -> None:
            waiter.then = None
            end()

        timer = self._at(deadline, expired)

        def settled() -> None:
            self._cancel_timer(timer)
            end()

        waiter.then = settled

    def _missing(self, to: str) -> MeshError:
        """The error for a call to an agent that is not registered anywhere live."""
        gone = self.registry.last_known(to)
        if gone is not None:
            self.stats.unreachable += 1
            return errors.Unreachable(
                f"{to!r} is on {gone.node}, which is down or unreachable",
                detail={"host": gone.node},
            )
        return errors.NotFound(f"no live agent named {to!r}")

    def _forward_send(self, host: str, msg: Deliver) -> tuple[bool, Any]:
        """Hand a fire-and-forget message to the link."""
        self._check_host(host, msg.to)
        assert self.links is not None
        if not self.links.send(host, messages.encode(msg)):
            raise errors.Overloaded(f"the link to {host} is backed up")
        self.breaker(host).trial_in_flight = False
        self.stats.forwarded += 1
        return True, None

    async def _forward(
        self,
        host: str,
        msg: Deliver,
        deadline: float,
    ) -> tuple[bool, Any]:
        """Send to the hosting daemon and wait for its result (unless fire-and-forget)."""
        if msg.kind is DeliveryKind.SEND and not msg.at_least_once:
            return self._forward_send(host, msg)
        self.stats.forwarded += 1
        return await self._exchange(host, msg.msg_id, msg, deadline, what=msg.to)

    def _check_host(self, host: str, what: str) -> None:
        """Fail fast if ``host`` is down or its circuit breaker is open."""
        now = trio.current_time()
        breaker = self.breaker(host)
        state = self.membership.peek(host)
        if state is None or not state[0].up:
            breaker.trip(now)
            self.stats.unreachable += 1
            raise errors.Unreachable(f"{what!r} is on {host}, which is down", detail={"host": host})
        if not breaker.allow(now) or self.links is None:
            self.stats.unreachable += 1
            raise errors.Unreachable(
                f"{what!r} is on {host}, which is unreachable (circuit open)",
                detail={"host": host, "breaker": breaker.state.value},
            )

    async def activate_remote(self, host: str, name: str, kind: str, deadline: float) -> Entry:
        """Ask ``host`` (the agent's owner) to activate ``name``; returns its entry."""
        msg_id = uuid.uuid4().hex
        ttl_ms = max(1, int((deadline - trio.current_time()) * 1000))
        ok, payload = await self._exchange(
            host, msg_id, Activate(msg_id, name, kind, ttl_ms), deadline, what=name
        )
        if not ok:
            raise errors.error_from_wire(payload)
        entry = self.registry.lookup(name)
        if entry is not None:
            return entry
        try:
            return Entry(
                name=payload["name"],
                node=payload["node"],
                kind=payload.get("kind", ""),
                capabilities=tuple(payload.get("capabilities", ())),
                metadata=dict(payload.get("metadata", {})),
                registered_at=int(payload.get("registered_at", 0)),
                entry_id=str(payload.get("entry_id", "")),
            )
        except (KeyError, TypeError, ValueError):
            raise errors.Internal("malformed activation result") from None

    async def _exchange(
        self, host: str, msg_id: str, msg: messages.Message, deadline: float, *, what: str
    ) -> tuple[bool, Any]:
        """Send one message to ``host`` and wait for its RESULT (breaker-guarded)."""
        key, waiter = self._exchange_begin(host, msg_id, msg, what=what)
        with trio.move_on_at(deadline):
            await waiter.event.wait()
        return self._exchange_end(host, key, waiter, what=what)

    def _exchange_begin(
        self, host: str, msg_id: str, msg: messages.Message, *, what: str
    ) -> tuple[str, _Waiter]:
        """Send one message to ``host``; its RESULT will settle the returned waiter."""
        self._check_host(host, what)
        assert self.links is not None
        key = f"{host}\x00{msg_id}"
        waiter = self._outbound[key] = _Waiter()
        if not self.links.send(host, messages.encode(msg)):
            self._outbound.pop(key, None)
            self.breaker(host).trial_in_flight = False
            raise errors.Overloaded(f"the link to {host} is backed up")
        return key, waiter

    def _exchange_end(self, host: str, key: str, waiter: _Waiter, *, what: str) -> tuple[bool, Any]:
        """The outcome of :meth:`_exchange_begin`, once settled or out of time (Timeout)."""
        self._outbound.pop(key, None)
        breaker = self.breaker(host)
        if not waiter.event.is_set():
            self.stats.timeouts += 1
            if self.links is not None and self.links.connected(host):
                breaker.trial_in_flight = False  # a slow handler is not a dead host
            else:
                breaker.failure(trio.current_time())
            raise errors.Timeout(
                f"no answer from {what!r} on {host} in time", detail={"host": host}
            )
        breaker.success()
        return waiter.ok, waiter.payload

    async def _serve_activate(self, peer: str, msg: Activate) -> None:
        deadline = trio.current_time() + msg.ttl_ms / 1000
        try:
            if self.activator is None:
                raise errors.Unreachable("this daemon does not place agents")
            if not self.activator.may_run(msg.kind):
                raise errors.Unreachable(
                    f"{msg.name!r} is a keep_majority agent and {self.node} is in a minority"
                )
            entry = await self.activator.activate_local(msg.name, msg.kind, deadline)
            ok, payload = True, entry.to_dict()
        except MeshError as exc:
            ok, payload = False, exc.to_wire()
        if self.links is not None:
            self.links.send(peer, messages.encode(Result(msg.msg_id, ok, payload)))

    async def control(self, host: str, op: str, args: dict[str, Any], timeout: float = 10.0) -> Any:
        """Run an operator command on another daemon (``meshctl drain HOST``)."""
        msg_id = uuid.uuid4().hex
        ok, payload = await self._exchange(
            host, msg_id, Control(msg_id, op, args), trio.current_time() + timeout, what=op
        )
        if not ok:
            raise errors.error_from_wire(payload)
        return payload

    async def _serve_control(self, peer: str, msg: Control) -> None:
        handler = self.control_handlers.get(msg.op)
        try:
            if handler is None:
                raise errors.Invalid(f"unknown control op {msg.op!r}")
            ok, payload = True, await handler(msg.args)
        except MeshError as exc:
            ok, payload = False, exc.to_wire()
        if self.links is not None:
            self.links.send(peer, messages.encode(Result(msg.msg_id, ok, payload)))

    def deactivate(self, name: str, reason: str) -> bool:
        """Ask the client serving ``name`` here to stop it after its current message."""
        agent = self.local.get(name)
        if agent is None:
            return False
        agent.stream.offer({"type": "deactivate", "reason": reason})
        return True

    # ------------------------------------------------------------------ local delivery

    async def _deliver_local(
        self, msg: Deliver, deadline: float, *, wait: bool
    ) -> tuple[bool, Any]:
        return await self._finish_local(msg, self._begin_local(msg, wait=wait), deadline)

    def _begin_local(self, msg: Deliver, *, wait: bool) -> _Delivery:
        """Hand ``msg`` to its local agent now, without yielding: deliveries reach an agent
        in the order they were begun (see :meth:`receive`). The answer, if one is wanted,
        is awaited by :meth:`_finish_local`."""
        now = trio.current_time()
        dedup = msg.at_least_once
        # Message ids are chosen by senders: they identify a message to one agent, so the
        # same id sent to another agent is another message.
        key = f"{msg.to}\x00{msg.msg_id}"
        if dedup:
            known = self.dedup.begin(key, now)
            if isinstance(known, Outcome):
                self.stats.duplicates += 1
                if not known.kept:
                    gone = errors.Conflict(
                        f"message {msg.msg_id!r} to {msg.to!r} was handled already; its "
                        "reply is no longer held (too large, or let go to make room)",
                        detail={"handled": True, "ok": known.ok},
                    )
                    return _Delivery(key, outcome=(False, gone.to_wire()))
                return _Delivery(key, outcome=(known.ok, known.payload))
            if isinstance(known, InProgress):
                self.stats.duplicates += 1
                waiter = _Waiter()
                self._dedup_waiters.setdefault(key, []).append(waiter)
                return _Delivery(key, waiter=waiter, duplicate=True)
        agent = self.local.get(msg.to)
        try:
            if self.leaving:
                # Peers fail its agents over as soon as they hear of the leave: none may
                # run here any more (callers retry; at-least-once ones reach the new host).
                raise errors.Unreachable(
                    f"{self.node} is leaving the cluster", detail={"host": self.node}
                )
            if agent is None:
                raise errors.Unreachable(f"{msg.to!r} is registered here but not served")
            if len(agent.pending) >= MAX_PENDING_PER_AGENT:
                raise errors.Overloaded(f"{msg.to!r} has too many messages waiting")
            waiter = _Waiter()
            if wait:
                agent.pending[msg.msg_id] = waiter
            agent.stream.emit(
                {
                    "type": "request" if msg.kind is DeliveryKind.REQUEST else "message",
                    "id": msg.msg_id,
                    "from": msg.sender,
                    "body": msg.body,
                    "at_least_once": msg.at_least_once,
                }
            )
        except MeshError as exc:
            if agent is not None:
                agent.pending.pop(msg.msg_id, None)
            if dedup:
                self.dedup.forget(key)
                self._wake_duplicates(key, False, exc.to_wire())
            return _Delivery(key, outcome=(False, exc.to_wire()))
        self.stats.local_deliveries += 1
        if not wait:
            return _Delivery(key, outcome=(True, None))
        return _Delivery(key, waiter=waiter, agent=agent)

    async def _finish_local(
        self, msg: Deliver, delivery: _Delivery, deadline: float
    ) -> tuple[bool, Any]:
        if delivery.outcome is not None:
            return delivery.outcome
        waiter = delivery.waiter
        assert waiter is not None
        with trio.move_on_at(deadline):
            await waiter.event.wait()
        return self._local_end(msg, delivery)

    def _when_local_done(
        self,
        msg: Deliver,
        delivery: _Delivery,
        deadline: float,
        finish: Callable[[bool, Any], None],
    ) -> None:
        """:meth:`_finish_local` without a task: ``finish(ok, payload)`` once the agent
        answered (or at once if it needs no answer), or at ``deadline``."""
        if delivery.outcome is not None:
            finish(*delivery.outcome)
            return
        waiter = delivery.waiter
        assert waiter is not None

        def end() -> None:
            try:
                outcome = self._local_end(msg, delivery)
            except MeshError as exc:
                outcome = (False, exc.to_wire())
            finish(*outcome)

        self._when_settled(waiter, deadline, end)

    def _local_end(self, msg: Deliver, delivery: _Delivery) -> tuple[bool, Any]:
        """The outcome of a local delivery whose waiter settled or whose time ran out."""
        waiter = delivery.waiter
        assert waiter is not None
        if delivery.duplicate:
            if not waiter.event.is_set():
                return False, errors.Timeout(
                    "the first delivery of this message is still running"
                ).to_wire()
            return waiter.ok, waiter.payload
        assert delivery.agent is not None
        delivery.agent.pending.pop(msg.msg_id, None)
        key = delivery.key
        if not waiter.event.is_set():
            self.stats.timeouts += 1
            error = errors.Timeout(f"{msg.to!r} did not answer in time").to_wire()
            if msg.at_least_once:
                self.dedup.forget(key)
                self._wake_duplicates(key, False, error)
            return False, error
        if msg.at_least_once:
            self.dedup.finish(
                key,
                waiter.ok,
                waiter.payload,
                trio.current_time(),
                body_size(waiter.payload),
            )
            self._wake_duplicates(key, waiter.ok, waiter.payload)
        return waiter.ok, waiter.payload

    def _wake_duplicates(self, msg_id: str, ok: bool, payload: Any) -> None:
        for waiter in self._dedup_waiters.pop(msg_id, []):
            waiter.settle(ok, payload)

    def client_reply(self, agent_name: str, msg_id: str, ok: bool, payload: Any) -> bool:
        """The serving client answered a delivery (reply to a request, or an ack)."""
        agent = self.local.get(agent_name)
        waiter = agent.pending.get(msg_id) if agent is not None else None
        if waiter is None:
            return False
        waiter.settle(ok, payload)
        return True

    # ------------------------------------------------------------------ agent hosting

    def attach(self, agent: LocalAgent) -> None:
        self.local[agent.entry.name] = agent

    def detach(self, name: str, owner: object) -> None:
        """``owner``'s agent ``name`` stopped (another owner's agent of that name stays)."""
        agent = self.local.get(name)
        if agent is None or agent.owner is not owner:
            return
        del self.local[name]
        for waiter in list(agent.pending.values()):
            waiter.settle(False, errors.Unreachable(f"{name!r} stopped").to_wire())

    def notify(self, name: str, notice: dict[str, Any]) -> bool:
        agent = self.local.get(name)
        if agent is None or agent.notices is None:
            return False
        agent.notices(notice)
        return True

    # ------------------------------------------------------------------ inbound frames

    async def receive(self, peer: str, frame: bytes) -> None:
        try:
            msg = messages.decode(frame)
        except WireError as exc:
            self.ratelog.warning(
                ("bad", peer), "dropped malformed routing message", peer=peer, error=str(exc)
            )
            return
        if isinstance(msg, Result):
            self.stats.results += 1
            waiter = self._outbound.pop(f"{peer}\x00{msg.msg_id}", None)
            if waiter is not None:
                waiter.settle(msg.ok, msg.payload)
            return
        if isinstance(msg, Signal):
            self._deliver_signal(msg.topic, msg.event)
            return
        assert self._nursery is not None
        if isinstance(msg, Activate):
            self._nursery.start_soon(self._serve_activate, peer, msg)
            return
        if isinstance(msg, Control):
            self._nursery.start_soon(self._serve_control, peer, msg)
            return
        self.stats.received += 1
        deadline = trio.current_time() + msg.ttl_ms / 1000
        wants_result = msg.kind is DeliveryKind.REQUEST or msg.at_least_once
        # Hand the message to the agent here, in the order the link delivered it (one task
        # per message would let the scheduler reorder them); the RESULT goes back from
        # wherever the agent's answer (or the deadline) is noticed.
        delivery = self._begin_local(msg, wait=wants_result)
        if wants_result:

            def answer(ok: bool, payload: Any) -> None:
                if self.links is not None:
                    self.links.send(peer, messages.encode(Result(msg.msg_id, ok, payload)))

            self._when_local_done(msg, delivery, deadline, _Done(answer, request=True))

    # ------------------------------------------------------------------ signals

    def subscribe(self, now: float, pattern: str, stream: EventSink) -> Callable[[], None]:
        """Deliver signals matching ``pattern`` to ``stream`` until the returned function is
        called. Both cost the same whatever the number of subscriptions held (the first and
        last subscriber of a pattern also mark it for this node's registry document)."""
        pattern = topics.check_pattern(pattern)
        token = next(self._tokens)
        streams = self._subscribers.get(pattern)
        if streams is None:
            streams = self._subscribers[pattern] = {}
            self._local_index.add(pattern)
            self._advertise(now, pattern)
        streams[token] = stream

        def cancel() -> None:
            held = self._subscribers.get(pattern)
            if held is None or held.pop(token, None) is None:
                return
            if not held:
                del self._subscribers[pattern]
                self._local_index.discard(pattern)
                self._advertise(trio.current_time(), pattern)

        return cancel

    def _advertise(self, now: float, pattern: str) -> None:
        """Mark ``pattern`` for this node's registry document, so that publishers anywhere
        know to send this host one copy of each matching signal. Written in batches (one
        document write for every pattern that changed meanwhile): a client opening or
        closing thousands of subscriptions costs a few writes, not one each."""
        self._unadvertised.add(pattern)
        if self._nursery is None:
            self._write_adverts(now)
        else:
            self._advertise_wake.set()

    async def _advertiser(self) -> None:
        while True:
            await self._advertise_wake.wait()
            self._advertise_wake = trio.Event()
            self._write_adverts(trio.current_time())
            # At most so many writes a second, however fast patterns come and go.
            await trio.sleep(_ADVERTISE_EVERY)

    def _write_adverts(self, now: float) -> None:
        changed, self._unadvertised = self._unadvertised, set()
        if not changed:
            return

        def mutate(subs: Map[Any]) -> None:
            for pattern in changed:
                if pattern in self._subscribers:
                    if subs.get(pattern) is None:
                        subs[pattern] = 1
                elif subs.get(pattern) is not None:
                    subs.pop(pattern, None)

        self.registry.write_own(now, SUBSCRIPTIONS, mutate)

    def on_doc_event(self, event: DocEvent) -> None:
        view = node_root(event, self.docs.store, SUBSCRIPTIONS)
        if view is None or view[0] == self.node:
            return  # not a registry document, or ours (known first-hand)
        host, subs = view
        patterns: frozenset[str] = frozenset()
        if subs is not None:
            found = []
            for pattern in subs.keys():  # noqa: SIM118 (pycrdt Map)
                try:
                    found.append(topics.check_pattern(pattern))
                except MeshError:
                    continue
            patterns = frozenset(found)
        before = self._host_patterns.get(host, frozenset())
        if patterns == before:
            return
        for pattern in before - patterns:
            hosts = self._pattern_hosts.get(pattern)
            if hosts is not None:
                hosts.discard(host)
                if not hosts:
                    del self._pattern_hosts[pattern]
                    self._host_index.discard(pattern)
        for pattern in patterns - before:
            hosts = self._pattern_hosts.get(pattern)
            if hosts is None:
                hosts = self._pattern_hosts[pattern] = set()
                self._host_index.add(pattern)
            hosts.add(host)
        if patterns:
            self._host_patterns[host] = patterns
        else:
            self._host_patterns.pop(host, None)

    def publish(self, topic: str, event: dict[str, Any]) -> int:
        """Send a signal once to every host with a matching subscriber; returns the number
        of hosts (this one included) it went to."""
        topics.check_topic(topic)
        if body_size(event) > MAX_BODY:
            raise errors.Invalid(f"signal larger than {MAX_BODY} bytes")
        self.stats.signals_published += 1
        hosts = 0
        frame = messages.encode(Signal(topic, event))
        if self._local_index.match(topic):
            self._deliver_signal(topic, event)
            hosts += 1
        remote: set[str] = set()
        for pattern in self._host_index.match(topic):
            remote |= self._pattern_hosts[pattern]
        for host in remote:
            state = self.membership.peek(host)
            if state is None or not state[0].up or self.links is None:
                continue
            if self.links.send(host, frame):
                hosts += 1
        self.stats.signal_hosts += hosts
        return hosts

    def _deliver_signal(self, topic: str, event: dict[str, Any]) -> None:
        receivers = [
            stream
            for pattern in self._local_index.match(topic)
            for stream in self._subscribers[pattern].values()
        ]
        payload = {"topic": topic, "event": event}
        for stream in receivers:
            self.stats.signals_delivered += 1
            stream.offer(payload)
