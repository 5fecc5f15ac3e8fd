"""Rules of the reminders core, on a real replication core as its documents: what is due,
retries with back-off, what a handled delivery changes, and the bounds on what is set."""

from __future__ import annotations

import random

import pytest
from pycrdt import Map
from replication_helpers import QUIET

from meshd.placement.reminders import (
    MAX_REMINDERS,
    MIN_PERIOD_MS,
    RETRY_MAX,
    RETRY_MIN,
    ROOT,
    Occurrence,
    Reminders,
    reminder_id,
)
from meshd.placement.service import state_doc
from meshd.replication.core import Replicator
from meshd_client.protocol import cbor, errors

T0 = 1_000_000  # wall-clock ms


class World:
    def __init__(self, *local: str) -> None:
        self.docs = Replicator(node="n1", tuning=QUIET, rng=random.Random(1), now=0.0)
        self.local = list(local)
        self.core = Reminders(self.docs, lambda: self.local)

    def due(self, now: float, wall_ms: int) -> list[tuple[str, str, int]]:
        return [(o.agent, o.name, o.due_ms) for o in self.core.due(now, wall_ms)]


def test_a_reminder_is_due_from_its_time_on_and_only_where_its_agent_is_active() -> None:
    w = World("a")
    w.core.set(0.0, "a", "tick", T0 + 500, 0, {"x": 1})
    w.core.set(0.0, "b", "tick", T0, 0, None)  # b is active elsewhere
    assert w.due(0.0, T0 + 499) == []
    [occurrence] = w.core.due(0.0, T0 + 500)
    assert occurrence == Occurrence("a", "tick", T0 + 500, {"x": 1})
    assert occurrence.id == reminder_id("tick", T0 + 500) == f"tick@{T0 + 500}"
    assert occurrence.body() == {
        "reminder": "tick",
        "data": {"x": 1},
        "id": occurrence.id,
        "due_ms": T0 + 500,
    }


def test_an_occurrence_in_flight_is_not_due_again_until_its_outcome() -> None:
    w = World("a")
    w.core.set(0.0, "a", "tick", T0, 0, None)
    assert w.due(0.0, T0) == [("a", "tick", T0)]
    assert w.due(1.0, T0 + 10_000) == []


def test_a_handled_one_shot_reminder_is_removed() -> None:
    w = World("a")
    w.core.set(0.0, "a", "once", T0, 0, "d")
    w.due(0.0, T0)
    w.core.handled(0.1, T0 + 5, "a", "once", T0)
    assert w.core.listing("a") == {}
    assert w.core.fired == 1
    assert w.due(1.0, T0 + 10**9) == []


def test_a_handled_periodic_reminder_moves_on_and_missed_periods_fire_once() -> None:
    w = World("a")
    w.core.set(0.0, "a", "every", T0, 1000, None)
    w.due(0.0, T0)
    w.core.handled(0.1, T0 + 20, "a", "every", T0)
    assert w.core.listing("a")["every"]["due_ms"] == T0 + 1000
    # The host was down for 10.5 periods: the next occurrence fires once, then the next due
    # time is the first period boundary after now.
    assert w.due(1.0, T0 + 11_500) == [("a", "every", T0 + 1000)]
    w.core.handled(1.1, T0 + 11_500, "a", "every", T0 + 1000)
    assert w.core.listing("a")["every"]["due_ms"] == T0 + 12_000


def test_a_reminder_changed_while_in_flight_keeps_the_change() -> None:
    w = World("a")
    w.core.set(0.0, "a", "r", T0, 0, "old")
    w.due(0.0, T0)
    w.core.set(0.05, "a", "r", T0 + 60_000, 0, "new")  # set again meanwhile
    w.core.handled(0.1, T0 + 10, "a", "r", T0)
    assert w.core.listing("a") == {"r": {"due_ms": T0 + 60_000, "every_ms": 0, "data": "new"}}


def test_a_failed_delivery_stays_due_and_is_retried_with_doubling_back_off() -> None:
    w = World("a")
    w.core.set(0.0, "a", "r", T0, 0, None)
    now = 0.0
    delays = []
    for _ in range(10):
        assert w.due(now, T0) == [("a", "r", T0)]
        delay = w.core.failed(now, "a", "r", T0)
        delays.append(delay)
        assert w.due(now + delay - 0.01, T0) == []  # not before its retry time
        now += delay
    assert delays[0] == RETRY_MIN
    assert delays[1] == 2 * RETRY_MIN
    assert max(delays) == RETRY_MAX and delays[-1] == RETRY_MAX
    assert w.core.retried == 10
    assert "r" in w.core.listing("a")  # never dropped by failures
    w.due(now, T0)
    w.core.handled(now, T0, "a", "r", T0)
    assert w.core.listing("a") == {}


def test_forget_removes_only_what_exists() -> None:
    w = World("a")
    assert not w.core.forget(0.0, "a", "nothing")
    w.core.set(0.0, "a", "r", T0, 0, None)
    assert w.core.forget(0.1, "a", "r")
    assert w.core.listing("a") == {}
    assert not w.core.forget(0.2, "a", "r")


@pytest.mark.parametrize("name", ["", "x" * 129, 7])
def test_a_reminder_name_is_1_to_128_characters(name: object) -> None:
    w = World("a")
    with pytest.raises(errors.Invalid):
        w.core.set(0.0, "a", name, T0, 0, None)  # type: ignore[arg-type]
    assert w.core.listing("a") == {}


def test_a_periodic_reminder_fires_at_most_every_min_period() -> None:
    w = World("a")
    with pytest.raises(errors.Invalid):
        w.core.set(0.0, "a", "fast", T0, MIN_PERIOD_MS - 1, None)
    w.core.set(0.0, "a", "ok", T0, MIN_PERIOD_MS, None)
    assert w.core.listing("a")["ok"]["every_ms"] == MIN_PERIOD_MS


def test_an_agent_holds_at_most_max_reminders_and_may_still_change_them() -> None:
    w = World("a")
    for i in range(MAX_REMINDERS):
        w.core.set(0.0, "a", f"r{i}", T0, 0, None)
    with pytest.raises(errors.Overloaded):
        w.core.set(0.0, "a", "one-more", T0, 0, None)
    w.core.set(0.0, "a", "r0", T0 + 1, 0, "changed")  # an existing one may change
    listing = w.core.listing("a")
    assert len(listing) == MAX_REMINDERS and listing["r0"]["data"] == "changed"


def test_an_undecodable_entry_is_neither_listed_nor_fired() -> None:
    w = World("a")
    w.core.set(0.0, "a", "good", T0, 0, None)

    def corrupt(doc: object) -> None:
        reminders: Map[object] = doc.get(ROOT, type=Map)  # type: ignore[attr-defined]
        reminders["bad"] = b"\xff\x00"
        reminders["wrong"] = cbor.dumps(["soon", 0, None])

    replica = w.docs.store.get(state_doc("a"))
    assert replica is not None
    w.docs.write(0.0, state_doc("a"), corrupt, epoch=replica.epoch)
    assert set(w.core.listing("a")) == {"good"}
    assert w.due(0.0, T0) == [("a", "good", T0)]
