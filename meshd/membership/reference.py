"""The reference membership: who counts when this node asks "is this a majority?".

One definition serves every majority in the daemon: ``keep_majority`` placement (a side of a
partition may run singletons only if the members up there are a strict majority of the
reference) and ``majority`` writes (acknowledged once a majority of the reference holds the
update). Both must agree on the denominator, or a write could be "majority" on a side that
placement treats as a minority.
"""

from __future__ import annotations

from collections.abc import Iterable

from meshd.membership.events import MemberView
from meshd.wire.membership import Status


def reference_members(members: Iterable[MemberView]) -> frozenset[str]:
    """Every member that has not left gracefully: alive, suspect, and dead but not yet reaped.

    From one node, a crashed member and one behind a partition look the same, so a dead member
    keeps counting: otherwise both sides of a split would shrink their reference to themselves
    and each find a majority. A member stops counting only when it leaves gracefully, when an
    operator removes it (``meshctl remove``, which marks it left everywhere), or when it is
    reaped after ``[membership] reconnect_timeout`` as dead. These are the semantics of Akka's
    WriteMajority (unreachable members count until downed) and of Serf's ``force-leave``.

    Every node sharing the membership table computes the same set; this node is in it.
    """
    return frozenset(m.name for m in members if m.status is not Status.LEFT)
