"""The partition strategy's view of membership: which side holds a strict majority.

``keep_majority`` (Akka's split-brain resolver, "keep majority"): a singleton agent may run
only on the side of a partition that holds a strict majority of the *last stable membership*
— the set of members that were up when membership last stayed unchanged for
``stable_after`` seconds. Decisions change only once the current view has itself been stable
that long, so a flapping link does not stop and start agents.

With no strict majority anywhere (an even split, or a cascade of failures) nobody runs
``keep_majority`` agents: that is the price of never running them twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Quorum:
    stable_after: float
    stable: frozenset[str] = field(default_factory=frozenset)
    current: frozenset[str] = field(default_factory=frozenset)
    changed_at: float = 0.0
    decided: bool = True  # the answer while the current view is not yet stable

    def observe(self, now: float, up: frozenset[str]) -> None:
        """Feed the members currently up (this node included)."""
        if up != self.current:
            self.current = up
            self.changed_at = now

    def tick(self, now: float) -> bool:
        """Re-evaluate; returns whether this side may run keep_majority agents now."""
        if now - self.changed_at >= self.stable_after:
            if not self.stable:
                self.stable = self.current
            in_majority = 2 * len(self.current & self.stable) > len(self.stable)
            if in_majority:
                # A stable view that holds a majority of the old one becomes the new
                # reference: the cluster grew or shrank for good.
                self.stable = self.current
            self.decided = in_majority
        return self.decided

    @property
    def has_majority(self) -> bool:
        return self.decided
