"""What a node measures about each peer, for the failure detector to decide with.

Per member, from this node's own probes and from what it sees of the member's suspicions:

* **round-trip time**, smoothed, and its variation (Jacobson/Karels, as TCP computes its
  retransmission timeout). The probe timeout for the member is ``srtt + 4 · rttvar``, kept
  between ``probe_timeout_min`` and ``probe_timeout``: on a quiet LAN an ack that has not
  come within a few milliseconds is not coming, so the indirect probes start sooner; a peer
  whose acks come late and unevenly gets more time.
* **loss of the direct path**: an exponentially weighted average of direct probe outcomes
  (did the ack come before the indirect phase?). A lossy path gets more relays.
* **stall**: the longest time the member was recently seen unresponsive while alive — an ack
  that came after the probe gave up on it, or a suspicion it refuted only after a while. It
  decays with a half-life, like the tail of a phi-accrual detector's window. A member that
  has been seen stalling for ``s`` seconds keeps its suspicions open for ``stall_mult · s``
  at least: a slow host is given the time it showed it needs, a healthy one that goes
  silent is declared dead quickly.

Plain arithmetic, no clock: every method takes ``now``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

_RTT_GAIN = 1 / 8  # TCP's alpha
_VAR_GAIN = 1 / 4  # TCP's beta
_LOSS_GAIN = 1 / 8


@dataclass(slots=True)
class PeerEstimate:
    srtt: float | None = None
    rttvar: float = 0.0
    loss: float = 0.0
    stall: float = 0.0
    stall_at: float = 0.0

    def rtt_sample(self, rtt: float) -> None:
        rtt = max(0.0, rtt)
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
            return
        self.rttvar += _VAR_GAIN * (abs(self.srtt - rtt) - self.rttvar)
        self.srtt += _RTT_GAIN * (rtt - self.srtt)

    def direct_outcome(self, answered: bool) -> None:
        self.loss += _LOSS_GAIN * ((0.0 if answered else 1.0) - self.loss)

    def stall_sample(self, now: float, seconds: float, half_life: float) -> None:
        current = self.stall_now(now, half_life)
        if seconds >= current:
            self.stall = seconds
            self.stall_at = now

    def stall_now(self, now: float, half_life: float) -> float:
        if self.stall <= 0.0:
            return 0.0
        if half_life <= 0.0:
            return self.stall
        return self.stall * math.pow(0.5, max(0.0, now - self.stall_at) / half_life)

    def probe_timeout(self, lo: float, hi: float) -> float:
        """``srtt + 4 · rttvar`` within [lo, hi]; ``hi`` until there is a sample."""
        if self.srtt is None:
            return hi
        return min(hi, max(lo, self.srtt + 4 * self.rttvar))


def relay_count(base: int, most: int, loss: float, full_at: float = 0.3) -> int:
    """Relays for an indirect probe: ``base`` on a clean direct path, growing linearly with
    its measured loss to ``most`` at ``full_at`` (30 %) and beyond."""
    if most <= base or loss <= 0.0:
        return base
    extra = (most - base) * min(1.0, loss / full_at)
    return base + round(extra)
