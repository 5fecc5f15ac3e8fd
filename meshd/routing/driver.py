"""The trio driver of the routing core: time, waiting, and the registry's documents.

It owns no routing rule. It feeds the :class:`~meshd.routing.core.RoutingCore` what arrives
(frames from the links, client answers, membership and link events) with the time, runs the
core's deadlines in one task, and does what needs waiting: starting an agent through the
:class:`~meshd.routing.ports.Activator` before a call, serving another daemon's ACTIVATE or
CONTROL, writing this node's signal patterns to its registry document in batches.

A call is started by :meth:`RoutingDriver.begin_call` (from an API session's read loop: the
outcome is handed to a callback, no task waits) or awaited with :meth:`RoutingDriver.call`;
both run the same core operation.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import trio
from pycrdt import Map

from meshd.membership.core import Membership
from meshd.registry.model import Entry
from meshd.registry.registry import Registry, node_root
from meshd.replication.core import DocEvent
from meshd.replication.documents import Documents
from meshd.routing.breaker import Breaker
from meshd.routing.core import RoutingCore
from meshd.routing.dedup import DedupWindow
from meshd.routing.limits import check_body
from meshd.routing.local import LocalAgent
from meshd.routing.messages import Activate, Control, DeliveryKind
from meshd.routing.outcome import Done, Err, Ok, Outcome, unwrap
from meshd.routing.ports import Activator, EventSink
from meshd.routing.stats import RouterStats
from meshd.transport.links import PeerLinks
from meshd_client.protocol import errors
from meshd_client.protocol.errors import MeshError
from meshd_client.protocol.tracecontext import TraceContext

if TYPE_CHECKING:
    from meshd.node.tracing import Tracer

SUBSCRIPTIONS: Final = "subscriptions"
_ADVERTISE_EVERY: Final = 0.02  # seconds between writes of this node's subscription patterns


class _Links:
    """The routing links as the core's :class:`~meshd.routing.ports.Wire` (none until
    :meth:`RoutingDriver.attach_links`: frames are refused)."""

    __slots__ = ("links",)

    def __init__(self) -> None:
        self.links: PeerLinks | None = None

    def send(self, peer: str, frame: bytes) -> bool:
        return self.links is not None and self.links.send(peer, frame)

    def connected(self, peer: str) -> bool:
        return self.links is not None and self.links.connected(peer)


class _Awaited:
    """An outcome a task waits for."""

    __slots__ = ("event", "outcome")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.outcome: Outcome | None = None

    def __call__(self, outcome: Outcome) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.event.set()


class RoutingDriver:
    """Runs the :class:`~meshd.routing.core.RoutingCore` under trio.

    Owns: the core, its deadline task, the tasks serving ACTIVATE and CONTROL, the operator
    commands this daemon accepts (``control_handlers``), and the batched writes of this
    node's ``subscriptions`` map (its only write, through the registry). Decides no routing
    rule. Never blocks the API session that called it: :meth:`begin_call` completes by
    callback. Does not start agents itself: a name active nowhere goes to the
    :class:`~meshd.routing.ports.Activator` (placement)."""

    def __init__(
        self,
        *,
        node: str,
        registry: Registry,
        docs: Documents,
        membership: Membership,
        log: logging.Logger,
        activator: Activator | None = None,
        dedup: DedupWindow | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.node = node
        self.registry = registry
        self.docs = docs
        self.log = log
        self._wire = _Links()
        self._advertise_wake = trio.Event()
        self.core = RoutingCore(
            node=node,
            directory=registry,
            members=membership,
            wire=self._wire,
            log=log,
            wake_advertiser=self._wake_advertiser,
            dedup=dedup,
        )
        # Placement, as routing sees it (None: this router starts no agents itself).
        self.activator = activator
        # Operator commands other daemons may send this one (e.g. "drain").
        self.control_handlers: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {}
        self._nursery: trio.Nursery | None = None
        self._timer_scope: trio.CancelScope | None = None
        # Spans for forwards, remote deliveries and activations (None: tracing off).
        self.tracer = tracer
        self.core.observer = tracer

    def _forwarding(
        self, entry: Entry, to: str, msg_id: str, trace: TraceContext | None, done: Done
    ) -> tuple[TraceContext | None, Done]:
        """With tracing on, a call to another host runs in a ``meshd.forward`` span: its
        context goes on the wire, and ``done`` ends it."""
        tracer = self.tracer
        if tracer is None or entry.node == self.node:
            return trace, done
        from meshd.node.tracing import CLIENT

        span = tracer.start(
            "meshd.forward",
            trace,
            CLIENT,
            **{
                "agent.name": to,
                "agent.kind": entry.kind or None,
                "peer": entry.node,
                "message.id": msg_id,
            },
        )
        return span.context, span.ending(done)

    @property
    def stats(self) -> RouterStats:
        return self.core.stats

    @property
    def breakers(self) -> dict[str, Breaker]:
        """One circuit breaker per host called."""
        return self.core.remote.breakers

    @property
    def local(self) -> dict[str, LocalAgent]:
        """The agents served by this host's clients, by name."""
        return self.core.local.agents

    @property
    def leaving(self) -> bool:
        return self.core.local.leaving

    @leaving.setter
    def leaving(self, value: bool) -> None:
        """Set when this daemon announces its leave: deliver nothing more."""
        self.core.local.leaving = value

    def attach_links(self, links: PeerLinks) -> None:
        self._wire.links = links

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._deadlines)
            nursery.start_soon(self._advertiser)
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # ------------------------------------------------------------------ deadlines

    async def _deadlines(self) -> None:
        while True:
            with trio.CancelScope(deadline=self.core.next_deadline()) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            try:
                self.core.tick(trio.current_time())
            except Exception:
                self.log.exception("routing deadline handling failed")

    def _rearm(self) -> None:
        """The core may have set an earlier deadline: wake the deadline task for it."""
        scope = self._timer_scope
        if scope is not None:
            deadline = self.core.next_deadline()
            if deadline < scope.deadline:  # noqa: PLR1730 (assigning a deadline costs)
                scope.deadline = deadline

    async def _wait(self, waiter: _Awaited, deadline: float) -> Outcome:
        """The outcome ``waiter`` gets from the core; at ``deadline`` the core's own
        deadline rule settles it (run here if the deadline task has not yet)."""
        with trio.move_on_at(deadline):
            await waiter.event.wait()
        if waiter.outcome is None:
            self.core.tick(trio.current_time())
        assert waiter.outcome is not None
        return waiter.outcome

    # ------------------------------------------------------------------ health & breakers

    def host_down(self, host: str) -> None:
        self.core.host_down(trio.current_time(), host)

    def host_suspect(self, host: str) -> None:
        """Membership suspects ``host``: its circuit opens (new calls fail fast)."""
        self.core.host_suspect(trio.current_time(), host)

    def host_up(self, host: str) -> None:
        self.core.host_up(host)

    def link_lost(self, host: str) -> None:
        """Our connection to ``host`` broke: results of requests sent on it will not come
        (a restarted daemon forgot them), so fail them now instead of at their timeout."""
        self.core.link_lost(host)

    def link_status(self, host: str, connected: bool) -> None:
        """PeerLinks tells us whether connecting to ``host`` worked."""
        self.core.link_status(trio.current_time(), host, connected)

    def health(self, name: str) -> dict[str, Any]:
        return self.core.health(name)

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
        trace: TraceContext | None = None,
    ) -> Any:
        """Deliver a message or request; returns the reply body (None for sends). An agent
        active nowhere is activated first (by placement), within the same timeout."""
        check_body(body)
        now = trio.current_time()
        deadline = now + timeout
        entry = self.registry.lookup(to)
        if entry is None and self.activator is not None:
            entry = await self._activate(to, deadline, trace)
            now = trio.current_time()
        if entry is None:
            raise self.core.missing(to)
        waiter = _Awaited()
        msg_id = msg_id or uuid.uuid4().hex
        done: Done = waiter
        if self.tracer is not None:
            trace, done = self._forwarding(entry, to, msg_id, trace, done)
        self.core.call(
            now,
            entry=entry,
            msg_id=msg_id,
            to=to,
            body=body,
            sender=sender,
            kind=kind,
            at_least_once=at_least_once,
            timeout=timeout,
            deadline=deadline,
            done=done,
            trace=trace,
        )
        self._rearm()
        return unwrap(await self._wait(waiter, deadline))

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
        done: Done,
        trace: TraceContext | None = None,
    ) -> bool:
        """:meth:`call` without waiting: ``done`` gets the outcome once (``Ok(reply)``,
        ``Ok(None)`` for a send, or ``Err``), possibly before this returns. Calls refused at
        once raise. Returns False, having done nothing, if the call cannot start without
        waiting (the agent is not active anywhere yet, so placement must activate it first,
        or the driver is not running): use :meth:`call` then."""
        if self._nursery is None:
            return False
        check_body(body)
        entry = self.registry.lookup(to)
        if entry is None:
            if self.activator is not None:
                return False
            raise self.core.missing(to)
        now = trio.current_time()
        msg_id = msg_id or uuid.uuid4().hex
        if self.tracer is not None:
            trace, done = self._forwarding(entry, to, msg_id, trace, done)
        self.core.call(
            now,
            entry=entry,
            msg_id=msg_id,
            to=to,
            body=body,
            sender=sender,
            kind=kind,
            at_least_once=at_least_once,
            timeout=timeout,
            deadline=now + timeout,
            done=done,
            trace=trace,
        )
        self._rearm()
        return True

    async def _activate(self, to: str, deadline: float, trace: TraceContext | None) -> Entry | None:
        """A virtual agent (or one whose host died): activate it where it belongs (in a
        ``meshd.activate`` span with tracing on). None if nobody serves its kind."""
        assert self.activator is not None
        span = None
        if self.tracer is not None:
            span = self.tracer.start("meshd.activate", trace, **{"agent.name": to})
        outcome = "cancelled"
        try:
            entry = await self.activator.ensure_active(to, None, deadline)
            outcome = "ok"
            if span is not None:
                span.set("meshd.agent.kind", entry.kind)
                span.set("meshd.agent.host", entry.node)
            return entry
        except errors.NotFound:
            outcome = "not_found"
            return None
        except MeshError as exc:
            outcome = exc.kind.value
            raise
        finally:
            if span is not None:
                span.end(outcome)

    async def activate_remote(self, host: str, name: str, kind: str, deadline: float) -> Entry:
        """Ask ``host`` (the agent's owner) to activate ``name``; returns its entry."""
        waiter = _Awaited()
        now = trio.current_time()
        self.core.activate(now, host, uuid.uuid4().hex, name, kind, deadline, waiter)
        self._rearm()
        payload = unwrap(await self._wait(waiter, deadline))
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
        except (KeyError, TypeError, ValueError, AttributeError):
            raise errors.Internal("malformed activation result") from None

    async def control(self, host: str, op: str, args: dict[str, Any], timeout: float = 10.0) -> Any:
        """Run an operator command on another daemon (``meshctl drain HOST``)."""
        now = trio.current_time()
        waiter = _Awaited()
        deadline = now + timeout
        self.core.control(now, host, uuid.uuid4().hex, op, args, deadline, waiter)
        self._rearm()
        return unwrap(await self._wait(waiter, deadline))

    # ------------------------------------------------------------------ inbound frames

    async def receive(self, peer: str, frame: bytes) -> None:
        request = self.core.receive(trio.current_time(), peer, frame)
        self._rearm()
        if request is not None:
            assert self._nursery is not None
            if isinstance(request, Activate):
                self._nursery.start_soon(self._serve_activate, peer, request)
            else:
                self._nursery.start_soon(self._serve_control, peer, request)

    async def _serve_activate(self, peer: str, msg: Activate) -> None:
        deadline = trio.current_time() + msg.ttl_ms / 1000
        outcome: Outcome
        try:
            if self.activator is None:
                raise errors.Unreachable("this daemon does not place agents")
            if not self.activator.may_run(msg.kind):
                raise errors.Unreachable(
                    f"{msg.name!r} is a keep_majority agent and {self.node} is in a minority"
                )
            entry = await self.activator.activate_local(msg.name, msg.kind, deadline)
            outcome = Ok(entry.to_dict())
        except MeshError as exc:
            outcome = Err(exc)
        self.core.answer(peer, msg.msg_id, outcome)

    async def _serve_control(self, peer: str, msg: Control) -> None:
        handler = self.control_handlers.get(msg.op)
        outcome: Outcome
        try:
            if handler is None:
                raise errors.Invalid(f"unknown control op {msg.op!r}")
            outcome = Ok(await handler(msg.args))
        except MeshError as exc:
            outcome = Err(exc)
        self.core.answer(peer, msg.msg_id, outcome)

    # ------------------------------------------------------------------ agents served here

    def attach(self, agent: LocalAgent) -> None:
        self.core.local.attach(agent)

    def detach(self, name: str, owner: object) -> None:
        """``owner``'s agent ``name`` stopped (another owner's agent of that name stays)."""
        self.core.local.detach(trio.current_time(), name, owner)

    def client_reply(self, agent_name: str, msg_id: str, outcome: Outcome) -> bool:
        """The serving client answered a delivery (reply to a request, or an ack)."""
        return self.core.local.reply(trio.current_time(), agent_name, msg_id, outcome)

    def deactivate(self, name: str, reason: str) -> bool:
        """Ask the client serving ``name`` here to stop it after its current message."""
        return self.core.local.deactivate(name, reason)

    def notify(self, name: str, notice: dict[str, Any]) -> bool:
        return self.core.local.notify(name, notice)

    # ------------------------------------------------------------------ signals

    def subscribe(self, pattern: str, stream: EventSink) -> Callable[[], None]:
        """Deliver signals matching ``pattern`` to ``stream`` until the returned function
        is called."""
        return self.core.signals.subscribe(pattern, stream)

    def publish(self, topic: str, event: dict[str, Any]) -> int:
        return self.core.signals.publish(topic, event)

    def _wake_advertiser(self) -> None:
        """A pattern changed: write it soon, in a batch (at once if not running yet)."""
        if self._nursery is None:
            self._write_adverts(trio.current_time())
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
        changed = self.core.signals.take_adverts()
        if not changed:
            return
        subscribed = self.core.signals.subscribed

        def mutate(subs: Map[Any]) -> None:
            for pattern in changed:
                if subscribed(pattern):
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
        patterns = list(subs.keys()) if subs is not None else []
        self.core.signals.set_host_patterns(host, patterns)
