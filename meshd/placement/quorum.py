"""The partition strategy's view of membership: does this side hold a strict majority?

``keep_majority`` agents may run only on a side of a partition that holds a strict majority
of the **reference membership** (:func:`meshd.membership.reference.reference_members`): every
member this node knows that has not left — alive, suspect, or dead but not yet forgotten. A
crashed member keeps counting until it is reaped (``reconnect_timeout``), leaves gracefully
or is removed by an operator, because from here a crashed member and a partitioned one look
the same. Every node that shares the membership table computes the same reference: there is
no locally remembered "last view" that could go stale, and a fresh daemon joining a minority
learns the dead majority from its seed's table.

Decisions are asymmetric:

* **Stop fast.** Once the members alive here (suspects do not count) have not been a strict
  majority of the reference for ``stop_after`` seconds, ``has_majority`` is False:
  keep_majority agents stop. The short grace rides out a member that is briefly suspected
  and refutes (a healing partition floods both sides with stale accusations); it must stay
  well below ``stable_after``, which the other side waits before taking over.
* **Start slow.** It becomes True again only after the view has held a majority, unchanged,
  for ``stable_after`` seconds, so a flapping link does not start agents. The first decision
  is immediate: the caller feeds the quorum only once the node has joined (its membership
  table then holds the whole cluster, dead members included).

The majority side takes over agents of a silent host only once it has not seen the host
alive for ``lease + lease_margin``; the silent host stops them sooner, by its lease, which
does not depend on when its failure detector decides (:mod:`meshd.placement.core`,
docs/lifecycle.md#the-lease). The quorum stays the rule for starting agents (start slow)
and a second, slower reason to stop them.

With no strict majority anywhere (an even split, or a cascade of failures) nobody runs
``keep_majority`` agents: the price of never running them twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Quorum:
    stable_after: float
    stop_after: float = 0.0
    known: frozenset[str] = field(default_factory=frozenset)  # the reference membership
    current: frozenset[str] = field(default_factory=frozenset)  # members up now
    changed_at: float = 0.0
    decided: bool = False
    started: bool = False  # made its first decision
    lost_at: float | None = None  # when the members up stopped being a majority

    def observe(self, now: float, up: frozenset[str], known: frozenset[str] | None = None) -> None:
        """Feed the members up now (this node included) and the reference membership (every
        member not known to have left). Without ``known``, the reference is every member
        ever seen up."""
        reference = known if known is not None else self.known | up
        reference |= up
        if up != self.current or reference != self.known:
            self.current = up
            self.known = reference
            self.changed_at = now
        if self.majority_now():
            self.lost_at = None
        elif self.lost_at is None:
            self.lost_at = now

    def majority_now(self) -> bool:
        return 2 * len(self.current & self.known) > len(self.known)

    def tick(self, now: float) -> bool:
        """Re-evaluate; returns whether this side may run keep_majority agents now."""
        if self.lost_at is None:
            if not self.decided and (
                not self.started or now - self.changed_at >= self.stable_after
            ):
                self.decided = True  # start slow (but the first start is immediate)
        elif not self.started or now - self.lost_at >= self.stop_after:
            self.decided = False  # stop fast, after a short grace
        self.started = True
        return self.decided

    @property
    def has_majority(self) -> bool:
        return self.decided

    @property
    def stable(self) -> frozenset[str]:
        """The reference membership (kept under its old name for callers and logs)."""
        return self.known
