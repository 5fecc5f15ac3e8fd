"""Reminders: messages an agent schedules to itself, durably.

A reminder lives in the agent's replicated state document (root map ``reminders``: name →
``[due_ms, every_ms, data]``, wall-clock milliseconds), so it survives the agent moving or
failing over: the daemon where the agent is active at the time fires it. Firing sends the
agent a message from ``meshd:reminders`` with body ``{"reminder": name, "data": data}``, then
reschedules (periodic) or removes (one-shot) the reminder. Timers, by contrast, live in the
client with the activation and die with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Final

import trio
from pycrdt import Doc, Map

from meshd.placement.service import state_doc
from meshd.replication.core import Replicator
from meshd.routing.messages import DeliveryKind
from meshd_client.protocol import cbor, errors

ROOT: Final = "reminders"
SENDER: Final = "meshd:reminders"
MIN_PERIOD_MS: Final = 100
MAX_REMINDERS: Final = 1000


def _decode(raw: Any) -> tuple[int, int, Any] | None:
    try:
        due, every, data = cbor.loads(bytes(raw))
    except (cbor.CodecError, ValueError, TypeError):
        return None
    if type(due) is not int or type(every) is not int:
        return None
    return due, every, data


class Reminders:
    def __init__(
        self,
        replicator: Replicator,
        local_agents: Callable[[], list[str]],
        deliver: Callable[..., Any],
        flush: Callable[[], None],
        log: logging.Logger,
    ) -> None:
        self.replicator = replicator
        self.local_agents = local_agents
        self.deliver = deliver  # router.call
        self.flush = flush
        self.log = log
        self.fired = 0

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
        replica = self.replicator.store.get(state_doc(agent))
        if replica is None or name not in replica.doc.get(ROOT, type=Map):
            return False
        self._write(now, agent, lambda doc: doc.get(ROOT, type=Map).pop(name, None))
        return True

    def listing(self, agent: str) -> dict[str, dict[str, Any]]:
        replica = self.replicator.store.get(state_doc(agent))
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
        replica = self.replicator.store.get(doc)
        epoch = replica.epoch if replica is not None else 0
        self.replicator.write(now, doc, mutate, epoch=epoch)
        self.flush()

    # ------------------------------------------------------------------ firing

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                await trio.sleep(0.2)
                for agent, name, data in self._due(trio.current_time()):
                    nursery.start_soon(self._fire, agent, name, data)

    def _due(self, now: float) -> list[tuple[str, str, Any]]:
        wall = int(time.time() * 1000)
        fired: list[tuple[str, str, Any]] = []
        for agent in self.local_agents():
            replica = self.replicator.store.get(state_doc(agent))
            if replica is None:
                continue
            reminders: Map[Any] = replica.doc.get(ROOT, type=Map)
            due_now = []
            for name, raw in reminders.items():
                decoded = _decode(raw)
                if decoded is not None and decoded[0] <= wall:
                    due_now.append((name, *decoded))
            if not due_now:
                continue

            def reschedule(
                doc: Doc[Any],
                items: list[tuple[str, int, int, Any]] = due_now,
            ) -> None:
                target: Map[Any] = doc.get(ROOT, type=Map)
                for name, due, every, data in items:
                    if every > 0:
                        # Missed periods (the host was down) fire once, not n times.
                        periods = (wall - due) // every + 1
                        target[name] = cbor.dumps([due + periods * every, every, data])
                    else:
                        target.pop(name, None)

            self.replicator.write(now, replica.name, reschedule, epoch=replica.epoch)
            fired.extend((agent, name, data) for name, _, _, data in due_now)
        if fired:
            self.flush()
        return fired

    async def _fire(self, agent: str, name: str, data: Any) -> None:
        try:
            await self.deliver(
                to=agent,
                body={"reminder": name, "data": data},
                sender=SENDER,
                kind=DeliveryKind.SEND,
                timeout=10.0,
            )
            self.fired += 1
        except errors.MeshError as exc:
            self.log.warning(
                "reminder not delivered",
                extra={"fields": {"agent": agent, "reminder": name, "error": exc.message}},
            )
