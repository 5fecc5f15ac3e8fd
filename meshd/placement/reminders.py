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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Final

import trio
from pycrdt import Doc, Map

from meshd.placement.service import state_doc
from meshd.replication.documents import Documents
from meshd.routing.messages import DeliveryKind
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


class Reminders:
    def __init__(
        self,
        docs: Documents,
        local_agents: Callable[[], list[str]],
        deliver: Callable[..., Any],
        log: logging.Logger,
    ) -> None:
        self.docs = docs
        self.local_agents = local_agents
        self.deliver = deliver  # router.call
        self.log = log
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

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                await trio.sleep(0.2)
                for agent, name, due, data in self.due(trio.current_time()):
                    nursery.start_soon(self._fire, agent, name, due, data)

    def due(self, now: float) -> list[tuple[str, str, int, Any]]:
        """Occurrences to deliver now (each is then in flight until :meth:`handled` or
        :meth:`failed`)."""
        wall = int(time.time() * 1000)
        out: list[tuple[str, str, int, Any]] = []
        for agent in self.local_agents():
            replica = self.docs.store.get(state_doc(agent))
            if replica is None:
                continue
            for name, raw in replica.doc.get(ROOT, type=Map).items():
                decoded = _decode(raw)
                if decoded is None or decoded[0] > wall:
                    continue
                key = (agent, name, decoded[0])
                if key in self._in_flight:
                    continue
                retry = self._retry.get(key)
                if retry is not None and now < retry[0]:
                    continue
                self._in_flight.add(key)
                out.append((agent, name, decoded[0], decoded[2]))
        return out

    def handled(self, now: float, agent: str, name: str, due: int) -> None:
        """The agent handled the occurrence due at ``due``: reschedule or remove the
        reminder — unless it was changed meanwhile (set again, or forgotten)."""
        key = (agent, name, due)
        self._in_flight.discard(key)
        self._retry.pop(key, None)
        self.fired += 1
        wall = int(time.time() * 1000)

        def advance(doc: Doc[Any]) -> None:
            target: Map[Any] = doc.get(ROOT, type=Map)
            current = _decode(target.get(name)) if name in target else None
            if current is None or current[0] != due:
                return
            every = current[1]
            if every > 0:
                # Missed periods (the host was down) fire once, not n times.
                periods = (wall - due) // every + 1
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

    async def _fire(self, agent: str, name: str, due: int, data: Any) -> None:
        occurrence = reminder_id(name, due)
        try:
            await self.deliver(
                to=agent,
                body={"reminder": name, "data": data, "id": occurrence, "due_ms": due},
                sender=SENDER,
                kind=DeliveryKind.SEND,
                # Acknowledged once handled. Each attempt is a new message (a receiver would
                # answer a repeated message id with the first attempt's failure); the body's
                # id is the same for every attempt, for the agent to tell repeats.
                at_least_once=True,
                timeout=10.0,
            )
        except errors.MeshError as exc:
            delay = self.failed(trio.current_time(), agent, name, due)
            self.log.warning(
                "reminder not delivered; it stays due",
                extra={
                    "fields": {
                        "agent": agent,
                        "reminder": occurrence,
                        "error": exc.message,
                        "retry_in": delay,
                    }
                },
            )
            return
        self.handled(trio.current_time(), agent, name, due)
