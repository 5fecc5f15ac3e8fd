"""Fires reminders: polls the reminders core for what is due and delivers it through the
router, at least once, reporting each outcome back to the core."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio

from meshd.placement.reminders import SENDER, Occurrence, Reminders
from meshd.routing.messages import DeliveryKind
from meshd_client.protocol import errors

POLL: Final = 0.2  # seconds between looks for due reminders
DELIVERY_TIMEOUT: Final = 10.0


def wall_ms() -> int:
    return int(time.time() * 1000)


class ReminderDriver:
    """Owns the firing loop and its deliveries (one task each, in its nursery). Decides
    nothing: what is due and what an outcome changes are the core's."""

    def __init__(
        self,
        core: Reminders,
        deliver: Callable[..., Awaitable[Any]],
        log: logging.Logger,
        *,
        wall_clock: Callable[[], int] = wall_ms,
    ) -> None:
        self.core = core
        self.deliver = deliver  # router.call
        self.log = log
        self.wall_clock = wall_clock

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                await trio.sleep(POLL)
                for occurrence in self.core.due(trio.current_time(), self.wall_clock()):
                    nursery.start_soon(self._fire, occurrence)

    async def _fire(self, occurrence: Occurrence) -> None:
        agent, name, due = occurrence.agent, occurrence.name, occurrence.due_ms
        try:
            await self.deliver(
                to=agent,
                body=occurrence.body(),
                sender=SENDER,
                kind=DeliveryKind.SEND,
                # Acknowledged once handled. Each attempt is a new message (a receiver would
                # answer a repeated message id with the first attempt's failure); the body's
                # id is the same for every attempt, for the agent to tell repeats.
                at_least_once=True,
                timeout=DELIVERY_TIMEOUT,
            )
        except errors.MeshError as exc:
            delay = self.core.failed(trio.current_time(), agent, name, due)
            self.log.warning(
                "reminder not delivered; it stays due",
                extra={
                    "fields": {
                        "agent": agent,
                        "reminder": occurrence.id,
                        "error": exc.message,
                        "retry_in": delay,
                    }
                },
            )
            return
        self.core.handled(trio.current_time(), self.wall_clock(), agent, name, due)
