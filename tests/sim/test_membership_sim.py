"""Deterministic, seeded simulations of the membership protocol (real cores, simulated network).

Every test runs under ``trio.testing.MockClock(autojump_threshold=0)`` (pytest-trio's
``autojump_clock`` fixture), so virtual minutes cost only the CPU the cores need. Assertions are
about outcomes in *virtual* time; the bounds derive from the ``lan`` tuning (suspicion window,
reconnect interval) rather than from observed numbers, so protocol tuning changes do not need
test edits unless they change the guarantees themselves.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import pytest
import trio.testing

from meshd.config import MembershipTuning, profile_tuning
from meshd.membership.events import EventKind, MemberEvent
from meshd.membership.suspicion import detector_bounds
from meshd.sim import SimNetwork, SimNode
from meshd.wire.membership import Status

LAN = profile_tuning("lan")
# Nodes that join through one seed must all see each other within this (virtual) time.
JOIN_BOUND_SMALL = 10.0
JOIN_BOUND_1000 = 30.0
# Slack on top of the minimum suspicion timeout for a crash to be detected everywhere: the first
# failed probe of the victim, k independent confirmations, and the Dead gossip reaching everyone.
DETECT_SLACK = 10.0
# A kill needs no suspicion: someone's probe of the victim starts (a few intervals at most
# with 15 probers), fails at its interval's end, and the Dead gossip spreads.
KILL_BOUND_16 = 5 * LAN.probe_interval
# Two reconnect rounds (with the core's ±25 % jitter): the first one merges the sides, the
# second one carries the refutations that the merge provoked (see the partition tests).
HEAL_BOUND = 2 * 1.25 * LAN.reconnect_interval


# ---------------------------------------------------------------------- helpers


def suspicion_window(n: int, tuning: MembershipTuning = LAN) -> tuple[float, float]:
    """(min, max) suspicion timeout in an ``n``-member cluster, as the core computes it (for a
    member never seen stalling)."""
    return detector_bounds(
        tuning.suspicion_mult,
        tuning.suspicion_max_timeout_mult,
        tuning.suspicion_min_timeout,
        n,
        tuning.probe_interval,
    )


@dataclass
class Recorder:
    """Listens to every node's membership events; indexed so checks stay O(1) at 1,000 nodes."""

    rows: list[tuple[float, str, EventKind, str, int]] = field(default_factory=list)
    _observers: dict[tuple[EventKind, str], set[str]] = field(
        default_factory=lambda: defaultdict(set)
    )

    def __call__(self, node: SimNode, event: MemberEvent) -> None:
        member = event.member
        self.rows.append((event.at, node.name, event.kind, member.name, member.incarnation))
        self._observers[(event.kind, member.name)].add(node.name)

    def observers(self, kind: EventKind, member: str) -> set[str]:
        """Nodes that emitted ``kind`` about ``member`` at least once."""
        return self._observers.get((kind, member), set())

    def verdicts(self, kind: EventKind) -> list[tuple[float, str, str]]:
        """(time, observer, member) of every ``kind`` event, in order."""
        return [(at, obs, member) for at, obs, k, member, _ in self.rows if k is kind]


def record(net: SimNetwork) -> Recorder:
    rec = Recorder()
    net.listeners.append(rec)
    return rec


async def start_cluster(
    n: int, seed: int, *, bound: float = JOIN_BOUND_SMALL, tuning: MembershipTuning = LAN
) -> SimNetwork:
    """``n`` nodes that all join through ``n0`` at t=0; returns once everyone sees everyone."""
    net = SimNetwork(seed)
    net.add_node("n0", tuning)
    for i in range(1, n):
        net.add_node(f"n{i}", tuning, seeds=["n0"])
    assert await net.run_until(bound, stop=net.converged, check_every=0.5), (
        f"{n} nodes did not converge within {bound} s"
    )
    return net


async def wait_for(
    net: SimNetwork, condition: Callable[[], bool], within: float, every: float = 0.05
) -> float | None:
    """Virtual seconds until ``condition`` holds (checked every ``every``), None if it never
    did within ``within``."""
    start = net.now
    if await net.run_until(start + within, stop=condition, check_every=every):
        return net.now - start
    return None


def everyone_sees(
    net: SimNetwork, member: str, status: Status, observers: Iterable[str] | None = None
) -> bool:
    """Every observer (default: every up node but ``member``) has ``member`` at ``status``."""
    names = observers if observers is not None else (n.name for n in net.up_nodes())
    return all(net.status_of(o, member) is status for o in names if o != member)


def incarnations_of(net: SimNetwork, member: str) -> set[int]:
    """The incarnations of ``member`` as the other up nodes see it."""
    views = (n.core.member(member) for n in net.up_nodes() if n.name != member)
    return {v.incarnation for v in views if v is not None}


# ---------------------------------------------------------------------- scale


@pytest.mark.slow
async def test_thousand_nodes_converge_then_detect_a_crash(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """1,000 nodes join through one seed and converge; then a silently crashed node is declared
    dead by all 999 survivors, no sooner than the minimum suspicion timeout allows and with no
    live member declared dead meanwhile. (One test so the expensive cluster is built once.)"""
    net = await start_cluster(1000, seed=1, bound=JOIN_BOUND_1000)
    rec = record(net)
    lo, _ = suspicion_window(1000)

    net.crash("n500")
    survivors = len(net.up_nodes())
    took = await wait_for(
        net, lambda: len(rec.observers(EventKind.DEAD, "n500")) == survivors, lo + DETECT_SLACK
    )

    assert took is not None, "not every survivor declared the crashed node dead in time"
    assert took >= lo
    assert everyone_sees(net, "n500", Status.DEAD)
    assert {member for _, _, member in rec.verdicts(EventKind.DEAD)} == {"n500"}


# ---------------------------------------------------------------------- failure detection


async def _time_to_declare_dead(seed: int, fail: Callable[[SimNetwork, str], None]) -> float:
    """Virtual seconds from ``fail`` (crash or kill) of n3 until all 15 others have it DEAD."""
    net = await start_cluster(16, seed)
    rec = record(net)
    fail(net, "n3")
    elapsed = await wait_for(net, lambda: everyone_sees(net, "n3", Status.DEAD), 60.0)
    assert elapsed is not None, "not declared dead by every member"
    assert {member for _, _, member in rec.verdicts(EventKind.DEAD)} == {"n3"}
    return elapsed


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_crash_is_detected_by_every_member_and_kill_faster(
    autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    """A crash (silent host) needs the suspicion timeout; a kill (the host answers TCP with a
    reset) is proof of death on the first failed probe, so it is detected sooner."""
    lo, _ = suspicion_window(16)
    crash = await _time_to_declare_dead(seed, SimNetwork.crash)
    kill = await _time_to_declare_dead(seed, SimNetwork.kill)

    assert lo <= crash <= lo + DETECT_SLACK
    assert kill < crash
    # No suspicion window at all: a probe must first reach the victim (the 16 round-robin
    # probers bring one within a few intervals), its end is the verdict, then the gossip.
    assert kill <= KILL_BOUND_16


@pytest.mark.slow
async def test_no_false_positives_with_ten_percent_loss(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """10 % loss on every link for 10 virtual minutes at 100 nodes: probes fail and members get
    suspected, but every suspicion is refuted (Lifeguard) and nobody is ever declared dead."""
    net = await start_cluster(100, seed=1)
    rec = record(net)
    net.loss = 0.10
    await net.run_for(600.0)

    assert rec.verdicts(EventKind.DEAD) == []
    assert rec.verdicts(EventKind.SUSPECT), "the loss never bit: nothing was even suspected"
    net.loss = 0.0
    assert await wait_for(net, net.converged, 30.0, every=0.5) is not None


# ---------------------------------------------------------------------- pauses (SIGSTOP)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_short_pause_is_never_declared_dead(
    autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    """Paused until suspected, then for half the minimum suspicion timeout more: on resume
    the node reads the queued suspicions and refutes before any timer can expire."""
    lo, _ = suspicion_window(16)
    net = await start_cluster(16, seed)
    rec = record(net)
    await net.run_for(3.0)
    net.pause("n5")
    suspected = await wait_for(net, lambda: bool(rec.observers(EventKind.SUSPECT, "n5")), 3 * lo)
    assert suspected is not None, "a paused node was never even suspected"
    await net.run_for(0.5 * lo)
    net.resume("n5")

    assert await wait_for(net, net.converged, 10.0) is not None
    await net.run_for(60.0)
    assert rec.verdicts(EventKind.DEAD) == []
    assert "n5" in {member for _, _, member in rec.verdicts(EventKind.SUSPECT)}
    assert net.converged()


@pytest.mark.parametrize("seed", [1, 2])
async def test_a_cpu_starved_node_is_never_declared_dead(
    autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    """The Lifeguard paper's test: one node stopped 1 s of every 2 s (SIGSTOP/SIGCONT duty
    cycling) for four virtual minutes. Each stop makes its probes late and its acks late; it
    is suspected, refutes on every resume, and the stalls it shows keep its next suspicions
    open long enough: nobody is declared dead, and it does not condemn anyone either."""
    net = await start_cluster(16, seed)
    rec = record(net)
    net.starve("n5", stop=1.0, run=1.0)
    await net.run_for(240.0)

    assert rec.verdicts(EventKind.DEAD) == []
    assert rec.observers(EventKind.SUSPECT, "n5"), "the starvation never bit"


async def test_starvation_cycle_stops_and_resumes_the_node(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The duty cycle itself: paused for ``stop`` s, running for ``run`` s, until ``until``;
    and what arrived meanwhile is handled on resume, not lost."""
    net = await start_cluster(4, seed=1)
    start = net.now
    net.starve("n2", stop=0.3, run=0.2, until=start + 2.0)
    states = []
    for at in (0.1, 0.4, 0.6, 0.9, 1.1, 1.4):  # stopped 0-0.3, 0.5-0.8, 1.0-1.3, ...
        await net.run_until(start + at)
        states.append(net.nodes["n2"].state)
    assert states == ["paused", "up"] * 3
    await net.run_for(5.0)
    assert net.nodes["n2"].state == "up"
    assert net.converged()


async def test_asymmetric_one_way_loss_declares_nobody_dead(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Four nodes lose 40 % of what they send, nothing of what they receive, for four virtual
    minutes: their acks go missing, they are suspected and refute; nobody is declared dead."""
    net = await start_cluster(16, seed=1)
    rec = record(net)
    names = sorted(net.nodes)
    for src in ("n1", "n2", "n3", "n4"):
        for dst in names:
            if dst != src:
                net.set_loss(src, dst, 0.40)
    await net.run_for(240.0)

    assert rec.verdicts(EventKind.DEAD) == []
    assert rec.verdicts(EventKind.SUSPECT), "the loss never bit"


async def test_long_pause_is_declared_dead_then_refutes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Paused far beyond the maximum suspicion timeout: everyone declares it dead; after resume
    it refutes with a higher incarnation and every member sees it alive again."""
    _, hi = suspicion_window(16)
    net = await start_cluster(16, seed=4)
    before = net.nodes["n5"].core.incarnation
    net.pause("n5")
    assert await wait_for(net, lambda: everyone_sees(net, "n5", Status.DEAD), 3 * hi) is not None
    await net.run_for(3 * hi)  # still paused, well past any suspicion timeout
    net.resume("n5")

    assert await wait_for(net, net.converged, 10.0) is not None
    assert min(incarnations_of(net, "n5")) > before


# ---------------------------------------------------------------------- partitions


async def _split_for_two_minutes(seed: int, tuning: MembershipTuning = LAN) -> SimNetwork:
    """16 nodes split 8/8 for 120 s; asserts each side declared the whole other side dead."""
    net = await start_cluster(16, seed, tuning=tuning)
    left = [f"n{i}" for i in range(8)]
    right = [f"n{i}" for i in range(8, 16)]
    net.partition(left, right)

    def split() -> bool:
        return all(everyone_sees(net, m, Status.DEAD, left) for m in right) and all(
            everyone_sees(net, m, Status.DEAD, right) for m in left
        )

    assert await wait_for(net, split, 120.0, every=0.5) is not None
    await net.run_for(120.0 - net.now)
    return net


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_two_sided_partition_heals_into_one_cluster(
    autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    """During a 120 s split each side declares the other dead. After heal() push-pull cannot
    help (it only picks live peers) and gossip to the dead stopped long ago, so the sides find
    each other through the reconnect timer, which tries dead members; the merge makes each side
    suspect itself in the other's state, the refutations cross on the next exchange, and
    everyone sees everyone alive."""
    net = await _split_for_two_minutes(seed)
    net.heal()
    assert await wait_for(net, net.converged, HEAL_BOUND, every=0.5) is not None


async def test_partition_heal_relies_on_reconnect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Control for the test above: with the reconnect timer effectively off, the healed
    network stays split, so reconnect is indeed what merges the sides."""
    net = await _split_for_two_minutes(seed=1, tuning=replace(LAN, reconnect_interval=1e9))
    net.heal()
    assert await wait_for(net, net.converged, HEAL_BOUND, every=0.5) is None


async def test_one_way_block_keeps_both_members_alive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """n1 cannot reach n2 but n2 reaches n1. Each one's direct probes of the other fail (the
    ping or the ack is lost), yet relays carry the indirect probes both ways, so nobody even
    suspects either of them, and nothing needs repairing after heal()."""
    net = await start_cluster(16, seed=1)
    rec = record(net)
    indirect_before = net.nodes["n1"].core.stats.indirect_probes
    net.block("n1", "n2")
    await net.run_for(300.0)

    assert net.nodes["n1"].core.stats.indirect_probes > indirect_before
    assert rec.rows == [], "a one-way block between two members changed someone's view"
    assert net.converged()
    net.heal()
    await net.run_for(30.0)
    assert net.converged()


async def _cut_off(seed: int) -> tuple[SimNetwork, Recorder]:
    """For 120 s n1 can send to n0, n2, n3 and n4 only; everything else works, including every
    peer's packets to n1. n1 is healthy and reachable: directly by everyone, and its own
    gossip reaches the rest of the cluster through the four peers it can still talk to."""
    net = await start_cluster(16, seed)
    rec = record(net)
    for i in range(5, 16):
        net.block("n1", f"n{i}")
    await net.run_for(120.0)
    return net, rec


async def test_partly_cut_off_node_is_not_lost_after_heal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Whatever verdicts the asymmetric links provoke meanwhile, after heal() the cluster is
    whole again within one push-pull interval (with its jitter)."""
    net, _ = await _cut_off(seed=1)
    net.heal()
    assert await wait_for(net, net.converged, 1.25 * LAN.push_pull_interval, every=0.5) is not None


async def test_partly_cut_off_node_is_never_declared_dead(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Every member is healthy and reachable (directly or through relays), so no DEAD
    verdict is ever issued: the cut-off node re-announces its refutation when stale
    accusations reach it, its own accusations are slowed by its poor local health, and its
    verdicts without evidence are checked as suspicions by the others."""
    _, rec = await _cut_off(seed=1)
    assert rec.verdicts(EventKind.DEAD) == []


# ---------------------------------------------------------------------- lifecycle


async def test_restart_with_same_name_rejoins_with_higher_incarnation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A killed node is declared dead; its replacement (same name and address, incarnation
    starting over at 0) learns from its seed that it is "dead", refutes with a higher
    incarnation and is alive in every view."""
    net = await start_cluster(16, seed=1)
    net.kill("n4")
    assert await wait_for(net, lambda: everyone_sees(net, "n4", Status.DEAD), 30.0) is not None
    dead_at = max(incarnations_of(net, "n4"))
    await net.run_for(5.0)

    net.restart("n4", seeds=["n0"])
    assert await wait_for(net, net.converged, 10.0) is not None
    assert min(incarnations_of(net, "n4")) > dead_at
    assert net.nodes["n4"].core.incarnation > dead_at


async def test_graceful_leave_is_left_everywhere_never_dead(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A graceful leave is announced, then the process exits; every member records LEFT (not
    DEAD) and keeps it."""
    net = await start_cluster(16, seed=1)
    rec = record(net)
    net.leave("n4")
    assert await wait_for(net, lambda: everyone_sees(net, "n4", Status.LEFT), 5.0) is not None
    await net.run_for(60.0)

    assert net.nodes["n4"].state != "up", "the leaving process never exited"
    assert everyone_sees(net, "n4", Status.LEFT)
    assert rec.verdicts(EventKind.DEAD) == []
    assert len(rec.observers(EventKind.LEAVE, "n4")) == 15
    assert net.converged()


# ---------------------------------------------------------------------- determinism


async def _event_digest(seed: int) -> str:
    """Digest of every (time, observer, kind, member) in a short run with a crash in it."""
    net = SimNetwork(seed)
    rec = record(net)
    net.add_node("n0", LAN)
    for i in range(1, 16):
        net.add_node(f"n{i}", LAN, seeds=["n0"])
    await net.run_for(10.0)
    net.crash("n7")
    await net.run_for(30.0)
    assert rec.verdicts(EventKind.DEAD), "the run is too short to be a meaningful fingerprint"
    text = "\n".join(f"{at!r} {obs} {kind.value} {member}" for at, obs, kind, member, _ in rec.rows)
    return hashlib.sha256(text.encode()).hexdigest()


async def test_same_seed_same_events_other_seed_other_events(
    autojump_clock: trio.testing.MockClock,
) -> None:
    first = await _event_digest(7)
    assert await _event_digest(7) == first
    assert await _event_digest(8) != first


def test_suspicion_window_matches_the_lan_profile() -> None:
    """Guards the bounds above: they are only meaningful if the window is what we think."""
    lo, hi = suspicion_window(16)
    assert math.isclose(lo, LAN.suspicion_min_timeout * math.log10(16))
    # The maximum is memberlist's: suspicion_max_timeout_mult times memberlist's minimum.
    assert math.isclose(
        hi, LAN.suspicion_max_timeout_mult * 4 * math.log10(16) * LAN.probe_interval
    )
