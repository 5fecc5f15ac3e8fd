"""Reminders: messages an agent schedules to itself, durably and at least once.

A reminder lives in the agent's replicated state document (root map ``reminders``: name →
``[due_ms, every_ms, data]``, wall-clock milliseconds), so it is on disk with the rest of
the state and survives restarts, moves and failovers: the daemon where the agent is active
at the time fires it. Firing sends the agent a message from ``meshd:reminders`` with body
``{"reminder": name, "data": data, "id": id, "due_ms": due}`` at least once: the
reminder is rescheduled (periodic) or removed (one-shot) only **after** the agent handled
the message. If the agent, its runner or its host dies first, the reminder is still due and
fires again — at the agent's next activation, wherever that is — with the same ``id``
(``name@due_ms``), so that the agent can tell a repeat. A delivery that fails is retried with
back-off (1 s doubling to 60 s). Timers, by contrast, live in the client with the
activation and die with it.

:class:`Reminders` decides (what is due, what a delivery's outcome changes) from the
documents and the times it is given: it reads no clock and does no I/O.
:class:`~meshd.placement.reminder_driver.ReminderDriver` polls it and delivers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from pycrdt import Doc, Map

from meshd.placement.service import state_doc
from meshd.replication.documents import Documents
from meshd_client.protocol import cbor, errors

ROOT: Final = "reminders"
SENDER: Final = "meshd:reminders"
MIN_PERIOD_MS: Final = 100
MAX_REMINDERS: Final = 1000
RETRY_MIN: Final = 1.0
RETRY_MAX: Final = 60.0


def _decode(raw: Any) -> tuple[int, int, Any] | None:
    try:
        due, every, data = cbor.loads(bytes(raw))
    except (cbor.CodecError, ValueError, TypeError):
        return None
    if type(due) is not int or type(every) is not int:
        return None
    return due, every, data


def reminder_id(name: str, due_ms: int) -> str:
    """The id of one occurrence: the same for every attempt to deliver it."""
    return f"{name}@{due_ms}"


@dataclass(frozen=True, slots=True)
class Occurrence:
    """One reminder due for delivery: the agent, the reminder, when it was due, its data."""

    agent: str
    name: str
    due_ms: int
    data: Any

    @property
    def id(self) -> str:
        return reminder_id(self.name, self.due_ms)

    def body(self) -> dict[str, Any]:
        """The message the agent receives."""
        return {"reminder": self.name, "data": self.data, "id": self.id, "due_ms": self.due_ms}


class Reminders:
    """The reminders of the agents active here: what is due, and what a delivery changes.

    Owns the in-flight and retry bookkeeping; the reminders themselves live in the agents'
    state documents, written through ``docs`` (the one write path into replication)."""

    def __init__(self, docs: Documents, local_agents: Callable[[], list[str]]) -> None:
        self.docs = docs
        self.local_agents = local_agents
        self.fired = 0
        self.retried = 0
        # Occurrences being delivered from here, and when a failed one may be tried again.
        self._in_flight: set[tuple[str, str, int]] = set()
        self._retry: dict[tuple[str, str, int], tuple[float, float]] = {}

    # ------------------------------------------------------------------ API side

    def set(self, now: float, agent: str, name: str, due_ms: int, every_ms: int, data: Any) -> None:
        if not isinstance(name, str) or not 0 < len(name) <= 128:
            raise errors.Invalid("a reminder name is 1..128 characters")
        if every_ms and every_ms < MIN_PERIOD_MS:
            raise errors.Invalid(f"a periodic reminder fires at most every {MIN_PERIOD_MS} ms")

        def mutate(doc: Doc[Any]) -> None:
            reminders: Map[Any] = doc.get(ROOT, type=Map)
            if name not in reminders and len(reminders) >= MAX_REMINDERS:
                raise errors.Overloaded(f"{agent!r} has {MAX_REMINDERS} reminders already")
            reminders[name] = cbor.dumps([due_ms, every_ms, data])

        self._write(now, agent, mutate)

    def forget(self, now: float, agent: str, name: str) -> bool:
        replica = self.docs.store.get(state_doc(agent))
        if replica is None or name not in replica.doc.get(ROOT, type=Map):
            return False
        self._write(now, agent, lambda doc: doc.get(ROOT, type=Map).pop(name, None))
        return True

    def listing(self, agent: str) -> dict[str, dict[str, Any]]:
        replica = self.docs.store.get(state_doc(agent))
        if replica is None:
            return {}
        out = {}
        for name, raw in replica.doc.get(ROOT, type=Map).items():
            decoded = _decode(raw)
            if decoded is not None:
                out[name] = {"due_ms": decoded[0], "every_ms": decoded[1], "data": decoded[2]}
        return out

    def _write(self, now: float, agent: str, mutate: Callable[[Doc[Any]], None]) -> None:
        doc = state_doc(agent)
        replica = self.docs.store.get(doc)
        epoch = replica.epoch if replica is not None else 0
        self.docs.write(now, doc, mutate, epoch=epoch)

    # ------------------------------------------------------------------ firing

    def due(self, now: float, wall_ms: int) -> list[Occurrence]:
        """Occurrences to deliver now, at wall-clock ``wall_ms`` (each is then in flight
        until :meth:`handled` or :meth:`failed`)."""
        out: list[Occurrence] = []
        for agent in self.local_agents():
            replica = self.docs.store.get(state_doc(agent))
            if replica is None:
                continue
            for name, raw in replica.doc.get(ROOT, type=Map).items():
                decoded = _decode(raw)
                if decoded is None or decoded[0] > wall_ms:
                    continue
                key = (agent, name, decoded[0])
                if key in self._in_flight:
                    continue
                retry = self._retry.get(key)
                if retry is not None and now < retry[0]:
                    continue
                self._in_flight.add(key)
                out.append(Occurrence(agent, name, decoded[0], decoded[2]))
        return out

    def handled(self, now: float, wall_ms: int, agent: str, name: str, due: int) -> None:
        """The agent handled the occurrence due at ``due``: reschedule (after ``wall_ms``)
        or remove the reminder — unless it was changed meanwhile (set again, or forgotten)."""
        key = (agent, name, due)
        self._in_flight.discard(key)
        self._retry.pop(key, None)
        self.fired += 1

        def advance(doc: Doc[Any]) -> None:
            target: Map[Any] = doc.get(ROOT, type=Map)
            current = _decode(target.get(name)) if name in target else None
            if current is None or current[0] != due:
                return
            every = current[1]
            if every > 0:
                # Missed periods (the host was down) fire once, not n times.
                periods = (wall_ms - due) // every + 1
                target[name] = cbor.dumps([due + periods * every, every, current[2]])
            else:
                target.pop(name, None)

        if self.docs.store.get(state_doc(agent)) is not None:
            self._write(now, agent, advance)

    def failed(self, now: float, agent: str, name: str, due: int) -> float:
        """Delivery failed: the reminder stays due; returns when it is tried again."""
        key = (agent, name, due)
        self._in_flight.discard(key)
        self.retried += 1
        _, delay = self._retry.get(key, (0.0, RETRY_MIN / 2))
        delay = min(RETRY_MAX, delay * 2)
        self._retry[key] = (now + delay, delay)
        return delay
