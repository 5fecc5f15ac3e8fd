"""The one timer heap the cores and the router keep their deadlines in."""

from __future__ import annotations

import math
from typing import Any

from meshd.timers import TimerHeap


def test_timers_run_in_time_order_and_ties_in_the_order_set() -> None:
    heap = TimerHeap()
    ran: list[tuple[float, Any]] = []
    record = lambda now, arg: ran.append((now, arg))  # noqa: E731
    heap.at(2.0, record, "b")
    heap.at(1.0, record, "a")
    heap.at(2.0, record, "c")
    assert heap.next_deadline() == 1.0 and len(heap) == 3
    assert heap.run(1.5) == 1
    assert heap.run(2.0) == 2
    assert ran == [(1.5, "a"), (2.0, "b"), (2.0, "c")]
    assert heap.next_deadline() == math.inf and len(heap) == 0


def test_a_timer_set_while_running_for_now_runs_in_the_same_pass() -> None:
    heap = TimerHeap()
    ran: list[str] = []

    def first(now: float, _arg: Any) -> None:
        ran.append("first")
        heap.at(now, lambda _n, _a: ran.append("chained"), None)
        heap.at(now + 1, lambda _n, _a: ran.append("later"), None)

    heap.at(0.0, first, None)
    assert heap.run(0.0) == 2
    assert ran == ["first", "chained"]


def test_cancelled_timers_never_run_and_are_swept() -> None:
    heap = TimerHeap()
    ran: list[int] = []
    timers = [heap.at(float(i), lambda _n, arg: ran.append(arg), i) for i in range(3000)]
    for timer in timers[:2500]:
        heap.cancel(timer)
        heap.cancel(timer)  # twice is once
    assert len(heap) == 500
    assert len(heap._heap) < 3000  # swept once cancelled entries outnumbered live ones
    assert heap.next_deadline() == 2500.0
    heap.run(10_000.0)
    assert ran == list(range(2500, 3000))
    assert not timers[-1].pending


def test_a_callback_may_cancel_another_due_at_the_same_time() -> None:
    heap = TimerHeap()
    ran: list[str] = []
    second = heap.at(1.0, lambda _n, _a: ran.append("second"), None)

    def first(_now: float, _arg: Any) -> None:
        ran.append("first")
        heap.cancel(second)

    heap.at(0.5, first, None)
    heap.run(1.0)
    assert ran == ["first"]
