"""Run a sans-IO core's timers under trio.

A core exposes ``next_deadline()`` and ``tick(now)``. :class:`Deadlines` sleeps until the
deadline, ticks the core, lets the driver act on the outputs, and is re-armed by the driver
whenever an input may have pulled the deadline earlier.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import trio


class TimedCore(Protocol):
    def next_deadline(self) -> float: ...

    def tick(self, now: float) -> None: ...


class Deadlines:
    def __init__(self, core: TimedCore) -> None:
        self.core = core
        self.last_tick = trio.current_time()
        self._scope: trio.CancelScope | None = None

    def rearm(self) -> None:
        if self._scope is not None:
            self._scope.deadline = self.core.next_deadline()

    async def run(
        self,
        after: Callable[[], Awaitable[None]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        while True:
            with trio.CancelScope(deadline=self.core.next_deadline()) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None
            now = trio.current_time()
            self.last_tick = now
            self.core.tick(now)
            await after()
