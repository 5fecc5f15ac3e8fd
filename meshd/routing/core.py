"""The routing core: calls by agent name, sans-IO.

A call names an agent, never a host. The core resolves the name in the registry index
(:class:`~meshd.routing.ports.Directory`); if the agent is served here the message goes to
its client (:mod:`~meshd.routing.local`), otherwise it goes once over the ROUTING link to the
hosting daemon (:mod:`~meshd.routing.forward`), which delivers it and sends back a RESULT.
Guarantees, per call:

* ``send`` (at most once): handed to the local agent or to the link; no answer awaited.
* ``send``/``request`` with ``at_least_once``: the hosting daemon remembers message ids, so a
  retry with the same id does not run the handler again: it waits for, or receives, the
  first attempt's outcome.
* Order is kept per sender and receiver: one link per host pair, one queue per agent.

Like the membership core it imports no trio, sockets or clock: inputs come with ``now``,
frames leave through a :class:`~meshd.routing.ports.Wire` (which queues without blocking),
outcomes go to each call's ``done`` callback (:mod:`~meshd.routing.outcome`), and the core's
deadlines are a :class:`~meshd.timers.TimerHeap` the driver runs (:meth:`RoutingCore.tick`
at :meth:`RoutingCore.next_deadline`). What needs waiting — starting an agent somewhere,
serving an ACTIVATE or CONTROL — is the driver's (:mod:`~meshd.routing.driver`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from meshd.logs import RateLimitedLog
from meshd.registry.model import Entry
from meshd.routing import messages
from meshd.routing.breaker import BreakerState
from meshd.routing.dedup import DedupWindow
from meshd.routing.forward import Remote
from meshd.routing.local import LocalAgents
from meshd.routing.messages import Activate, Control, Deliver, DeliveryKind, Result, Signal
from meshd.routing.outcome import SENT, Done, Ok, Outcome, complete, to_result
from meshd.routing.ports import DeliveryObserver, Directory, Members, Wire
from meshd.routing.signals import Signals
from meshd.routing.stats import RouterStats
from meshd.timers import TimerHeap
from meshd.wire.membership import Status
from meshd.wire.validate import WireError
from meshd_client.protocol import errors
from meshd_client.protocol.errors import MeshError
from meshd_client.protocol.tracecontext import TraceContext


def _ttl_ms(timeout: float) -> int:
    return max(1, int(timeout * 1000))


def _drop_reply(done: Done) -> Done:
    """A send's outcome carries no reply body (an acknowledging client may send one)."""

    def sent(outcome: Outcome) -> None:
        done(SENT if isinstance(outcome, Ok) else outcome)

    return sent


class RoutingCore:
    """Routes messages, requests and signals to agents by name.

    Owns: the agents served here and their deliveries (``local``), the exchanges under way
    with other hosts and one circuit breaker per host (``remote``), the receiver's
    at-least-once window, the signal subscriptions (``signals``), the deadlines of all of
    these (``timers``). Reads the registry index and membership; writes nothing but frames
    and outcomes. Must not start agents: that needs waiting, and is the driver's."""

    def __init__(
        self,
        *,
        node: str,
        directory: Directory,
        members: Members,
        wire: Wire,
        log: logging.Logger,
        wake_advertiser: Callable[[], None] | None = None,
        dedup: DedupWindow | None = None,
    ) -> None:
        self.node = node
        self.directory = directory
        self.members = members
        self.wire = wire
        self.ratelog = RateLimitedLog(log)
        self.stats = RouterStats()
        self.timers = TimerHeap()
        self.dedup = dedup if dedup is not None else DedupWindow()
        self.local = LocalAgents(node=node, timers=self.timers, stats=self.stats, dedup=self.dedup)
        self.remote = Remote(wire=wire, members=members, timers=self.timers, stats=self.stats)
        self.signals = Signals(
            wire=wire,
            members=members,
            stats=self.stats,
            wake=wake_advertiser if wake_advertiser is not None else lambda: None,
        )
        # Tracing's view of deliveries from other hosts (None: tracing is off).
        self.observer: DeliveryObserver | None = None

    # ------------------------------------------------------------------ time

    def next_deadline(self) -> float:
        return self.timers.next_deadline()

    def tick(self, now: float) -> None:
        """Run every deadline due at ``now``."""
        self.timers.run(now)

    # ------------------------------------------------------------------ calls

    def missing(self, to: str) -> MeshError:
        """The error for a call to an agent that is not registered anywhere live."""
        gone = self.directory.last_known(to)
        if gone is not None:
            self.stats.unreachable += 1
            return errors.Unreachable(
                f"{to!r} is on {gone.node}, which is down or unreachable",
                detail={"host": gone.node},
            )
        return errors.NotFound(f"no live agent named {to!r}")

    def call(
        self,
        now: float,
        *,
        entry: Entry,
        msg_id: str,
        to: str,
        body: Any,
        sender: str,
        kind: DeliveryKind,
        at_least_once: bool,
        timeout: float,
        deadline: float,
        done: Done,
        trace: TraceContext | None = None,
    ) -> None:
        """Deliver a message or request to ``to``, which ``entry`` says runs on
        ``entry.node``. ``done`` gets ``Ok(reply)`` (``Ok(None)`` for a send) or
        ``Err(error)``, once, possibly before this returns. A call refused before anything
        was sent raises instead. ``trace`` travels with the message to the agent."""
        msg = Deliver(msg_id, to, sender, kind, at_least_once, _ttl_ms(timeout), body, trace)
        if kind is not DeliveryKind.REQUEST:
            done = _drop_reply(done)
        wait = kind is DeliveryKind.REQUEST or at_least_once
        if entry.node == self.node:
            self.local.deliver(now, msg, deadline, wait=wait, done=done)
        elif not wait:
            self.remote.send(now, entry.node, msg)
            complete(done, SENT)
        else:
            self.stats.forwarded += 1
            self.remote.exchange(now, entry.node, msg_id, msg, deadline, done, what=to)

    def activate(
        self, now: float, host: str, msg_id: str, name: str, kind: str, deadline: float, done: Done
    ) -> None:
        """Ask ``host`` (the agent's owner) to start ``name``; ``done`` gets its entry as a
        map. Raises if the request cannot be sent."""
        msg = Activate(msg_id, name, kind, _ttl_ms(deadline - now))
        self.remote.exchange(now, host, msg_id, msg, deadline, done, what=name)

    def control(
        self,
        now: float,
        host: str,
        msg_id: str,
        op: str,
        args: dict[str, Any],
        deadline: float,
        done: Done,
    ) -> None:
        """Run an operator command on ``host``; ``done`` gets its answer."""
        self.remote.exchange(now, host, msg_id, Control(msg_id, op, args), deadline, done, what=op)

    # ------------------------------------------------------------------ inbound frames

    def receive(self, now: float, peer: str, frame: bytes) -> Activate | Control | None:
        """A frame from ``peer`` on the ROUTING link. Returns the requests only the driver
        can serve (they need waiting); it answers them with :meth:`answer`."""
        try:
            msg = messages.decode(frame)
        except WireError as exc:
            self.ratelog.warning(
                ("bad", peer), "dropped malformed routing message", peer=peer, error=str(exc)
            )
            return None
        if isinstance(msg, Result):
            self.remote.on_result(peer, msg)
            return None
        if isinstance(msg, Signal):
            self.signals.deliver(msg.topic, msg.event)
            return None
        if isinstance(msg, Activate | Control):
            return msg
        self.stats.received += 1
        if msg.bad_trace:
            self.stats.bad_trace_context += 1
        deadline = now + msg.ttl_ms / 1000
        observed: Done | None = None
        if self.observer is not None:
            msg, observed = self.observer.remote_delivery(peer, msg)
        if msg.kind is DeliveryKind.REQUEST or msg.at_least_once:
            # Handed to the agent here, in the order the link delivered it; the RESULT goes
            # back from wherever the agent's answer (or the deadline) is noticed.
            msg_id = msg.msg_id

            def answer(outcome: Outcome) -> None:
                if observed is not None:
                    observed(outcome)
                self.answer(peer, msg_id, outcome)

            self.local.deliver(now, msg, deadline, wait=True, done=answer)
        else:
            self.local.deliver(now, msg, deadline, wait=False, done=observed or _ignore)
        return None

    def answer(self, peer: str, msg_id: str, outcome: Outcome) -> None:
        """Send ``peer`` the RESULT of its message ``msg_id``."""
        self.wire.send(peer, messages.encode(to_result(msg_id, outcome)))

    # ------------------------------------------------------------------ health

    def host_down(self, now: float, host: str) -> None:
        self.remote.host_down(now, host)

    def host_suspect(self, now: float, host: str) -> None:
        self.remote.host_suspect(now, host)

    def host_up(self, host: str) -> None:
        self.remote.host_up(host)

    def link_lost(self, host: str) -> None:
        self.remote.link_lost(host)

    def link_status(self, now: float, host: str, connected: bool) -> None:
        self.remote.link_status(now, host, connected)

    def health(self, name: str) -> dict[str, Any]:
        entry = self.directory.lookup(name)
        if entry is None:
            gone = self.directory.last_known(name)
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
            served = name in self.local.agents
            out["health"] = "healthy" if served else "unreachable"
            if not served:
                out["reason"] = "registered but not served by a client"
            return out
        state = self.members.peek(entry.node)
        breaker = self.remote.breaker(entry.node)
        out["breaker"] = breaker.state.value
        if state is None or not state[0].up or breaker.state is BreakerState.OPEN:
            out["health"] = "unreachable"
        elif state[0] is Status.SUSPECT or breaker.state is BreakerState.HALF_OPEN:
            out["health"] = "degraded"
        else:
            out["health"] = "healthy"
        return out


def _ignore(_outcome: Outcome) -> None:
    return None
