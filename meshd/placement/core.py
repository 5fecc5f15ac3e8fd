"""Placement's decisions, sans-IO: no trio, no sockets, no clock. Inputs and a ``now`` in,
decisions out; :class:`~meshd.placement.service.Placement` is the driver that gathers the
inputs (membership, registry, kinds table) and carries the decisions out.

The rules, each a function or a small state machine here (unit tests per rule in
``tests/unit/test_placement_core.py``):

* **Owner** (:func:`candidates`): the hosts serving a kind that accept more agents and are up,
  weighted by capacity; rendezvous hashing over them picks the owner.
* **May run** (:func:`may_run`): ``allow_duplicates`` kinds run anywhere; ``keep_majority``
  kinds only where the quorum holds a majority *and* the lease may start agents.
* **The lease** (:class:`Lease`, :func:`lease_expiry`): this host may run and serve
  keep_majority agents only while a strict majority of the reference membership (this host
  included) answered one of its pings *sent* within the last ``lease`` seconds. Once that
  stops being true the lease has lapsed: every local keep_majority agent stops, and none
  starts here again before the lease has been held again for ``restart_after``.
* **Takeover** (:class:`Sightings`, :func:`failover_wait`): the agents of a host proven
  stopped (refused, left) move at once; a keep_majority agent of a host gone silent moves only
  once this node has not seen that host alive for ``lease + margin``.
  A message to such an agent before then is refused (:func:`takeover_refusal`).
* **Restore** (:func:`restore_now`): what this host stopped runs again once it may.
* **Stop** (:func:`to_stop`): local keep_majority agents stop when they may not run here.
* **Rebalance** (:func:`rebalance_due`, :func:`to_move`): when a host serving kinds comes up,
  local agents whose owner is now another host move.

Safety of the lease (the argument is in docs/lifecycle.md#the-lease): an ack to a ping sent at
``t`` proves the peer received something from this host at ``t`` or later. A host cut off
at ``T`` (all its packets dropped, or on the minority side of a partition) gets no majority
of acks for pings sent after ``T``, so its lease expires by ``T + lease`` on its own clock.
Every other node saw it alive last at a time after ``T`` or close before it, and waits
``lease + margin`` from then on its own clock: the margin covers the rate drift of the two
monotonic clocks, packets in flight at ``T`` and the holder's check granularity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from meshd.placement.kinds import KindInfo, Strategy

# ---------------------------------------------------------------------------- owners


def candidates(
    hosts: Mapping[str, KindInfo], up: Callable[[str], bool], exclude: str | None = None
) -> dict[str, float]:
    """The hosts that may take a new agent of a kind, weighted by capacity."""
    return {
        host: float(info.capacity)
        for host, info in hosts.items()
        if info.accepts and host != exclude and up(host)
    }


def may_run(strategy: Strategy | None, has_majority: bool, lease_may_start: bool) -> bool:
    """Partition strategy: may agents of a kind with ``strategy`` start on this side now?"""
    if strategy is Strategy.KEEP_MAJORITY:
        return has_majority and lease_may_start
    return True


# ---------------------------------------------------------------------------- the lease


def lease_expiry(
    node: str, reference: Iterable[str], acked_at: Mapping[str, float], lease: float
) -> float:
    """When this node's lease runs out, given when the latest ping each member answered was
    sent: ``lease`` after the send time of the answer that completes a strict majority of
    ``reference`` (this node counts itself). ``inf`` alone; ``-inf`` if no majority ever
    answered."""
    members = set(reference) | {node}
    need = len(members) // 2  # others needed beside this node for a strict majority
    if need == 0:
        return math.inf
    sent = sorted((acked_at[m] for m in members if m != node and m in acked_at), reverse=True)
    if len(sent) < need:
        return -math.inf
    return sent[need - 1] + lease


@dataclass(slots=True)
class Lease:
    """This host's right to run keep_majority agents, with a latch: a lapse is noticed by the
    first check after the expiry even if fresh acks have arrived since (after a pause longer
    than the lease, the first check must stop the agents, not renew the lease)."""

    restart_after: float
    expires_at: float = -math.inf
    held: bool = False
    held_since: float = 0.0
    lapses: int = 0

    def check(self, now: float) -> bool:
        """Is the lease held at ``now`` on what was last observed? Cheap, for the hot path;
        False means: call :meth:`observe` with fresh inputs."""
        return self.held and now < self.expires_at

    def observe(self, now: float, expiry: float) -> bool:
        """Feed the current expiry (:func:`lease_expiry`); True if the lease was lost just
        now, and the caller must stop every local keep_majority agent before anything else.

        Lost two ways: it *lapsed* (the time it was known to last ran out: a cut, or a pause;
        counted in ``lapses``, and agents start here again only after ``restart_after``), or
        it *dropped* (the reference grew by members that have not answered yet: nothing was
        missed, so the next majority of answers restores it at once)."""
        lapsed = self.held and now >= self.expires_at
        if lapsed:
            self.held = False
            self.lapses += 1
        self.expires_at = expiry
        dropped = self.held and now >= expiry
        if dropped:
            self.held = False
        elif not lapsed and not self.held and now < expiry:
            self.held = True
            self.held_since = now
        return lapsed or dropped

    def release(self) -> None:
        """Give the lease up without a lapse (this host stops keeping one)."""
        self.held = False
        self.expires_at = -math.inf

    def may_start(self, now: float) -> bool:
        """May keep_majority agents start here? After a lapse, only once the lease has been
        held again for ``restart_after``: meanwhile the majority may have moved them, and the
        registry must catch up before this host decides again (start slow, as the quorum)."""
        if not self.check(now):
            return False
        return self.lapses == 0 or now - self.held_since >= self.restart_after


# ---------------------------------------------------------------------------- takeover


@dataclass(slots=True)
class Sightings:
    """When this node last saw each host alive (its own monotonic clock)."""

    last_alive: dict[str, float] = field(default_factory=dict)
    first_asked: dict[str, float] = field(default_factory=dict)

    def observe(self, now: float, alive: Iterable[str], known: frozenset[str]) -> None:
        for host in alive:
            self.last_alive[host] = now
            self.first_asked.pop(host, None)
        for seen in (self.last_alive, self.first_asked):
            for host in [h for h in seen if h not in known]:
                del seen[host]

    def takeover_at(self, now: float, host: str, wait: float) -> float:
        """When a silent host's keep_majority agents may start elsewhere: ``wait`` after this
        node last saw it alive (or after it first asked, if it never did)."""
        seen = self.last_alive.get(host)
        if seen is None:
            seen = self.first_asked.setdefault(host, now)
        return seen + wait


def failover_wait(strategy: Strategy | None, proven: bool, now: float, takeover_at: float) -> float:
    """How long to wait before re-activating an agent of a dead host: nothing if the host is
    proven stopped or the kind allows duplicates; else until ``takeover_at``."""
    if proven or strategy is not Strategy.KEEP_MAJORITY:
        return 0.0
    return max(0.0, takeover_at - now)


def failover_action(
    owner: str | None, node: str, owner_alive: bool
) -> Literal["activate", "leave", "wait"]:
    """What a node does with an agent of a dead host once the takeover delay is over: start
    it if it is the owner; leave it to an owner that is alive; wait and ask again while the
    owner is only suspect (it may be dying too, behind the same cut, and then nobody would
    start the agent: the dead host's agents are re-placed only once, at its death)."""
    if owner == node:
        return "activate"
    if owner is not None and not owner_alive:
        return "wait"
    return "leave"


def takeover_refusal(
    strategy: Strategy | None,
    host: str | None,
    node: str,
    takeover_at: float | None,
    now: float,
) -> float | None:
    """A message to an agent that last ran on ``host``: how long it must still wait before
    it may start anywhere else (None: it may now). Only a keep_majority agent of another host
    that went silent (``takeover_at`` known) waits, as its failover does."""
    if strategy is not Strategy.KEEP_MAJORITY or host is None or host == node:
        return None
    if takeover_at is None or takeover_at <= now:
        return None
    return takeover_at - now


def restore_now(
    was_majority: bool, has_majority: bool, lease_blocked: bool, lease_may_start: bool
) -> bool:
    """Run again the agents this host stopped for lack of a majority or lease? When the
    quorum comes back (start slow: it has held for stable_after), unless a lapse blocks it;
    after a lapse, when the lease may start agents again (held for stable_after)."""
    if not has_majority:
        return False
    if lease_blocked:
        return lease_may_start
    return not was_majority


def rebalance_due(
    serving_up: frozenset[str], before: frozenset[str], replan_at: float | None, now: float
) -> bool:
    """Look for local agents whose owner changed? When a host serving kinds came up (it may
    own some now), or when a failed move asked to plan again at ``replan_at``."""
    return bool(serving_up - before) or (replan_at is not None and now >= replan_at)


# ---------------------------------------------------------------------------- stop and move


@dataclass(frozen=True, slots=True)
class Local:
    """An agent running here, as the decisions see it."""

    name: str
    entry_id: str
    kind: str


def to_stop(
    local: Iterable[Local],
    strategy: Callable[[str], Strategy | None],
    keep_majority_ok: bool,
    stopping: set[str],
) -> list[Local]:
    """Local keep_majority agents to stop now (not already being stopped)."""
    if keep_majority_ok:
        return []
    return [
        a
        for a in local
        if a.kind and a.entry_id not in stopping and strategy(a.kind) is Strategy.KEEP_MAJORITY
    ]


def to_move(
    local: Iterable[Local],
    owner: Callable[[str, str], str | None],
    node: str,
    queued: Iterable[str],
) -> list[str]:
    """Local agents whose owner is now another host (and not yet queued to move)."""
    skip = set(queued)
    moves = []
    for a in local:
        if a.kind and a.name not in skip:
            target = owner(a.kind, a.name)
            if target is not None and target != node:
                moves.append(a.name)
                skip.add(a.name)
    return moves
