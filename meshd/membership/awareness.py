"""Lifeguard local health awareness.

A node that misses acks and nacks is more likely slow itself than surrounded by failures, so
it stretches its own probe interval and timeout by (score + 1) instead of accusing others.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Awareness:
    max_multiplier: int
    score: int = 0

    def apply(self, delta: int) -> None:
        self.score = min(self.max_multiplier - 1, max(0, self.score + delta))

    def scale(self, timeout: float) -> float:
        return timeout * (self.score + 1)
