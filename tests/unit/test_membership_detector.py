"""The failure detector's measured inputs and the rules that use them.

Pure arithmetic first (:mod:`meshd.membership.estimates`, :func:`detector_bounds`), then the
core's rules, one at a time, on hand-driven cores (see ``membership_helpers``): the adaptive
probe timeout, the early verdict once every relay has nacked, more relays on a lossy direct
path, stall-informed suspicion, Lifeguard's brake on our own confirmations, and the gossip
round that spreads our own news at once.
"""

from __future__ import annotations

import math

import pytest
from membership_helpers import LAN, Node, addr_for, cluster, tuning

from meshd.config.model import ConfigError
from meshd.config.profiles import profile_tuning
from meshd.membership.estimates import PeerEstimate, relay_count
from meshd.membership.events import EventKind
from meshd.membership.suspicion import detector_bounds, suspicion_bounds
from meshd.wire.membership import Ack, Alive, Ping, PingReq, Status, Suspect

EPS = 1e-6
FIVE = ("b", "c", "d", "e")


# ---------------------------------------------------------------------------- estimates


def test_first_rtt_sample_sets_srtt_and_half_of_it_as_variation() -> None:
    est = PeerEstimate()
    assert est.probe_timeout(0.1, 0.5) == 0.5  # no sample: the ceiling
    est.rtt_sample(0.04)
    assert (est.srtt, est.rttvar) == (0.04, 0.02)
    assert est.probe_timeout(0.1, 0.5) == pytest.approx(0.12)  # 0.04 + 4 · 0.02


def test_later_rtt_samples_follow_jacobson_karels() -> None:
    est = PeerEstimate()
    est.rtt_sample(0.04)
    est.rtt_sample(0.12)
    # rttvar ← ¾ · 0.02 + ¼ · |0.04 − 0.12|; srtt ← ⅞ · 0.04 + ⅛ · 0.12
    assert est.rttvar == pytest.approx(0.035)
    assert est.srtt == pytest.approx(0.05)
    assert est.probe_timeout(0.1, 0.5) == pytest.approx(0.05 + 4 * 0.035)


@pytest.mark.parametrize(("rtt", "expected"), [(0.0, 0.1), (0.001, 0.1), (0.3, 0.5), (5.0, 0.5)])
def test_probe_timeout_stays_within_its_bounds(rtt: float, expected: float) -> None:
    est = PeerEstimate()
    est.rtt_sample(rtt)
    assert est.probe_timeout(0.1, 0.5) == pytest.approx(expected)


def test_direct_loss_is_an_exponential_average_of_outcomes() -> None:
    est = PeerEstimate()
    est.direct_outcome(False)
    assert est.loss == pytest.approx(1 / 8)
    est.direct_outcome(False)
    assert est.loss == pytest.approx(1 - (7 / 8) ** 2)
    for _ in range(200):
        est.direct_outcome(True)
    assert est.loss < 1e-9


def test_stall_halves_every_half_life_and_only_a_longer_stall_replaces_it() -> None:
    est = PeerEstimate()
    assert est.stall_now(5.0, 60.0) == 0.0
    est.stall_sample(10.0, 4.0, 60.0)
    assert est.stall_now(10.0, 60.0) == 4.0
    assert est.stall_now(70.0, 60.0) == pytest.approx(2.0)
    assert est.stall_now(130.0, 60.0) == pytest.approx(1.0)
    est.stall_sample(70.0, 1.5, 60.0)  # shorter than what is left of the 4 s (2 s): kept
    assert est.stall_now(70.0, 60.0) == pytest.approx(2.0)
    est.stall_sample(70.0, 3.0, 60.0)  # longer: replaces it, and decays from now
    assert est.stall_now(130.0, 60.0) == pytest.approx(1.5)
    est.stall_sample(130.0, 0.5, 0.0)  # half-life 0: never fades (and 0.5 < 3)
    assert est.stall_now(1e6, 0.0) == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("loss", "expected"), [(0.0, 3), (0.05, 3), (0.1, 4), (0.15, 5), (0.3, 6), (0.9, 6)]
)
def test_relay_count_grows_with_direct_loss_up_to_the_most(loss: float, expected: int) -> None:
    assert relay_count(3, 6, loss) == expected


def test_relay_count_never_below_base() -> None:
    assert relay_count(3, 3, 0.9) == 3
    assert relay_count(3, 2, 0.9) == 3


# ---------------------------------------------------------------------------- bounds


def test_detector_minimum_is_min_timeout_scaled_by_cluster_size() -> None:
    lo, hi = detector_bounds(4, 6, 2.0, 16, 1.0)
    assert lo == pytest.approx(2.0 * math.log10(16))
    assert hi == pytest.approx(suspicion_bounds(4, 6, 16, 1.0)[1])  # memberlist's maximum
    lo, _ = detector_bounds(4, 6, 2.0, 5, 1.0)
    assert lo == 2.0  # log10 5 < 1: no scaling


def test_detector_keeps_memberlists_minimum_without_confirmations_or_when_off() -> None:
    assert detector_bounds(4, 6, 2.0, 3, 1.0) == suspicion_bounds(4, 6, 3, 1.0)  # k = 0 at n=3
    assert detector_bounds(4, 6, 0.0, 16, 1.0) == suspicion_bounds(4, 6, 16, 1.0)


def test_detector_minimum_never_exceeds_the_maximum() -> None:
    lo, hi = detector_bounds(4, 1, 100.0, 16, 1.0)
    assert lo == hi


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"probe_timeout_min": 0.0}, "probe_timeout_min"),
        ({"probe_timeout_min": 0.6}, "probe_timeout_min"),
        ({"indirect_checks_max": 2}, "indirect_checks_max"),
        ({"indirect_checks_max": 17}, "indirect_checks_max"),
        ({"suspicion_min_timeout": -1.0}, "suspicion_min_timeout"),
        ({"stall_memory": -1.0}, "stall_memory"),
        ({"suspicion_stall_mult": 65}, "suspicion_stall_mult"),
    ],
)
def test_detector_settings_are_validated(changes: dict[str, float], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        tuning(**changes).validate("membership")


def test_every_profile_has_a_valid_detector() -> None:
    for name in ("lan", "wan", "local"):
        t = profile_tuning(name)
        t.validate("membership")
        # The faster minimum never undercuts what a profile's probe interval can confirm.
        assert t.suspicion_min_timeout >= 2 * t.probe_interval


# ---------------------------------------------------------------------------- adaptive timeout


def measured(names: tuple[str, ...] = FIVE, **tune: float) -> tuple[Node, float]:
    """A cluster whose members all answered one direct probe at once (rtt 0): every probe
    timeout is down to ``probe_timeout_min``. Returns the node and the time it is at."""
    node = cluster(names, answering=True, tune=tuning(**tune))
    seen: set[str] = set()
    now = 0.0
    while seen != set(names):
        now, ping = node.run_until_ping(limit=100.0)
        seen.add(ping.target)
    node.run(now + LAN.probe_interval)
    return node, node.now


def next_probe_of(node: Node, target: str) -> tuple[float, Ping]:
    return node.run_until_ping(limit=node.now + 100.0, target=target)


def test_a_fast_peer_gets_the_minimum_probe_timeout() -> None:
    node, _ = measured()
    node.answering.discard("b")
    t0, ping = next_probe_of(node, "b")
    node.run(t0 + LAN.probe_timeout_min - EPS)
    assert node.find(PingReq, since=t0) == []
    node.run(t0 + LAN.probe_timeout_min)
    reqs = node.find(PingReq, since=t0)
    assert len(reqs) == LAN.indirect_checks
    assert all(at == t0 + LAN.probe_timeout_min for at, _, _ in reqs)
    assert all(req.seq == ping.seq for _, _, req in reqs)


def test_an_unmeasured_peer_gets_the_full_probe_timeout() -> None:
    node = cluster(FIVE)
    t0, _ = node.run_until_ping()
    node.run(t0 + LAN.probe_timeout - EPS)
    assert node.find(PingReq) == []
    node.run(t0 + LAN.probe_timeout)
    assert len(node.find(PingReq)) == LAN.indirect_checks


def first_indirect_at(node: Node, target: str) -> float:
    """How long after its next probe of ``target`` (not answering) the relays are asked."""
    node.answering.discard(target)
    t0, ping = next_probe_of(node, target)
    node.run(t0 + LAN.probe_interval)
    return min(at for at, _, req in node.find(PingReq, since=t0) if req.seq == ping.seq) - t0


def test_an_unmeasured_member_gets_the_longest_timeout_of_the_measured_ones() -> None:
    """A newcomer (or a member not probed yet in a young cluster) is timed like its measured
    neighbours, not with the full timeout; the slowest of them sets it."""
    node, _ = measured()
    node.answering.discard("c")
    t0, ping = next_probe_of(node, "c")
    node.send(t0 + 0.25, addr_for("c"), Ack(ping.seq))  # c answers, slowly
    node.answering.add("c")
    node.learn(node.now, ["f"])
    newcomer = first_indirect_at(node, "f")
    assert LAN.probe_timeout_min < newcomer < LAN.probe_timeout
    assert first_indirect_at(node, "c") == pytest.approx(newcomer)  # the slowest sets it


@pytest.mark.parametrize(
    ("acker", "timeout"), [("b", LAN.probe_timeout_min), ("c", LAN.probe_timeout)]
)
def test_a_relays_ack_from_the_target_measures_the_relays_own_round_trip(
    acker: str, timeout: float
) -> None:
    """Nobody measured: the full timeout for everyone, until this node relays a ping to b and
    b itself answers (an ack from anyone else proves nothing about b)."""
    node = cluster(FIVE)
    node.send(1.0, addr_for("s"), PingReq(500, "b", addr_for("b"), "s", True))
    [(_, _, relayed)] = node.find(Ping, since=1.0)
    node.send(1.02, addr_for(acker), Ack(relayed.seq))
    assert first_indirect_at(node, "b") == pytest.approx(timeout)


def test_a_lease_pings_ack_measures_the_round_trip() -> None:
    node = cluster(FIVE)
    node.core.renew_lease(0.05, 0.4)
    node.run(0.05)
    [ping] = [m for at, _, m in node.find(Ping, 0.05) if at == 0.05 and m.target == "b"]
    node.send(0.06, addr_for("b"), Ack(ping.seq))
    node.core.renew_lease(0.1, None)
    assert first_indirect_at(node, "b") == pytest.approx(LAN.probe_timeout_min)


def test_no_adaptation_when_the_floor_equals_the_timeout() -> None:
    node, _ = measured(probe_timeout_min=LAN.probe_timeout)
    node.answering.discard("b")
    t0, _ = next_probe_of(node, "b")
    node.run(t0 + LAN.probe_timeout - EPS)
    assert node.find(PingReq, since=t0) == []


# ---------------------------------------------------------------------------- early verdict


def test_every_relay_nacking_ends_the_probe_at_three_timeouts() -> None:
    """The relays could not reach the target either, and had twice the direct timeout to try:
    the probe is judged then, not at the end of the interval."""
    node, _ = measured()
    node.answering.discard("b")  # the relays (answering) nack at once
    t0, _ = next_probe_of(node, "b")
    verdict = t0 + 3 * LAN.probe_timeout_min
    node.run(verdict - EPS)
    assert node.events(EventKind.SUSPECT) == []
    node.run(verdict)
    [event] = node.events(EventKind.SUSPECT)
    assert (event.member.name, event.at) == ("b", pytest.approx(verdict))
    assert node.core.stats.probe_failures == 1
    node.run(t0 + LAN.probe_interval)  # the probe's end judges nothing twice
    assert len(node.events(EventKind.SUSPECT)) == 1
    assert node.core.stats.probe_failures == 1


def test_a_missing_nack_waits_for_the_end_of_the_interval() -> None:
    node, _ = measured()
    node.answering.discard("b")
    node.relays_nack = False  # the relays say nothing: no nacks
    t0, _ = next_probe_of(node, "b")
    node.run(t0 + LAN.probe_interval - EPS)
    assert node.events(EventKind.SUSPECT) == []
    node.run(t0 + LAN.probe_interval)
    assert [e.member.name for e in node.events(EventKind.SUSPECT)] == ["b"]


def test_no_early_verdict_with_the_full_timeout() -> None:
    """Three full timeouts (1.5 s) are past the interval: the end of the probe judges."""
    node = cluster(FIVE, answering=True)
    node.answering.discard("b")
    t0, _ = next_probe_of(node, "b")
    node.run(t0 + LAN.probe_interval - EPS)
    assert node.events(EventKind.SUSPECT) == []
    node.run(t0 + LAN.probe_interval)
    assert [e.member.name for e in node.events(EventKind.SUSPECT)] == ["b"]


def test_a_refusal_after_an_early_verdict_still_proves_death() -> None:
    node, _ = measured()
    node.answering.discard("b")
    t0, ping = next_probe_of(node, "b")
    node.run(t0 + LAN.probe_timeout_min)
    [(_, stream, _)] = [s for s in node.streams(since=t0) if s[2] == Ping(ping.seq, "b", "a")]
    node.run(t0 + 3 * LAN.probe_timeout_min)
    assert node.status("b") is Status.SUSPECT
    node.result(t0 + 0.5, stream.token, None, "refused")
    node.run(t0 + LAN.probe_interval)
    assert node.status("b") is Status.DEAD
    assert node.core.stats.deaths_by_refusal == 1


# ---------------------------------------------------------------------------- lossy paths


def test_a_lossy_direct_path_gets_more_relays() -> None:
    """b's direct pings go unanswered but the relays reach it: each probe's direct outcome
    raises b's measured loss, and the relays grow from indirect_checks to indirect_checks_max."""
    names = (*(f"m{i}" for i in range(9)), "b")
    node = cluster(names, answering=True)
    node.answering.discard("b")
    counts = []
    for _ in range(8):
        t0, ping = next_probe_of(node, "b")
        reqs = []
        while not reqs:
            node.step()
            reqs = [r for r in node.find(PingReq, since=t0) if r[2].seq == ping.seq]
        counts.append(len(reqs))
        node.send(node.now, reqs[0][1], Ack(ping.seq))  # a relay reached it
        node.run(t0 + LAN.probe_interval)
    assert node.events(EventKind.SUSPECT) == []
    # The first failure counts already: 1/8 loss, one relay more.
    assert counts[0] == relay_count(LAN.indirect_checks, LAN.indirect_checks_max, 1 / 8)
    assert counts == sorted(counts)
    assert counts[-1] == LAN.indirect_checks_max


def test_a_confirmation_probe_uses_the_most_relays() -> None:
    names = (*(f"m{i}" for i in range(9)), "b")
    node = cluster(names, answering=True)
    node.answering.discard("b")
    node.send(1.0, addr_for("m1"), Suspect("b", 0, "m1"))
    [(t0, _, ping)] = [p for p in node.find(Ping, since=1.0) if p[2].target == "b"]
    node.run(t0 + LAN.probe_timeout)
    reqs = [r for r in node.find(PingReq, since=t0) if r[2].seq == ping.seq]
    assert len(reqs) == LAN.indirect_checks_max


def test_a_relay_nacks_within_the_probers_indirect_phase() -> None:
    node = cluster(FIVE, tune=tuning(probe_interval=1.0, probe_timeout=0.9, probe_timeout_min=0.9))
    src, target = addr_for("s"), addr_for("t")
    node.send(1.0, src, PingReq(500, "t", target, "s", True))
    wait = 0.8 * (1.0 - 0.9)
    node.run(1.0 + wait - EPS)
    assert [m for _, _, m in node.sent(since=1.0 + EPS) for m in m] == []
    node.run(1.0 + wait)
    assert node.core.stats.nacks_sent == 1


# ---------------------------------------------------------------------------- stalls


def suspect_confirmed(node: Node, at: float) -> None:
    """c suspects b at ``at``; d and e confirm at once (k = 2 for five members)."""
    node.send(at, addr_for("c"), Suspect("b", 0, "c"))
    node.send(at, addr_for("d"), Suspect("b", 0, "d"))
    node.send(at, addr_for("e"), Suspect("b", 0, "e"))


def test_a_confirmed_suspicion_of_a_never_stalled_member_lasts_the_minimum() -> None:
    node = cluster(FIVE, tune=tuning(accelerate_confirmations=False))
    suspect_confirmed(node, 10.0)
    node.run(100.0)
    [event] = node.events(EventKind.DEAD, "b")
    assert event.at == pytest.approx(10.0 + LAN.suspicion_min_timeout)


def test_a_late_ack_gives_the_members_next_suspicion_twice_that_stall() -> None:
    """b answered a probe that had failed 3 s before: b stalls that long while alive. Its next
    suspicion, however well confirmed, stays open for suspicion_stall_mult × 3 s."""
    node, _ = measured(accelerate_confirmations=False)
    node.answering.discard("b")
    t0, ping = next_probe_of(node, "b")
    node.run(t0 + LAN.probe_interval)
    assert node.status("b") is Status.SUSPECT
    node.run(t0 + 3.0)
    node.send(t0 + 3.0, addr_for("b"), Ack(ping.seq), Alive("b", 1, addr_for("b"), {}))
    assert node.status("b") is Status.ALIVE
    node.answering.add("b")
    start = t0 + 10.0
    node.run(start)
    node.send(start, addr_for("c"), Suspect("b", 1, "c"))
    node.send(start, addr_for("d"), Suspect("b", 1, "d"))
    node.send(start, addr_for("e"), Suspect("b", 1, "e"))
    node.answering.discard("b")
    node.run(start + 100.0)
    [event] = node.events(EventKind.DEAD, "b")
    stall = 3.0 * 0.5 ** (7.0 / LAN.stall_memory)  # seen at t0 + 3, faded a little since
    assert event.at == pytest.approx(start + LAN.suspicion_stall_mult * stall, abs=1e-3)
    assert event.at > start + LAN.suspicion_min_timeout


def test_no_stall_floor_when_switched_off() -> None:
    node, _ = measured(accelerate_confirmations=False, suspicion_stall_mult=0)
    node.answering.discard("b")
    t0, ping = next_probe_of(node, "b")
    node.run(t0 + LAN.probe_interval)
    node.send(t0 + 3.0, addr_for("b"), Ack(ping.seq), Alive("b", 1, addr_for("b"), {}))
    node.answering.add("b")
    start = t0 + 10.0
    node.run(start)
    for accuser in "cde":
        node.send(start, addr_for(accuser), Suspect("b", 1, accuser))
    node.answering.discard("b")
    node.run(start + 100.0)
    [event] = node.events(EventKind.DEAD, "b")
    assert event.at == pytest.approx(start + LAN.suspicion_min_timeout)


def test_a_late_refutation_after_we_told_the_suspect_counts_as_a_stall() -> None:
    """The buddy system told b it is suspected; b refuted only 4 s later."""
    node = cluster(FIVE, tune=tuning(accelerate_confirmations=False), answering=True)
    node.answering.discard("b")
    node.send(1.0, addr_for("c"), Suspect("b", 0, "c"))
    told, _ = next_probe_of(node, "b")  # carries the Suspect to b
    assert Suspect("b", 0, "a") in [m for _, _, m in node.find(Suspect, since=told)]
    node.answering.add("b")  # our own probes of b succeed from now on: only c, d, e accuse
    node.run(told + 4.0)
    node.send(told + 4.0, addr_for("b"), Alive("b", 1, addr_for("b"), {}))
    assert node.status("b") is Status.ALIVE
    start = told + 5.0
    node.run(start)
    for accuser in "cde":
        node.send(start, addr_for(accuser), Suspect("b", 1, accuser))
    node.run(start + 100.0)
    [event] = node.events(EventKind.DEAD, "b")
    assert event.at == pytest.approx(start + LAN.suspicion_stall_mult * 4.0, abs=0.01)


# ---------------------------------------------------------------------------- Lifeguard's brake


def test_our_own_failed_probe_confirms_nothing_while_our_health_is_in_doubt() -> None:
    node = cluster(FIVE, tune=tuning(accelerate_confirmations=False))
    node.send(1.0, addr_for("c"), Suspect("b", 0, "c"))
    node.core.awareness.apply(1)
    node.send(1.5, addr_for("x"), Suspect("b", 0, "a"))  # as our own failed probe would
    healthy = cluster(FIVE, tune=tuning(accelerate_confirmations=False))
    healthy.send(1.0, addr_for("c"), Suspect("b", 0, "c"))
    healthy.send(1.5, addr_for("x"), Suspect("b", 0, "a"))
    node.run(200.0)
    healthy.run(200.0)
    [slow] = node.events(EventKind.DEAD, "b")
    [fast] = healthy.events(EventKind.DEAD, "b")
    assert slow.at > fast.at


def test_no_confirmation_probe_while_our_health_is_in_doubt() -> None:
    node = cluster(FIVE)
    node.core.awareness.apply(1)
    node.send(1.0, addr_for("c"), Suspect("b", 0, "c"))
    assert [p for _, _, p in node.find(Ping, since=1.0) if p.target == "b"] == []
    healthy = cluster(FIVE)
    healthy.send(1.0, addr_for("c"), Suspect("b", 0, "c"))
    assert [p for _, _, p in healthy.find(Ping, since=1.0) if p.target == "b"] != []


# ---------------------------------------------------------------------------- our own news


def test_our_own_suspicion_is_gossiped_at_once() -> None:
    node = cluster(FIVE)
    t0, _ = node.run_until_ping()
    node.run(t0 + LAN.probe_interval)
    [event] = node.events(EventKind.SUSPECT)
    at = event.at
    gossiped = [dest for when, dest, m in node.find(Suspect, since=at) if when == at]
    assert len(gossiped) >= 1
    assert all(m == Suspect(event.member.name, 0, "a") for _, _, m in node.find(Suspect, since=at))


def test_someone_elses_suspicion_waits_for_the_periodic_gossip() -> None:
    node = cluster(FIVE, tune=tuning(accelerate_confirmations=False))
    node.run(0.05)
    node.send(0.05, addr_for("c"), Suspect("b", 0, "c"))
    assert node.find(Suspect, since=0.05) == []
