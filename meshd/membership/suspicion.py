"""Lifeguard's dynamic suspicion timeout.

A suspicion starts at the maximum timeout and shrinks towards the minimum as independent
members confirm it: timeout = max − (max − min) · log(c + 1) / log(k + 1), where c is the
number of confirmations and k the number expected. Fewer confirmations mean more time for the
suspect to refute — the mechanism that cuts false positives when the accuser is the slow one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def suspicion_bounds(mult: int, max_mult: int, n: int, interval: float) -> tuple[float, float]:
    """memberlist's suspicionTimeout: min = mult·max(1, log10 n)·interval, max = max_mult·min."""
    scale = max(1.0, math.log10(max(1, n)))
    minimum = mult * scale * interval
    return minimum, max_mult * minimum


def expected_confirmations(mult: int, n: int) -> int:
    """k = mult − 2, or 0 when the cluster is too small to supply that many confirmers."""
    k = mult - 2
    return 0 if n - 2 < k else max(0, k)


@dataclass(slots=True)
class Suspicion:
    start: float
    minimum: float
    maximum: float
    k: int
    confirmers: set[str] = field(default_factory=set)
    # Whoever raised the suspicion is not a confirmation of it (memberlist excludes "from").
    accuser: str | None = None
    # No expiry before this time (set after a confirmation, so the accused can still refute).
    not_before: float = 0.0
    # When this node first told the suspect directly (the buddy system), if it did: how long
    # a refutation takes after that is how long the member was unresponsive.
    told: float | None = None

    def deadline(self) -> float:
        c = len(self.confirmers)
        if self.k < 1 or c >= self.k:
            remaining = self.minimum
        else:
            frac = math.log(c + 1) / math.log(self.k + 1)
            remaining = max(self.minimum, self.maximum - frac * (self.maximum - self.minimum))
        return max(self.start + remaining, self.not_before)

    def confirm(self, sender: str) -> bool:
        """Record an independent confirmation; False if this sender already counted (the
        accuser never does)."""
        if len(self.confirmers) >= self.k or sender in self.confirmers or sender == self.accuser:
            return False
        self.confirmers.add(sender)
        return True


def detector_bounds(
    mult: int, max_mult: int, min_timeout: float, n: int, interval: float
) -> tuple[float, float]:
    """meshd's (min, max): memberlist's maximum, and a minimum of ``min_timeout`` ×
    max(1, log10 n) (the same cluster-size scale memberlist applies to its own) where
    confirmations are expected; memberlist's minimum where none are (a cluster of three), or
    when ``min_timeout`` is 0."""
    lo, hi = suspicion_bounds(mult, max_mult, n, interval)
    if min_timeout > 0 and expected_confirmations(mult, n) > 0:
        lo = min(hi, min_timeout * max(1.0, math.log10(max(1, n))))
    return lo, hi
