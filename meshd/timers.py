"""One timer heap for every core: callbacks due at a time, run in time order.

The sans-IO cores (membership, replication) and the router keep their deadlines here; the
trio side only sleeps until :meth:`TimerHeap.next_deadline` and calls :meth:`TimerHeap.run`
(:class:`~meshd.transport.deadlines.Deadlines` does it for the cores). Timers due at the same
time run in the order they were set, so a simulation is reproducible. A timer can be
cancelled; cancelled entries are dropped lazily, and swept when they outnumber live ones.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar

A = TypeVar("A")
# What a timer calls: ``fn(now, arg)``, with the argument it was set with.
TimerCallback = Callable[[float, A], None]
_SWEEP_AFTER: Final = 1024


class Timer(Generic[A]):
    """A handle on one scheduled callback and its argument."""

    __slots__ = ("arg", "fn")

    def __init__(self, fn: TimerCallback[A], arg: A) -> None:
        self.fn: TimerCallback[A] | None = fn
        self.arg = arg

    @property
    def pending(self) -> bool:
        return self.fn is not None

    def cancel(self) -> None:
        self.fn = None


class TimerHeap:
    """Timers of any argument type, in due order (ties in the order set)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer[Any]]] = []
        self._seq = itertools.count()
        self._cancelled = 0

    def __len__(self) -> int:
        return len(self._heap) - self._cancelled

    def at(self, when: float, fn: TimerCallback[A], arg: A) -> Timer[A]:
        """Call ``fn(now, arg)`` once ``now >= when``."""
        timer = Timer(fn, arg)
        heapq.heappush(self._heap, (when, next(self._seq), timer))
        return timer

    def cancel(self, timer: Timer[Any]) -> None:
        if timer.fn is None:
            return
        timer.cancel()
        self._cancelled += 1
        if self._cancelled > _SWEEP_AFTER and self._cancelled * 2 > len(self._heap):
            self._heap = [entry for entry in self._heap if entry[2].fn is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def next_deadline(self) -> float:
        heap = self._heap
        while heap and heap[0][2].fn is None:
            heapq.heappop(heap)
            self._cancelled = max(0, self._cancelled - 1)
        return heap[0][0] if heap else math.inf

    def run(self, now: float) -> int:
        """Run every timer due at ``now`` (also those that running ones set for ``now`` or
        earlier); returns how many ran."""
        ran = 0
        heap = self._heap
        while heap and heap[0][0] <= now:
            timer = heapq.heappop(heap)[2]
            fn = timer.fn
            if fn is None:
                self._cancelled = max(0, self._cancelled - 1)
                continue
            timer.fn = None
            fn(now, timer.arg)
            ran += 1
            heap = self._heap  # a callback may have swept (rebuilt) the heap
        return ran
