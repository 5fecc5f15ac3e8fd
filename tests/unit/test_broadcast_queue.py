"""The transmit-limited broadcast queue: limit formula, order, replacement, budget."""

from __future__ import annotations

import pytest

from meshd.membership.broadcast import BroadcastQueue, retransmit_limit


@pytest.mark.parametrize(
    ("mult", "n", "limit"),
    [
        (4, 0, 4),  # never below one round of mult
        (4, 1, 4),
        (4, 9, 4),
        (4, 10, 8),  # log10(11) > 1
        (4, 99, 8),
        (4, 100, 12),
        (2, 1000, 8),
        (3, 5, 3),
    ],
)
def test_retransmit_limit(mult: int, n: int, limit: int) -> None:
    assert retransmit_limit(mult, n) == limit


def item(i: int, size: int = 20) -> bytes:
    return bytes([i]) * size


def test_each_item_is_sent_at_most_limit_times() -> None:
    q = BroadcastQueue()
    q.push("a", item(1))
    q.push("b", item(2))
    sent = [q.take(1000, 3) for _ in range(5)]
    assert sent == [[item(2), item(1)]] * 3 + [[], []]
    assert len(q) == 0
    assert not q.pending("a")


def test_newest_first_among_equally_sent_items() -> None:
    q = BroadcastQueue()
    for i in range(5):
        q.push(f"k{i}", item(i))
    assert q.take(1000, 10) == [item(i) for i in reversed(range(5))]


def test_newest_first_again_in_later_rounds() -> None:
    q = BroadcastQueue()
    for i in range(4):
        q.push(f"k{i}", item(i))
    newest_first = [item(i) for i in reversed(range(4))]
    assert [q.take(1000, 3) for _ in range(4)] == [newest_first] * 3 + [[]]


def test_least_sent_items_go_first() -> None:
    q = BroadcastQueue()
    q.push("old", item(1))
    assert q.take(1000, 10) == [item(1)]
    q.push("new", item(2))
    # One item fits: the never-sent one wins although it is not the oldest.
    assert q.take(25, 10) == [item(2)]
    # Both have been sent once now; the newer goes first.
    assert q.take(25, 10) == [item(2)]
    assert q.take(25, 10) == [item(1)]


def test_newer_item_about_the_same_key_replaces_the_old_one() -> None:
    q = BroadcastQueue()
    q.push("a", item(1))
    q.take(1000, 10)
    q.push("a", item(2))
    assert len(q) == 1
    assert q.take(1000, 2) == [item(2)]
    # The replacement starts from zero transmits.
    assert q.take(1000, 2) == [item(2)]
    assert q.take(1000, 2) == []


def test_budget_is_respected_with_per_item_overhead() -> None:
    q = BroadcastQueue()
    for i in range(10):
        q.push(f"k{i}", item(i, 30))
    taken = q.take(100, 10, per_item_overhead=3)
    assert len(taken) == 3  # 3 × 33 ≤ 100 < 4 × 33
    assert sum(len(t) + 3 for t in taken) <= 100


def test_items_too_big_are_skipped_and_smaller_ones_still_fit() -> None:
    q = BroadcastQueue()
    q.push("small", item(1, 20))
    q.push("big", item(2, 500))
    assert q.take(100, 10) == [item(1, 20)]
    assert q.pending("big")
    assert q.take(600, 10) == [item(2, 500), item(1, 20)]


def test_take_stops_after_too_many_misses() -> None:
    q = BroadcastQueue()
    q.push("small", item(1, 20))
    for i in range(20):
        q.push(f"big{i}", item(2, 500))
    # The small item is the oldest: nine misses on the big ones end the search first.
    assert q.take(100, 10) == []


def test_max_items_caps_the_count() -> None:
    q = BroadcastQueue()
    for i in range(10):
        q.push(f"k{i}", item(i, 5))
    assert len(q.take(10_000, 10, max_items=4)) == 4
    assert q.take(10_000, 10, max_items=0) == []
    assert len(q.take(10_000, 10)) == 10


def test_empty_queue_yields_nothing() -> None:
    q = BroadcastQueue()
    assert q.take(1000, 4) == []
    assert len(q) == 0


def test_prune_drops_items_at_or_over_a_lowered_limit() -> None:
    q = BroadcastQueue()
    q.push("a", item(1))
    q.push("b", item(2))
    q.take(1000, 10)
    q.take(1000, 10)
    q.push("c", item(3))
    q.prune(2)
    assert not q.pending("a")
    assert not q.pending("b")
    assert q.pending("c")
    assert q.take(1000, 10) == [item(3)]
