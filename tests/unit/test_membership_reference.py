"""The reference membership: the denominator of every majority (placement and writes)."""

from __future__ import annotations

from membership_helpers import addr_for

from meshd.membership.events import MemberView
from meshd.membership.reference import reference_members
from meshd.wire.membership import Status


def view(name: str, status: Status) -> MemberView:
    return MemberView(name, addr_for(name), 0, status, {}, 0.0)


def test_every_member_that_has_not_left_counts() -> None:
    members = [
        view("a", Status.ALIVE),
        view("b", Status.SUSPECT),
        view("c", Status.DEAD),  # crashed or cut off: from here the two look the same
        view("d", Status.LEFT),
    ]
    assert reference_members(members) == {"a", "b", "c"}


def test_an_empty_table_has_an_empty_reference() -> None:
    assert reference_members([]) == frozenset()


def test_the_reference_is_the_same_in_any_order() -> None:
    members = [view(n, s) for n, s in (("x", Status.DEAD), ("y", Status.ALIVE))]
    assert reference_members(reversed(members)) == reference_members(iter(members)) == {"x", "y"}
