"""Placement's pure decisions (:mod:`meshd.placement.core`), one group of tests per rule."""

from __future__ import annotations

import math

import pytest

from meshd.placement import core
from meshd.placement.kinds import KindInfo, Strategy

KM = Strategy.KEEP_MAJORITY
AD = Strategy.ALLOW_DUPLICATES
FIVE = frozenset({"a", "b", "c", "d", "e"})


# ---------------------------------------------------------------------------- owners


def test_candidates_are_the_up_hosts_that_accept_weighted_by_capacity() -> None:
    hosts = {
        "a": KindInfo(10, 0, KM),
        "b": KindInfo(5, 5, KM),  # full
        "c": KindInfo(7, 0, KM, draining=True),
        "d": KindInfo(3, 1, KM),  # down
        "e": KindInfo(2, 0, KM),  # excluded
    }
    got = core.candidates(hosts, lambda h: h != "d", exclude="e")
    assert got == {"a": 10.0}
    assert core.candidates(hosts, lambda h: True) == {"a": 10.0, "d": 3.0, "e": 2.0}


def test_keep_majority_runs_only_with_a_majority_and_a_lease_that_may_start() -> None:
    assert core.may_run(KM, True, True)
    assert not core.may_run(KM, False, True)
    assert not core.may_run(KM, True, False)
    for strategy in (AD, None):
        assert core.may_run(strategy, False, False)


# ---------------------------------------------------------------------------- the lease


def test_lease_expiry_is_lease_after_the_ack_that_completes_a_majority() -> None:
    acked = {"b": 10.0, "c": 7.0, "d": 4.0, "e": 1.0}
    # Five members: this node and two others; the second most recent ack decides.
    assert core.lease_expiry("a", FIVE, acked, 3.0) == 10.0
    assert core.lease_expiry("a", FIVE, {"b": 10.0}, 3.0) == -math.inf  # one is not enough
    # Four members: a strict majority is three, so two others as well.
    assert core.lease_expiry("a", FIVE - {"e"}, acked, 3.0) == 10.0
    # Three members: one other suffices, the most recent.
    assert core.lease_expiry("a", {"a", "b", "c"}, acked, 3.0) == 13.0


def test_lease_expiry_counts_only_the_reference_and_this_node_in_it() -> None:
    acked = {"b": 10.0, "x": 20.0, "y": 20.0}  # x, y: not members (reaped, or strangers)
    assert core.lease_expiry("a", FIVE, acked, 3.0) == -math.inf
    # This node counts itself even when the reference does not list it yet.
    assert core.lease_expiry("a", {"b", "c"}, {"b": 5.0}, 3.0) == 8.0
    assert core.lease_expiry("a", {"a"}, {}, 3.0) == math.inf  # alone: its own majority


def test_a_lease_is_held_from_the_first_majority_until_its_expiry() -> None:
    lease = core.Lease(restart_after=20.0)
    assert not lease.observe(0.0, -math.inf) and not lease.check(0.0)
    assert not lease.may_start(0.0)
    assert not lease.observe(1.0, 4.0)
    assert lease.check(1.0) and lease.check(3.99) and not lease.check(4.0)
    assert lease.may_start(1.0)  # the first lease starts agents at once
    assert not lease.observe(3.0, 6.0)  # renewed before it ran out
    assert lease.check(5.0)


def test_a_lapse_is_noticed_first_even_if_fresh_acks_arrived_meanwhile() -> None:
    """A process paused longer than its lease wakes with fresh acks (for pings sent after it
    woke): the first check must still report the lapse, so its agents stop."""
    lease = core.Lease(restart_after=20.0)
    lease.observe(0.0, 3.0)
    assert lease.observe(10.0, 13.0)  # woke at 10 > 3: lapsed, whatever the new expiry
    assert not lease.check(10.0)
    assert lease.lapses == 1
    assert not lease.observe(10.1, 40.0)  # held again from here...
    assert lease.check(10.1)
    assert not lease.may_start(10.1)  # ...but starts nothing before restart_after
    assert not lease.observe(30.0, 40.0)
    assert not lease.may_start(30.0) and lease.may_start(30.2)


def test_a_lease_that_runs_out_without_fresh_acks_lapses() -> None:
    lease = core.Lease(restart_after=20.0)
    lease.observe(0.0, 3.0)
    assert not lease.observe(2.9, 3.0)
    assert lease.observe(3.0, 3.0)
    assert not lease.observe(3.1, 3.0)  # one lapse, reported once
    assert lease.lapses == 1


# ---------------------------------------------------------------------------- takeover


def test_takeover_is_the_wait_after_the_host_was_last_seen_alive() -> None:
    seen = core.Sightings()
    seen.observe(1.0, {"a", "b"}, FIVE)
    seen.observe(2.0, {"a"}, FIVE)  # b stopped being alive after 1.0
    assert seen.takeover_at(5.0, "b", 3.5) == 4.5
    assert seen.takeover_at(5.0, "a", 3.5) == 5.5


def test_a_host_never_seen_alive_waits_from_the_first_question() -> None:
    seen = core.Sightings()
    assert seen.takeover_at(7.0, "z", 3.5) == 10.5
    assert seen.takeover_at(9.0, "z", 3.5) == 10.5  # the same answer later
    seen.observe(9.5, {"z"}, FIVE | {"z"})
    assert seen.takeover_at(10.0, "z", 3.5) == 13.0


def test_sightings_forget_hosts_that_left_the_reference() -> None:
    seen = core.Sightings()
    seen.observe(1.0, {"a", "b"}, FIVE)
    seen.takeover_at(1.0, "q", 3.0)
    seen.observe(2.0, {"a"}, frozenset({"a"}))
    assert seen.last_alive == {"a": 2.0} and not seen.first_asked


def test_only_a_silent_keep_majority_host_makes_a_failover_wait() -> None:
    assert core.failover_wait(KM, False, 10.0, 13.5) == 3.5
    assert core.failover_wait(KM, False, 14.0, 13.5) == 0.0  # already past
    assert core.failover_wait(KM, True, 10.0, 13.5) == 0.0  # proven stopped
    assert core.failover_wait(AD, False, 10.0, 13.5) == 0.0
    assert core.failover_wait(None, False, 10.0, 13.5) == 0.0


@pytest.mark.parametrize(
    ("owner", "alive", "action"),
    [("me", True, "activate"), ("x", True, "leave"), ("x", False, "wait"), (None, False, "leave")],
)
def test_failover_action(owner: str | None, alive: bool, action: str) -> None:
    assert core.failover_action(owner, "me", alive) == action


def test_a_message_waits_only_for_a_silent_other_hosts_keep_majority_agent() -> None:
    assert core.takeover_refusal(KM, "b", "a", 13.5, 10.0) == 3.5
    assert core.takeover_refusal(KM, "b", "a", 13.5, 13.5) is None  # the wait is over
    assert core.takeover_refusal(KM, "b", "a", None, 10.0) is None  # not gone silent lately
    assert core.takeover_refusal(KM, "a", "a", 13.5, 10.0) is None  # it ran here
    assert core.takeover_refusal(KM, None, "a", 13.5, 10.0) is None  # never ran
    assert core.takeover_refusal(AD, "b", "a", 13.5, 10.0) is None


def test_stopped_agents_are_restored_when_the_majority_returns_or_the_lease_may_start() -> None:
    # (was_majority, has_majority, lease_blocked, lease_may_start)
    assert core.restore_now(False, True, False, True)  # the quorum came back
    assert not core.restore_now(True, True, False, True)  # it never left
    assert not core.restore_now(False, False, False, True)
    assert not core.restore_now(False, True, True, False)  # a lapse: not yet
    assert core.restore_now(True, True, True, True)  # held again for stable_after
    assert not core.restore_now(True, False, True, True)


def test_a_rebalance_is_due_when_a_serving_host_comes_up_or_a_replan_is_due() -> None:
    ab, a = frozenset({"a", "b"}), frozenset({"a"})
    assert core.rebalance_due(ab, a, None, 0.0)
    assert not core.rebalance_due(a, ab, None, 0.0)  # one went away: its agents fail over
    assert not core.rebalance_due(a, a, 5.0, 4.9)
    assert core.rebalance_due(a, a, 5.0, 5.0)


# ---------------------------------------------------------------------------- stop and move


def _local() -> list[core.Local]:
    return [
        core.Local("k/1", "id1", "k"),
        core.Local("k/2", "id2", "k"),
        core.Local("d/1", "id3", "d"),
        core.Local("plain", "id4", ""),
    ]


def test_without_majority_or_lease_the_local_keep_majority_agents_stop() -> None:
    strategy = {"k": KM, "d": AD}.get
    assert core.to_stop(_local(), strategy, True, set()) == []
    stop = core.to_stop(_local(), strategy, False, {"id2"})
    assert [a.name for a in stop] == ["k/1"]  # k/2 is being stopped already


def test_agents_whose_owner_is_another_host_move() -> None:
    owners = {"k/1": "other", "k/2": "me", "d/1": "other", "plain": "other"}
    moves = core.to_move(_local(), lambda _k, n: owners[n], "me", ["d/1"])
    assert moves == ["k/1"]  # k/2 stays, d/1 is queued, plain has no kind
    assert core.to_move(_local(), lambda _k, _n: None, "me", []) == []


def test_a_lease_drops_without_a_lapse_when_the_reference_outgrows_its_answers() -> None:
    """New members that have not answered yet: the lease is lost (agents stop) but nothing
    was missed, so the next majority of answers holds it again and may start at once."""
    lease = core.Lease(restart_after=20.0)
    lease.observe(0.0, 3.0)
    assert lease.observe(1.0, -math.inf)  # lost
    assert lease.lapses == 0 and not lease.check(1.0)
    assert not lease.observe(1.5, 4.5)
    assert lease.may_start(1.5)


def test_a_released_lease_is_not_held_and_comes_back_without_a_lapse() -> None:
    lease = core.Lease(restart_after=20.0)
    lease.observe(0.0, 3.0)
    lease.release()
    assert not lease.check(1.0) and lease.lapses == 0
    assert not lease.observe(10.0, 12.0)  # not a lapse: it was given up, not run out
    assert lease.may_start(10.0)
