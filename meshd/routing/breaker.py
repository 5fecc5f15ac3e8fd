"""A circuit breaker per remote host: calls to a dead or partitioned host fail fast.

closed ──(failures ≥ threshold, or membership says the host is down)──▶ open
open ──(cooldown elapsed)──▶ half-open: one trial call is let through
half-open ──(success)──▶ closed;  ──(failure)──▶ open (cooldown doubles, up to a cap)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(slots=True)
class Breaker:
    threshold: int = 3
    cooldown: float = 2.0
    max_cooldown: float = 30.0
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    current_cooldown: float = 0.0
    trial_in_flight: bool = False

    def allow(self, now: float) -> bool:
        """May a call go to this host now? (In half-open, only one trial at a time.)"""
        if self.state is BreakerState.OPEN:
            if now - self.opened_at < self.current_cooldown:
                return False
            self.state = BreakerState.HALF_OPEN
            self.trial_in_flight = False
        if self.state is BreakerState.HALF_OPEN:
            if self.trial_in_flight:
                return False
            self.trial_in_flight = True
        return True

    def success(self) -> None:
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.current_cooldown = 0.0
        self.trial_in_flight = False

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.threshold:
            self.trip(now)

    def trip(self, now: float) -> None:
        """Open at once (membership declared the host dead)."""
        if self.state is BreakerState.OPEN:
            return
        self.current_cooldown = (
            min(self.max_cooldown, self.current_cooldown * 2)
            if self.current_cooldown
            else self.cooldown
        )
        self.state = BreakerState.OPEN
        self.opened_at = now
        self.trial_in_flight = False

    def host_up(self) -> None:
        """Membership says the host is back: let a trial through right away."""
        if self.state is BreakerState.OPEN:
            self.state = BreakerState.HALF_OPEN
            self.trial_in_flight = False
