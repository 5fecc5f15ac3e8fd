"""Delivery to the agents served by this daemon's clients.

Sans-IO: an agent's events go to its :class:`~meshd.routing.ports.EventSink`, time comes in
as ``now``, deadlines are timers on the core's heap. Rules, per delivery:

* It reaches the agent at once, in the order deliveries were begun.
* It fails at once: ``unreachable`` while this daemon leaves or if no client serves the
  agent here; ``overloaded`` with :data:`~meshd.routing.limits.MAX_PENDING_PER_AGENT`
  deliveries awaiting the agent's answer, or if its client is not keeping up.
* If an answer is wanted (a request, or an at-least-once send) it ends with the client's
  answer, with ``unreachable`` if the agent stops first, or with ``timeout`` at its deadline.
* At-least-once: the message id (per receiving agent) is remembered in the
  :class:`~meshd.routing.dedup.DedupWindow`. A repeat of a finished one gets the first
  outcome (``conflict`` if its reply was let go) without running the handler again; a repeat
  of one in progress waits for the first one's outcome (``timeout`` at its own deadline). A
  first delivery that fails before the handler answered is forgotten, so a retry runs it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshd.registry.model import Entry
from meshd.routing.dedup import DedupWindow, InProgress
from meshd.routing.dedup import Outcome as Remembered
from meshd.routing.limits import MAX_PENDING_PER_AGENT, body_size
from meshd.routing.messages import Deliver, DeliveryKind
from meshd.routing.outcome import SENT, Done, Err, Ok, Outcome, complete
from meshd.routing.ports import EventSink
from meshd.routing.stats import RouterStats
from meshd.timers import Timer, TimerHeap
from meshd_client.protocol import errors
from meshd_client.protocol.errors import MeshError

# An at-least-once message: the receiving agent and the sender's message id.
MessageKey = tuple[str, str]


@dataclass(slots=True, eq=False)
class _Delivery:
    """A delivery awaiting its agent's answer."""

    msg: Deliver
    agent: LocalAgent
    done: Done
    timer: Timer[_Delivery] | None = None


@dataclass(slots=True, eq=False)
class _Repeat:
    """A repeat of an at-least-once message whose first delivery is still running."""

    key: MessageKey
    done: Done
    timer: Timer[_Repeat] | None = None


@dataclass(slots=True)
class LocalAgent:
    """An agent served by a client session on this host."""

    entry: Entry
    owner: object  # the client serving it (compared by identity)
    stream: EventSink
    pending: dict[str, _Delivery] = field(default_factory=dict)
    notices: Callable[[dict[str, Any]], None] | None = None
    # Asked before each delivery: an error refuses it (placement's keep_majority lease).
    gate: Callable[[], MeshError | None] | None = None


def _copy(outcome: Outcome) -> Outcome:
    """An outcome of one's own (an error raised by several waiters is one object each)."""
    if isinstance(outcome, Err):
        return Err(errors.error_from_wire(outcome.error.to_wire()))
    return outcome


class LocalAgents:
    """Owns the agents served here, the deliveries awaiting their answers and the
    receiver's at-least-once window. Knows nothing of other hosts."""

    def __init__(
        self, *, node: str, timers: TimerHeap, stats: RouterStats, dedup: DedupWindow
    ) -> None:
        self.node = node
        self.timers = timers
        self.stats = stats
        self.dedup = dedup
        self.agents: dict[str, LocalAgent] = {}
        self.leaving = False  # this daemon announced its leave: deliver nothing more
        self._repeats: dict[MessageKey, list[_Repeat]] = {}

    # ------------------------------------------------------------------ agents

    def attach(self, agent: LocalAgent) -> None:
        self.agents[agent.entry.name] = agent

    def detach(self, now: float, name: str, owner: object) -> None:
        """``owner``'s agent ``name`` stopped (another owner's agent of that name stays):
        what awaits its answer fails with ``unreachable``."""
        agent = self.agents.get(name)
        if agent is None or agent.owner is not owner:
            return
        del self.agents[name]
        for delivery in list(agent.pending.values()):
            self._settle(now, delivery, Err(errors.Unreachable(f"{name!r} stopped")))

    def deactivate(self, name: str, reason: str) -> bool:
        """Ask the client serving ``name`` here to stop it after its current message."""
        agent = self.agents.get(name)
        if agent is None:
            return False
        agent.stream.offer({"type": "deactivate", "reason": reason})
        return True

    def notify(self, name: str, notice: dict[str, Any]) -> bool:
        agent = self.agents.get(name)
        if agent is None or agent.notices is None:
            return False
        agent.notices(notice)
        return True

    # ------------------------------------------------------------------ deliveries

    def deliver(self, now: float, msg: Deliver, deadline: float, *, wait: bool, done: Done) -> None:
        """Hand ``msg`` to its agent now; ``done`` gets the outcome (at once unless
        ``wait``: the agent's answer, or the deadline)."""
        key: MessageKey = (msg.to, msg.msg_id)
        dedup = msg.at_least_once
        if dedup:
            known = self.dedup.begin(key, now)
            if known is not None:
                self.stats.duplicates += 1
                self._repeat(key, known, deadline, done)
                return
        agent = self.agents.get(msg.to)
        delivery: _Delivery | None = None
        try:
            if self.leaving:
                # Peers fail its agents over as soon as they hear of the leave: none may
                # run here any more (callers retry; at-least-once ones reach the new host).
                raise errors.Unreachable(
                    f"{self.node} is leaving the cluster", detail={"host": self.node}
                )
            if agent is None:
                raise errors.Unreachable(f"{msg.to!r} is registered here but not served")
            if agent.gate is not None and (refused := agent.gate()) is not None:
                raise refused
            if len(agent.pending) >= MAX_PENDING_PER_AGENT:
                raise errors.Overloaded(f"{msg.to!r} has too many messages waiting")
            if wait:
                delivery = _Delivery(msg, agent, done)
                agent.pending[msg.msg_id] = delivery
            event = {
                "type": "request" if msg.kind is DeliveryKind.REQUEST else "message",
                "id": msg.msg_id,
                "from": msg.sender,
                "body": msg.body,
                "at_least_once": msg.at_least_once,
            }
            if msg.trace is not None:
                msg.trace.to_args(event)  # the handler runs in the call's trace
            agent.stream.emit(event)
        except MeshError as exc:
            if agent is not None:
                agent.pending.pop(msg.msg_id, None)
            if dedup:
                self.dedup.forget(key)
                self._wake_repeats(key, Err(exc))
            complete(done, Err(exc))
            return
        self.stats.local_deliveries += 1
        if delivery is None:
            complete(done, SENT)
            return
        delivery.timer = self.timers.at(deadline, self._expired, delivery)

    def reply(self, now: float, agent_name: str, msg_id: str, outcome: Outcome) -> bool:
        """The serving client answered a delivery (a reply to a request, or an ack); False
        if no delivery with that id awaits an answer."""
        agent = self.agents.get(agent_name)
        delivery = agent.pending.get(msg_id) if agent is not None else None
        if delivery is None:
            return False
        self._settle(now, delivery, outcome)
        return True

    def _unlink(self, delivery: _Delivery) -> None:
        pending = delivery.agent.pending
        if pending.get(delivery.msg.msg_id) is delivery:
            del pending[delivery.msg.msg_id]

    def _settle(self, now: float, delivery: _Delivery, outcome: Outcome) -> None:
        self._unlink(delivery)
        if delivery.timer is not None:
            self.timers.cancel(delivery.timer)
            delivery.timer = None
        msg = delivery.msg
        if msg.at_least_once:
            key = (msg.to, msg.msg_id)
            if isinstance(outcome, Ok):
                ok, payload = True, outcome.value
            else:
                ok, payload = False, outcome.error.to_wire()
            self.dedup.finish(key, ok, payload, now, body_size(payload))
            self._wake_repeats(key, outcome)
        complete(delivery.done, outcome)

    def _expired(self, _now: float, delivery: _Delivery) -> None:
        delivery.timer = None
        self._unlink(delivery)
        self.stats.timeouts += 1
        msg = delivery.msg
        error = errors.Timeout(f"{msg.to!r} did not answer in time")
        if msg.at_least_once:
            key = (msg.to, msg.msg_id)
            self.dedup.forget(key)
            self._wake_repeats(key, Err(error))
        complete(delivery.done, Err(error))

    # ------------------------------------------------------------------ repeats

    def _repeat(
        self, key: MessageKey, known: Remembered | InProgress, deadline: float, done: Done
    ) -> None:
        if isinstance(known, Remembered):
            if not known.kept:
                gone = errors.Conflict(
                    f"message {key[1]!r} to {key[0]!r} was handled already; its "
                    "reply is no longer held (too large, or let go to make room)",
                    detail={"handled": True, "ok": known.ok},
                )
                complete(done, Err(gone))
            elif known.ok:
                complete(done, Ok(known.payload))
            else:
                complete(done, Err(errors.error_from_wire(known.payload)))
            return
        repeat = _Repeat(key, done)
        self._repeats.setdefault(key, []).append(repeat)
        repeat.timer = self.timers.at(deadline, self._repeat_expired, repeat)

    def _wake_repeats(self, key: MessageKey, outcome: Outcome) -> None:
        for repeat in self._repeats.pop(key, ()):
            if repeat.timer is not None:
                self.timers.cancel(repeat.timer)
                repeat.timer = None
            complete(repeat.done, _copy(outcome))

    def _repeat_expired(self, _now: float, repeat: _Repeat) -> None:
        repeat.timer = None
        waiting = self._repeats.get(repeat.key)
        if waiting is not None and repeat in waiting:
            waiting.remove(repeat)
            if not waiting:
                del self._repeats[repeat.key]
        error = errors.Timeout("the first delivery of this message is still running")
        complete(repeat.done, Err(error))
