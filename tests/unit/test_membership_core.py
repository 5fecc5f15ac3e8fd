"""Protocol rules of the sans-IO SWIM + Lifeguard core, one rule at a time.

Every test drives one or a few :class:`Membership` cores directly: hand-made packets in,
explicit ``now`` values, and assertions on the packets, stream requests and events that come
out. See ``membership_helpers`` for the small harness.
"""

from __future__ import annotations

import itertools
import math

import pytest
from membership_helpers import (
    ADDR_A,
    LAN,
    Node,
    addr_for,
    alive,
    build,
    cluster,
    make_core,
    state,
    tuning,
)

from meshd.membership.broadcast import retransmit_limit
from meshd.membership.events import EventKind, SendPacket
from meshd.membership.reference import reference_members
from meshd.wire import membership as wire
from meshd.wire import packet
from meshd.wire.membership import (
    Ack,
    Alive,
    Dead,
    Left,
    MemberState,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Status,
    Suspect,
)
from meshd.wire.validate import WireError
from meshd_client.protocol import cbor, errors

B, C, D, E = (addr_for(n) for n in "bcde")
STRANGER = ("192.0.2.77", 4000)
EPS = 1e-6
# n = 5 on the LAN profile: memberlist's min = 4 · max(1, log10 5) · 1 s, max = 6 · that,
# k = 4 − 2; k confirmations bring a suspicion down to meshd's minimum,
# suspicion_min_timeout · max(1, log10 5) (memberlist's min where no confirmation is expected).
MEMBERLIST_MIN_5, MAX_5 = 4.0, 24.0
MIN_5 = LAN.suspicion_min_timeout
ONE_CONFIRMATION_5 = MAX_5 - (MAX_5 - MIN_5) * math.log(2) / math.log(3)


# ---------------------------------------------------------------------------- ping / ack


def test_ping_is_acked_to_the_packet_source() -> None:
    node = Node(make_core())
    node.send(0.1, STRANGER, Ping(77, "a", "x"))
    sent = node.sent()
    assert len(sent) == 1
    at, dest, msgs = sent[0]
    assert (at, dest) == (0.1, STRANGER)
    assert msgs[0] == Ack(77)


def test_ping_for_another_name_is_not_acked_and_counted() -> None:
    node = Node(make_core())
    node.send(0.1, STRANGER, Ping(77, "someone-else", "x"))
    assert node.sent() == []
    assert node.core.stats.rejected == {"ping_wrong_target": 1}


def test_ping_over_a_stream_is_acked_only_for_this_node() -> None:
    node = Node(make_core())
    assert node.stream(0.1, STRANGER, Ping(9, "a", "x")) == Ack(9)
    assert node.stream(0.2, STRANGER, Ping(9, "b", "x")) is None
    assert node.core.stats.rejected == {"ping_wrong_target": 1}


def test_ack_piggybacks_queued_gossip() -> None:
    node = Node(make_core())
    node.send(0.1, STRANGER, Ping(1, "a", "x"))
    [(_, _, msgs)] = node.sent()
    assert msgs == [Ack(1), Alive("a", 0, ADDR_A, {})]


# ---------------------------------------------------------------------------- ping-req relay


def relay_ping(node: Node, target: str = "t") -> Ping:
    [(_, dest, ping)] = node.find(Ping)
    assert dest == addr_for(target)
    assert (ping.target, ping.source) == (target, "a")
    return ping


def test_ping_req_relay_pings_with_its_own_seq_and_forwards_the_ack() -> None:
    node = Node(make_core())
    src, target = addr_for("s"), addr_for("t")
    node.send(1.0, src, PingReq(500, "t", target, "s", True))
    ping = relay_ping(node)
    assert ping.seq != 500
    # The target answers the relay's seq; the relay answers the requester's.
    node.send(1.1, target, Ack(500))
    assert node.find(Ack, since=1.1) == []
    node.send(1.2, target, Ack(ping.seq))
    assert node.sent(since=1.2) == [(1.2, src, [Ack(500)])]
    # Answered: no nack at the relay timeout, and a second ack is not forwarded again.
    node.send(1.3, target, Ack(ping.seq))
    node.run(3.0)
    assert node.find(Nack) == []
    assert node.find(Ack, since=1.3) == []


# A relay waits the probe timeout for the target (adaptive: the ceiling for a target it never
# measured), but at most 80 % of the prober's indirect phase, so that its nack arrives in time.
RELAY_WAIT = min(LAN.probe_timeout, 0.8 * (LAN.probe_interval - LAN.probe_timeout))


def test_ping_req_sends_nack_after_probe_timeout_without_ack() -> None:
    node = Node(make_core())
    src, target = addr_for("s"), addr_for("t")
    node.send(1.0, src, PingReq(500, "t", target, "s", True))
    ping = relay_ping(node)
    node.run(1.0 + RELAY_WAIT - EPS)
    assert node.find(Nack) == []
    node.run(1.0 + RELAY_WAIT)
    assert node.sent(since=1.0 + RELAY_WAIT) == [(1.0 + RELAY_WAIT, src, [Nack(500)])]
    assert node.core.stats.nacks_sent == 1
    # A late ack from the target is no longer forwarded.
    node.send(1.6, target, Ack(ping.seq))
    assert node.find(Ack, since=1.6) == []


def test_ping_req_without_nack_flag_stays_silent() -> None:
    node = Node(make_core())
    node.send(1.0, addr_for("s"), PingReq(500, "t", addr_for("t"), "s", False))
    relay_ping(node)
    node.run(5.0)
    assert node.find(Nack) == []
    assert node.core.stats.nacks_sent == 0


def test_ping_req_about_this_node_is_acked_directly() -> None:
    node = Node(make_core())
    node.send(1.0, addr_for("s"), PingReq(500, "a", ADDR_A, "s", True))
    [(_, dest, msgs)] = node.sent()
    assert dest == addr_for("s")
    assert msgs[0] == Ack(500)
    assert node.find(Ping) == []


def test_relay_table_is_bounded() -> None:
    node = Node(make_core())
    target = addr_for("t")
    reqs = [PingReq(i, "t", target, "s", True) for i in range(1025)]
    for i in range(0, len(reqs), 255):
        node.send(1.0, addr_for("s"), *reqs[i : i + 255])
    assert len(node.find(Ping)) == 1024
    assert node.core.stats.rejected == {"relay_table_full": 1}
    # The table drains at the relay timeout and takes requests again.
    node.run(2.0)
    assert node.core.stats.nacks_sent == 1024
    node.send(2.0, addr_for("s"), PingReq(5000, "t", target, "s", True))
    assert len(node.find(Ping)) == 1025


# ---------------------------------------------------------------------------- probe cycle


def test_probe_cycle_ping_then_indirect_and_tcp_then_suspect() -> None:
    node = cluster()
    t0, ping = node.run_until_ping()
    target = ping.target
    assert ping.source == "a"
    others = {n for n in "bcde" if n != target}

    node.run(t0 + LAN.probe_timeout - EPS)
    assert node.find(PingReq) == []
    assert node.streams() == []

    node.run(t0 + LAN.probe_timeout)
    reqs = node.find(PingReq)
    assert {dest for _, dest, _ in reqs} == {addr_for(n) for n in others}
    assert len(reqs) == LAN.indirect_checks
    for at, _, req in reqs:
        assert at == t0 + LAN.probe_timeout
        assert req == PingReq(ping.seq, target, addr_for(target), "a", True)
    [(at, stream, msg)] = node.streams()
    assert at == t0 + LAN.probe_timeout
    assert stream.addr == addr_for(target)
    assert msg == Ping(ping.seq, target, "a")
    assert stream.timeout == pytest.approx(LAN.probe_interval - LAN.probe_timeout)

    node.run(t0 + LAN.probe_interval - EPS)
    assert node.status(target) is Status.ALIVE
    node.run(t0 + LAN.probe_interval)
    [event] = node.events(EventKind.SUSPECT)
    assert event.member.name == target
    assert event.at == t0 + LAN.probe_interval
    assert node.status(target) is Status.SUSPECT
    stats = node.core.stats
    assert (stats.probe_failures, stats.indirect_probes, stats.suspicions) == (1, 3, 1)


def test_peek_names_status_tags_and_the_time_of_the_last_change() -> None:
    node = cluster()
    t0, ping = node.run_until_ping()
    target = ping.target
    assert node.core.peek("nobody") is None
    before = node.core.peek(target)
    assert before is not None and before.status is Status.ALIVE
    node.run(t0 + LAN.probe_interval)
    after = node.core.peek(target)
    assert after is not None
    assert (after.status, after.since) == (Status.SUSPECT, t0 + LAN.probe_interval)
    assert after.tags == node.core.member(target).tags  # type: ignore[union-attr]


def test_direct_ack_ends_the_probe() -> None:
    node = cluster()
    t0, ping = node.run_until_ping()
    node.send(t0 + 0.1, addr_for(ping.target), Ack(ping.seq))
    node.run(t0 + LAN.probe_interval)
    assert node.find(PingReq) == []
    assert node.streams() == []
    assert node.events(EventKind.SUSPECT) == []


# ---------------------------------------------------------------------------- lease renewal


def lease_pings(node: Node, at: float) -> dict[str, Ping]:
    """The pings sent at ``at`` by target (a lease round pings every member up at once)."""
    return {msg.target: msg for when, _, msg in node.find(Ping, at) if when == at}


def test_lease_renewal_pings_every_member_up_each_interval_until_turned_off() -> None:
    node = cluster()
    node.core.renew_lease(0.05, 0.4)
    node.run(0.05)
    assert set(lease_pings(node, 0.05)) == set("bcde")
    node.run(0.45)
    assert set(lease_pings(node, 0.45)) == set("bcde")
    node.core.renew_lease(0.5, None)
    node.run(3.0)
    rounds = {when for when, _, _ in node.find(Ping, 0.5)}
    assert all(len(lease_pings(node, when)) <= 1 for when in rounds)  # probes only


def test_acked_at_keeps_the_send_time_of_the_latest_directly_answered_ping() -> None:
    node = cluster()
    node.core.renew_lease(0.05, 0.4)
    node.run(0.05)
    pings = lease_pings(node, 0.05)
    node.send(0.3, addr_for("b"), Ack(pings["b"].seq))
    node.send(0.3, STRANGER, Ack(pings["c"].seq))  # not from c: proves nothing about c
    assert node.core.acked_at() == {"b": 0.05}
    node.run(0.45)
    later = lease_pings(node, 0.45)
    node.send(0.5, addr_for("b"), Ack(later["b"].seq))
    node.send(0.6, addr_for("d"), Ack(pings["d"].seq))  # late answer to the older round
    assert node.core.acked_at() == {"b": 0.45, "d": 0.05}


def test_a_direct_probe_ack_counts_for_the_lease_an_indirect_one_does_not() -> None:
    node = cluster()
    t0, ping = node.run_until_ping()
    node.send(t0 + 0.1, addr_for(ping.target), Ack(ping.seq))
    assert node.core.acked_at() == {ping.target: t0}
    t1, ping = node.run_until_ping(limit=t0 + 5.0)
    node.run(t1 + LAN.probe_timeout)
    _, relay, _ = node.find(PingReq, t1)[0]
    node.send(t1 + 0.7, relay, Ack(ping.seq))  # through a relay: the target did not hear us
    assert node.core.acked_at().get(ping.target) != t1


def test_indirect_ack_prevents_suspicion() -> None:
    node = cluster()
    t0, ping = node.run_until_ping()
    node.run(t0 + LAN.probe_timeout)
    _, relay, _ = node.find(PingReq)[0]
    node.send(t0 + 0.7, relay, Ack(ping.seq))
    node.run(t0 + 3 * LAN.probe_interval)
    assert node.status(ping.target) is Status.ALIVE
    assert node.events(EventKind.SUSPECT, ping.target) == []


def first_fallback(node: Node) -> tuple[float, Ping, int]:
    t0, ping = node.run_until_ping()
    node.run(t0 + LAN.probe_timeout)
    [(_, stream, msg)] = node.streams()
    assert msg == Ping(ping.seq, ping.target, "a")
    return t0, ping, stream.token


def test_tcp_fallback_ack_prevents_suspicion() -> None:
    node = cluster()
    t0, ping, token = first_fallback(node)
    node.result(t0 + 0.7, token, Ack(ping.seq))
    node.run(t0 + LAN.probe_interval)
    assert node.events(EventKind.SUSPECT) == []
    assert node.status(ping.target) is Status.ALIVE
    assert node.core.stats.tcp_fallback_acks == 1


def test_tcp_fallback_ack_for_another_seq_does_not_count() -> None:
    node = cluster()
    t0, ping, token = first_fallback(node)
    node.result(t0 + 0.7, token, Ack(ping.seq ^ 1))
    node.run(t0 + LAN.probe_interval)
    assert [e.member.name for e in node.events(EventKind.SUSPECT)] == [ping.target]
    assert node.core.stats.tcp_fallback_acks == 0


def test_refused_fallback_declares_the_target_dead_at_the_end_of_the_probe() -> None:
    node = cluster()
    t0, ping, token = first_fallback(node)
    node.result(t0 + 0.6, token, None, "refused")
    assert node.events(EventKind.DEAD) == []  # the relays still get their chance
    node.run(t0 + LAN.probe_interval)
    [event] = node.events(EventKind.DEAD)
    assert (event.member.name, event.at) == (ping.target, t0 + LAN.probe_interval)
    assert node.status(ping.target) is Status.DEAD
    assert node.core.stats.deaths_by_refusal == 1
    assert node.events(EventKind.SUSPECT) == []
    # The verdict is gossiped with its evidence.
    since = t0 + LAN.probe_interval
    node.run(since + 1.0)
    assert any(m == Dead(ping.target, 0, "a", True) for _, _, m in node.find(Dead, since=since))


def test_a_refusal_does_not_kill_a_member_a_relay_reached() -> None:
    """A firewall rejecting only us (TCP reset) while the target is fine: the indirect ack
    wins over the refusal."""
    node = cluster()
    t0, ping, token = first_fallback(node)
    node.result(t0 + 0.55, token, None, "refused")
    node.send(t0 + 0.6, C, Ack(ping.seq))  # forwarded by a relay
    node.run(t0 + LAN.probe_interval + 0.1)
    assert node.events(EventKind.DEAD, ping.target) == []
    assert node.events(EventKind.SUSPECT, ping.target) == []
    assert node.core.stats.deaths_by_refusal == 0


def test_refused_fallback_is_only_a_failed_probe_when_not_fatal() -> None:
    node = cluster(tune=tuning(refused_is_dead=False))
    t0, ping, token = first_fallback(node)
    node.result(t0 + 0.6, token, None, "refused")
    assert node.events(EventKind.DEAD) == []
    node.run(t0 + LAN.probe_interval)
    assert [e.member.name for e in node.events(EventKind.SUSPECT)] == [ping.target]
    assert node.core.stats.deaths_by_refusal == 0


@pytest.mark.parametrize("failure", ["timeout", "error"])
def test_other_fallback_failures_are_not_fatal(failure: str) -> None:
    node = cluster()
    t0, ping, token = first_fallback(node)
    node.result(t0 + 0.6, token, None, failure)  # type: ignore[arg-type]
    assert node.events(EventKind.DEAD) == []
    node.run(t0 + LAN.probe_interval)
    assert [e.member.name for e in node.events(EventKind.SUSPECT)] == [ping.target]


def test_fallback_disabled_sends_no_stream() -> None:
    node = cluster(tune=tuning(tcp_fallback_probe=False))
    t0, _ = node.run_until_ping()
    node.run(t0 + LAN.probe_interval)
    assert node.streams() == []
    assert len(node.find(PingReq)) == 3


def test_stream_result_for_an_unknown_token_is_ignored() -> None:
    node = cluster()
    node.result(0.5, 12345, Ack(1))
    node.result(0.5, 12346, None, "refused")
    assert node.core.stats.tcp_fallback_acks == 0
    assert node.events(EventKind.DEAD) == []


def test_probe_round_robin_visits_every_member_once_per_pass() -> None:
    names = [f"n{i}" for i in range(6)]
    node = cluster(names, answering=True)
    pings = []
    while len(pings) < 3 * len(names):
        _, ping = node.run_until_ping(limit=100.0)
        pings.append(ping.target)
    for i in range(3):
        assert sorted(pings[i * 6 : (i + 1) * 6]) == sorted(names)


# ---------------------------------------------------------------------------- awareness


def test_missed_nacks_raise_awareness() -> None:
    node = cluster()
    t0, ping = node.run_until_ping()
    node.run(t0 + LAN.probe_timeout)
    relays = [dest for _, dest, _ in node.find(PingReq)]
    node.send(t0 + 0.6, relays[0], Nack(ping.seq))
    node.run(t0 + LAN.probe_interval)
    assert node.core.stats.nacks_received == 1
    assert node.core.awareness.score == 2  # three nacks expected, one came


def test_all_nacks_keep_awareness_and_still_suspect() -> None:
    node = cluster()
    t0, ping = node.run_until_ping()
    node.run(t0 + LAN.probe_timeout)
    for _, relay, _ in node.find(PingReq):
        node.send(t0 + 0.6, relay, Nack(ping.seq))
    node.run(t0 + LAN.probe_interval)
    assert node.core.awareness.score == 0
    assert [e.member.name for e in node.events(EventKind.SUSPECT)] == [ping.target]


def test_failed_probe_without_relays_raises_awareness_by_one() -> None:
    node = cluster(["b"])
    t0, _ = node.run_until_ping()
    node.run(t0 + LAN.probe_interval)
    assert node.find(PingReq) == []
    assert node.core.awareness.score == 1


def test_direct_ack_lowers_awareness() -> None:
    node = cluster(["b"])
    node.core.awareness.apply(3)
    t0, ping = node.run_until_ping()
    node.send(t0 + 0.1, B, Ack(ping.seq))
    node.run(t0 + 4 * LAN.probe_interval)  # the interval is scaled by 4 at this score
    assert node.core.awareness.score == 2


def test_late_indirect_ack_leaves_awareness_alone() -> None:
    node = cluster()
    node.core.awareness.apply(2)
    t0, ping = node.run_until_ping()
    node.run(t0 + 3 * LAN.probe_timeout)
    _, relay, _ = node.find(PingReq)[0]
    node.send(t0 + 1.6, relay, Ack(ping.seq))
    node.run(t0 + 3 * LAN.probe_interval)
    assert node.core.awareness.score == 2


def test_refuting_raises_awareness() -> None:
    node = cluster(["b"])
    node.send(0.5, B, Suspect("a", 0, "b"))
    assert node.core.awareness.score == 1


def test_probe_interval_and_timeout_scale_with_awareness() -> None:
    node = cluster(["b", "c"])
    node.core.awareness.apply(3)  # scale × 4
    t0, ping = node.run_until_ping()
    node.run(t0 + 4 * LAN.probe_timeout - EPS)
    assert node.find(PingReq) == []
    node.run(t0 + 4 * LAN.probe_timeout)
    [(_, relay, _)] = node.find(PingReq)
    [(_, stream, _)] = node.streams()
    assert stream.timeout == pytest.approx(4 * (LAN.probe_interval - LAN.probe_timeout))
    node.send(t0 + 2.5, relay, Nack(ping.seq))  # keep the score where it is
    node.run(t0 + 4 * LAN.probe_interval - EPS)
    assert node.events(EventKind.SUSPECT) == []
    assert len(node.find(Ping)) == 1
    node.run(t0 + 4 * LAN.probe_interval)
    assert [e.member.name for e in node.events(EventKind.SUSPECT)] == [ping.target]
    assert node.core.awareness.score == 3
    assert [at for at, _, _ in node.find(Ping)] == [t0, t0 + 4 * LAN.probe_interval]


# ---------------------------------------------------------------------------- buddy system


def test_probe_of_a_suspect_carries_the_suspicion() -> None:
    node = cluster(["b"], tune=tuning(accelerate_confirmations=False))
    node.send(0.01, STRANGER, Suspect("b", 0, "c"))
    assert node.find(Ping) == []  # no confirmation probe when acceleration is off
    _, ping = node.run_until_ping()
    [(_, dest, msgs)] = [s for s in node.sent() if Ping(ping.seq, "b", "a") in s[2]]
    assert dest == B
    assert msgs[:2] == [Ping(ping.seq, "b", "a"), Suspect("b", 0, "a")]


def test_suspicion_from_another_member_triggers_a_confirmation_probe() -> None:
    node = cluster(["b", "c"])
    node.send(0.01, C, Suspect("b", 0, "c"))
    [(at, dest, msgs)] = node.sent(since=0.01)
    assert (at, dest) == (0.01, B)
    assert msgs[0].__class__ is Ping
    assert Suspect("b", 0, "a") in msgs


def test_probe_of_an_alive_member_carries_no_suspicion() -> None:
    node = cluster(["b"])
    _, ping = node.run_until_ping()
    [msgs] = [s[2] for s in node.sent() if Ping(ping.seq, "b", "a") in s[2]]
    assert not any(isinstance(m, Suspect) for m in msgs)


# ---------------------------------------------------------------------------- suspicion


def suspected(at: float = 10.0, *, accuser: str = "c") -> Node:
    """Five members, all answering; ``accuser`` gossips that b is suspect at ``at``."""
    node = cluster(answering=True)
    node.run(at)
    assert node.events(EventKind.SUSPECT) == []
    node.send(at, addr_for(accuser), Suspect("b", 0, accuser))
    [event] = node.events(EventKind.SUSPECT)
    assert (event.member.name, event.at) == ("b", at)
    return node


def dead_at(node: Node, name: str = "b") -> float:
    [event] = node.events(EventKind.DEAD, name)
    return event.at


def test_suspicion_bounds_for_five_members() -> None:
    node = suspected()
    view = node.core.member("b")
    assert view is not None and view.status is Status.SUSPECT
    node.run(100.0)
    assert dead_at(node) == pytest.approx(10.0 + MAX_5)


def test_unconfirmed_suspicion_lasts_the_maximum_timeout() -> None:
    node = suspected()
    node.run(10.0 + MAX_5 - EPS)
    assert node.status("b") is Status.SUSPECT
    node.run(10.0 + MAX_5)
    assert node.status("b") is Status.DEAD
    assert dead_at(node) == pytest.approx(10.0 + MAX_5)
    assert node.core.stats.deaths == 1
    node.run(10.0 + MAX_5 + LAN.gossip_interval)
    assert Dead("b", 0, "a") in [m for _, _, m in node.find(Dead)]


def test_one_confirmation_shrinks_the_timeout() -> None:
    node = suspected()
    node.send(11.0, D, Suspect("b", 0, "d"))
    node.run(100.0)
    assert dead_at(node) == pytest.approx(10.0 + ONE_CONFIRMATION_5)


def test_k_confirmations_bring_the_timeout_down_to_the_minimum() -> None:
    node = suspected()
    # Both within the minimum, at least a probe interval before it ends (see the next test).
    node.send(10.5, D, Suspect("b", 0, "d"))
    node.send(10.0 + MIN_5 - LAN.probe_interval, E, Suspect("b", 0, "e"))
    node.run(100.0)
    assert dead_at(node) == pytest.approx(10.0 + MIN_5)


def test_a_late_confirmation_still_leaves_one_probe_interval_to_refute() -> None:
    # The second confirmation arrives after the minimum elapsed: Lifeguard's formula puts the
    # deadline in the past, but the accused still gets one probe interval to refute.
    node = suspected()
    node.send(11.0, D, Suspect("b", 0, "d"))
    node.send(15.0, E, Suspect("b", 0, "e"))
    node.run(15.5)
    assert node.events(EventKind.DEAD, "b") == []
    node.run(20.0)
    assert dead_at(node) == pytest.approx(15.0 + LAN.probe_interval)


def test_a_refutation_within_the_grace_after_a_late_confirmation_saves_the_member() -> None:
    node = suspected()
    node.send(11.0, D, Suspect("b", 0, "d"))
    node.send(15.0, E, Suspect("b", 0, "e"))
    node.send(15.5, B, Alive("b", 1, B, {}))
    node.run(30.0)
    assert node.events(EventKind.DEAD, "b") == []
    view = node.core.member("b")
    assert view is not None and view.status is Status.ALIVE


def test_duplicate_confirmations_do_not_count() -> None:
    node = suspected()
    node.send(11.0, D, Suspect("b", 0, "d"))
    node.send(12.0, D, Suspect("b", 0, "d"))  # the same bytes again
    assert node.core.stats.duplicates == 1
    node.send(12.5, D, Suspect("b", 1, "d"))  # the same confirmer, other bytes
    node.send(13.0, C, Suspect("b", 1, "c"))  # the accuser itself
    node.stream(13.5, C, PushPull(False, "d", (state("b", Status.SUSPECT),)))
    node.run(100.0)
    assert dead_at(node) == pytest.approx(10.0 + ONE_CONFIRMATION_5)


def test_new_confirmations_are_gossiped_duplicates_are_not() -> None:
    node = suspected()
    node.send(11.0, D, Suspect("b", 0, "d"))
    node.run(11.5)
    assert Suspect("b", 0, "d") in [m for _, _, m in node.find(Suspect, since=11.0)]
    node.run(20.0)
    node.send(20.0, C, Suspect("b", 1, "c"))
    node.run(21.0)
    assert node.find(Suspect, since=20.0) == []


def test_own_failed_probe_is_an_independent_confirmation() -> None:
    node = suspected()
    node.answering.discard("b")
    # The accelerated probe went out with the suspicion; b stays silent from now on.
    node.run(10.0 + LAN.probe_interval)
    node.run(100.0)
    assert dead_at(node) == pytest.approx(10.0 + ONE_CONFIRMATION_5)


def test_accusers_own_repeated_failures_are_not_confirmations() -> None:
    node = cluster(answering=True)
    node.answering.discard("b")
    node.run(60.0)
    [suspect] = node.events(EventKind.SUSPECT, "b")
    # a kept probing b (and failing) while b was suspect...
    assert len([p for at, _, p in node.find(Ping) if p.target == "b" and at > suspect.at]) >= 2
    # ...but its own accusation never shortened its own timeout.
    assert dead_at(node) == pytest.approx(suspect.at + MAX_5)


def test_small_cluster_suspicion_uses_the_minimum_timeout() -> None:
    node = cluster(["b", "c"], answering=True)  # n = 3 < k + 2: no confirmations expected
    node.send(5.0, C, Suspect("b", 0, "c"))
    node.run(50.0)
    assert dead_at(node) == pytest.approx(5.0 + MEMBERLIST_MIN_5)


def test_suspect_with_an_old_incarnation_is_ignored() -> None:
    node = cluster(answering=True)
    node.send(1.0, B, Alive("b", 3, B, {}))
    node.send(2.0, C, Suspect("b", 2, "c"))
    assert node.status("b") is Status.ALIVE
    assert node.events(EventKind.SUSPECT) == []


# ---------------------------------------------------------------------------- refutation


def test_suspect_refutes_and_the_refutation_clears_the_suspicion() -> None:
    a = cluster(["b", "c"], answering=False)
    b = Node(make_core("b"))
    b.learn(0.0, ["a", "c"])
    # c accuses b; a probes b at once, telling b about the suspicion (buddy system).
    a.send(1.0, C, Suspect("b", 0, "c"))
    [buddy] = [out for at, out in a.log if isinstance(out, SendPacket) and out.addr == B]
    b.deliver(1.0, ADDR_A, buddy.data)
    assert b.core.incarnation == 1
    assert b.core.stats.refutations == 1
    [(_, dest, msgs)] = b.sent(since=1.0)
    assert dest == ADDR_A
    assert isinstance(msgs[0], Ack)
    a.deliver(1.0, B, build(*msgs))
    assert a.status("b") is Status.SUSPECT
    # The refutation rides b's next gossip round.
    b.run(1.0 + LAN.gossip_interval)
    [(at, msgs)] = [(at, m) for at, dest, m in b.sent(since=1.0 + EPS) if dest == ADDR_A]
    assert at <= 1.0 + LAN.gossip_interval
    assert Alive("b", 1, B, {}) in msgs
    a.deliver(at, B, build(*msgs))
    [event] = a.events(EventKind.ALIVE)
    assert event.member.name == "b"
    assert event.member.incarnation == 1
    assert a.status("b") is Status.ALIVE
    a.answering = {"b", "c"}
    a.run(60.0)
    assert a.events(EventKind.DEAD) == []


def test_alive_with_the_same_incarnation_does_not_clear_a_suspicion() -> None:
    node = suspected()
    node.send(11.0, B, Alive("b", 0, B, {}))
    assert node.status("b") is Status.SUSPECT
    assert node.events(EventKind.ALIVE) == []


def test_accusations_about_self_are_refuted() -> None:
    node = cluster(["b"])
    node.send(1.0, B, Suspect("a", 0, "b"))
    assert node.core.incarnation == 1
    node.send(2.0, B, Dead("a", 1, "b"))
    assert node.core.incarnation == 2
    node.send(3.0, B, Left("a", 2))
    assert node.core.incarnation == 3
    assert node.core.stats.refutations == 3
    view = node.core.member("a")
    assert view is not None and view.status is Status.ALIVE
    node.run(3.5)
    assert Alive("a", 3, ADDR_A, {}) in [m for _, _, m in node.find(Alive, since=3.0)]


def test_accusation_with_a_higher_incarnation_is_outbid() -> None:
    node = cluster(["b"])
    node.send(1.0, B, Dead("a", 41, "b"))
    assert node.core.incarnation == 42


def test_an_accusation_at_the_bound_is_refused_and_every_accepted_one_can_be_outbid() -> None:
    top = wire.MAX_INCARNATION
    # The largest accusation the wire accepts is outbid, and the answer still encodes.
    node = cluster(["b"])
    node.send(1.0, B, Dead("a", top - 1, "b"))
    assert node.core.incarnation == top
    decoded = wire.decode(wire.encode(Alive("a", top, ADDR_A, {})))
    assert isinstance(decoded, Alive) and decoded.incarnation == top
    # Above it: refused on the wire (one sealed packet must not isolate a node for good).
    for accusation in (
        Suspect("a", top, "b"),
        Dead("a", 2**64 - 1, "b", False),
        Left("a", top),
    ):
        with pytest.raises(WireError):
            wire.decode(wire.encode(accusation))
    with pytest.raises(WireError):
        wire.decode(wire.encode(Alive("a", top + 1, ADDR_A, {})))
    fresh = cluster(["b"])
    before = sum(fresh.core.stats.rejected.values())
    fresh.send(1.0, B, Suspect("a", 2**64 - 1, "b"))
    assert fresh.core.incarnation == 0
    assert sum(fresh.core.stats.rejected.values()) > before
    # Tags changed at the bound stay at the bound.
    node.core.set_tags(2.0, {"t": "1"})
    assert node.core.incarnation == top


def test_stale_accusations_about_self_are_ignored() -> None:
    node = cluster(["b"])
    node.send(1.0, B, Suspect("a", 0, "b"))
    node.send(2.0, B, Suspect("a", 0, "c"), Dead("a", 0, "b"), Left("a", 0))
    assert node.core.incarnation == 1
    assert node.core.stats.refutations == 1


def test_alive_about_self_with_higher_incarnation_is_refuted() -> None:
    node = cluster(["b"])
    node.send(1.0, B, Alive("a", 5, ADDR_A, {}))
    assert node.core.incarnation == 6
    node.send(2.0, B, Alive("a", 6, ADDR_A, {}))  # our own announcement echoed back
    node.send(2.0, B, Alive("a", 3, ("10.9.9.9", 1), {}))  # older: ignored
    assert node.core.incarnation == 6
    node.send(3.0, B, Alive("a", 6, ("10.9.9.9", 1), {}))  # same incarnation, other address
    assert node.core.incarnation == 7
    node.send(4.0, B, Alive("a", 7, ADDR_A, {"role": "x"}))  # same incarnation, other tags
    assert node.core.incarnation == 8
    view = node.core.member("a")
    assert view is not None and (view.addr, view.tags) == (ADDR_A, {})


def test_no_refutation_while_leaving() -> None:
    node = cluster(["b", "c", "d"])
    node.leave(1.0)
    node.send(1.1, B, Suspect("a", 0, "b"), Dead("a", 0, "b"), Alive("a", 4, ADDR_A, {}))
    assert node.core.incarnation == 0
    assert node.core.stats.refutations == 0
    node.run(5.0)
    assert node.core.leave_done()
    assert [m for _, _, m in node.find(Alive, since=1.0) if m.node == "a"] == []


# ---------------------------------------------------------------------------- dead, left


def test_dead_is_final_for_its_incarnation() -> None:
    node = cluster(["b"])
    node.send(1.0, STRANGER, Dead("b", 3, "c", True))
    [event] = node.events(EventKind.DEAD)
    assert (event.member.name, event.member.incarnation) == ("b", 3)
    assert node.core.alive_count == 1
    node.send(2.0, B, Alive("b", 3, B, {}), Alive("b", 2, B, {}), Suspect("b", 3, "c"))
    node.send(2.0, B, Dead("b", 4, "c", True))
    assert node.status("b") is Status.DEAD
    assert len(node.events()) == 2  # the JOIN at start and the DEAD
    node.send(3.0, B, Alive("b", 5, B, {}))
    [join] = node.events(EventKind.JOIN, "b")[1:]
    assert (join.at, join.member.incarnation, join.member.status) == (3.0, 5, Status.ALIVE)
    assert node.core.alive_count == 2


def test_left_is_distinct_from_dead() -> None:
    node = cluster(["b", "c"])
    node.send(1.0, B, Left("b", 0))
    [event] = node.events(EventKind.LEAVE)
    assert event.member.name == "b"
    assert node.status("b") is Status.LEFT
    assert node.events(EventKind.DEAD) == []
    assert node.core.stats.deaths == 0
    assert node.core.alive_count == 2
    # Final for the incarnation: neither alive nor dead at it changes anything.
    node.send(2.0, B, Alive("b", 0, B, {}), Dead("b", 0, "c", True), Suspect("b", 0, "c"))
    assert node.status("b") is Status.LEFT
    assert len(node.events(name="b")) == 2
    node.send(3.0, B, Alive("b", 1, B, {}))
    assert [e.kind for e in node.events(name="b")] == [
        EventKind.JOIN,
        EventKind.LEAVE,
        EventKind.JOIN,
    ]


def test_leave_that_overtook_the_verdict_records_the_graceful_reason() -> None:
    node = cluster(["b"])
    node.send(1.0, STRANGER, Dead("b", 0, "c", True))
    node.send(2.0, B, Left("b", 0))
    assert node.status("b") is Status.LEFT
    assert [e.kind for e in node.events(name="b")] == [
        EventKind.JOIN,
        EventKind.DEAD,
        EventKind.LEAVE,
    ]
    node.send(3.0, B, Left("b", 1))
    assert len(node.events(name="b")) == 3


def test_left_of_an_unknown_member_is_ignored() -> None:
    node = cluster(["b"])
    node.send(1.0, STRANGER, Left("zed", 0), Dead("zed", 0, "b"), Suspect("zed", 0, "b"))
    assert node.core.member("zed") is None
    assert node.events(name="zed") == []


# ---------------------------------------------------------------------------- addresses, tags


def test_address_conflict_with_a_live_member_is_rejected() -> None:
    node = cluster(["b"])
    node.send(1.0, STRANGER, Alive("b", 1, ("10.9.9.9", 7946), {}))
    view = node.core.member("b")
    assert view is not None and (view.addr, view.incarnation) == (B, 0)
    assert node.core.stats.conflicts == 1
    assert node.core.stats.rejected == {"address_conflict": 1}
    node.send(2.0, STRANGER, Suspect("b", 0, "c"))
    node.send(2.0, STRANGER, Alive("b", 2, ("10.9.9.8", 7946), {}))
    assert node.status("b") is Status.SUSPECT
    assert node.core.stats.conflicts == 2


@pytest.mark.parametrize("end", ["dead", "left"])
def test_dead_or_left_member_may_come_back_at_a_new_address(end: str) -> None:
    node = cluster(["b"])
    node.send(1.0, STRANGER, Dead("b", 0, "c", True) if end == "dead" else Left("b", 0))
    new = ("10.9.9.9", 7946)
    node.send(2.0, new, Alive("b", 0, new, {}))
    view = node.core.member("b")
    assert view is not None and (view.status, view.addr) == (Status.ALIVE, new)
    [_, join] = node.events(EventKind.JOIN, "b")
    assert join.member.addr == new
    assert node.core.stats.conflicts == 0


def test_announcement_rejected_as_a_conflict_counts_once_the_old_entry_is_gone() -> None:
    """A member restarted at a new address while its old entry still looked alive: once the
    old entry is declared dead, the very same announcement must be accepted."""
    node = cluster(["b"])
    new = ("10.9.9.9", 7946)
    announcement = build(Alive("b", 1, new, {}))
    node.deliver(1.0, new, announcement)
    assert node.core.stats.conflicts == 1
    node.send(2.0, STRANGER, Dead("b", 0, "c", True))
    node.deliver(3.0, new, announcement)
    view = node.core.member("b")
    assert view is not None and (view.status, view.addr, view.incarnation) == (
        Status.ALIVE,
        new,
        1,
    )


def test_set_tags_bumps_the_incarnation_and_emits_update() -> None:
    node = cluster(["b"])
    node.set_tags(1.0, {"role": "db"})
    assert node.core.incarnation == 1
    [event] = node.events(EventKind.UPDATE)
    assert (event.member.name, event.member.tags, event.at) == ("a", {"role": "db"}, 1.0)
    node.run(1.5)
    assert Alive("a", 1, ADDR_A, {"role": "db"}) in [m for _, _, m in node.find(Alive)]
    node.set_tags(2.0, {"role": "db"})  # unchanged: nothing happens
    assert node.core.incarnation == 1
    assert len(node.events(EventKind.UPDATE)) == 1


def test_remote_tag_change_emits_update() -> None:
    node = cluster(["b"])
    node.send(1.0, B, Alive("b", 1, B, {"zone": "z1"}))
    [event] = node.events(EventKind.UPDATE)
    assert (event.member.name, event.member.tags) == ("b", {"zone": "z1"})
    node.send(2.0, B, Alive("b", 2, B, {"zone": "z1"}))  # same tags: no event
    assert len(node.events(EventKind.UPDATE)) == 1


# ---------------------------------------------------------------------------- join


SEED1, SEED2 = addr_for("s1"), addr_for("s2")


def joining(**kwargs: object) -> Node:
    return Node(make_core(seeds=[SEED1, SEED2, ADDR_A, SEED1], **kwargs))  # type: ignore[arg-type]


def test_start_with_seeds_sends_join_push_pulls() -> None:
    node = joining()
    assert not node.core.joined
    reqs = node.push_pulls()
    assert sorted(req.addr for _, req, _ in reqs) == sorted([SEED1, SEED2])
    for at, req, msg in reqs:
        assert at == 0.0
        assert req.timeout == LAN.tcp_timeout
        assert msg == PushPull(True, "a", (state("a", Status.ALIVE),))
    assert node.core.stats.join_attempts == 1


def test_two_cores_join_gossip_and_leave() -> None:
    a = Node(make_core())
    b = Node(make_core("b", seeds=[ADDR_A]))
    [(_, req, _)] = b.push_pulls(join=True)
    # a serves b's join over "TCP"; the reply goes back to b as the stream's result.
    reply = a.core.handle_stream(0.1, B, req.data)
    a.collect(0.1)
    assert reply is not None
    b.result(0.1, req.token, reply)
    assert b.core.joined
    assert a.status("b") is Status.ALIVE and b.status("a") is Status.ALIVE
    assert [e.member.name for e in a.events(EventKind.JOIN)] == ["b"]
    assert [e.member.name for e in b.events(EventKind.JOIN)] == ["a"]
    # b leaves; its first gossip packet carries the news to a.
    b.leave(1.0)
    [(_, dest, msgs)] = b.sent(since=1.0)
    assert dest == ADDR_A
    assert Left("b", 0) in msgs
    a.deliver(1.0, B, build(*msgs))
    assert a.status("b") is Status.LEFT
    assert [e.member.name for e in a.events(EventKind.LEAVE)] == ["b"]


def test_start_without_seeds_is_joined_at_once() -> None:
    node = Node(make_core())
    assert node.core.joined
    assert node.streams() == []


def test_successful_join_merges_and_sets_joined() -> None:
    node = joining()
    (_, first, _), (_, second, _) = node.push_pulls()
    reply = PushPull(False, "s1", (state("s1", Status.ALIVE), state("b", Status.ALIVE)))
    node.result(0.1, first.token, reply)
    node.answering = {"s1", "b"}
    assert node.core.joined
    assert {e.member.name for e in node.events(EventKind.JOIN)} == {"s1", "b"}
    # The other seed failing later changes nothing: no retry.
    node.result(0.2, second.token, None, "timeout")
    node.run(120.0)
    assert [r for r in node.push_pulls(since=0.05, join=True) if r[1].addr in (SEED1, SEED2)] == []


def test_one_failed_seed_waits_for_the_others() -> None:
    node = joining()
    (_, first, _), (_, second, _) = node.push_pulls()
    node.result(0.1, first.token, None, "refused")
    node.run(5.0)
    assert node.push_pulls(since=0.05) == []
    node.result(5.0, second.token, PushPull(False, "s2", (state("s2", Status.ALIVE),)))
    assert node.core.joined


def test_all_join_failures_retry_with_exponential_backoff() -> None:
    node = joining(tune=tuning(reconnect_interval=1000.0, push_pull_interval=1000.0))
    attempts = [0.0]
    for _ in range(8):
        reqs = node.push_pulls(since=attempts[-1], join=True)
        assert len(reqs) == 2
        at = reqs[0][0]
        assert at == attempts[-1]
        for _, req, _ in reqs:
            node.result(at, req.token, None, "refused")
        # The retry is the next thing the core waits for (besides its periodic timers).
        before = len(node.push_pulls(join=True))
        while len(node.push_pulls(join=True)) == before:
            node.step()
        attempts.append(node.now)
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    for i, gap in enumerate(gaps):
        cap = min(LAN.join_retry_max, LAN.join_retry_min * 1.5**i)
        assert cap / 2 <= gap <= cap, (i, gap)
    assert node.core.stats.join_attempts == 9
    assert not node.core.joined


def test_malformed_join_reply_counts_as_a_failure() -> None:
    node = joining()
    for _, req, _ in node.push_pulls():
        node.result(0.1, req.token, b"\xff\x00")
    assert node.core.stats.rejected == {"malformed_stream_reply": 2}
    assert not node.core.joined
    while len(node.push_pulls(join=True)) == 2:
        node.step()
    assert 0.1 + LAN.join_retry_min / 2 <= node.now <= 0.1 + LAN.join_retry_min


def test_join_reply_of_the_wrong_kind_counts_as_a_failure() -> None:
    node = joining()
    for _, req, _ in node.push_pulls():
        node.result(0.1, req.token, Ack(1))
    assert not node.core.joined
    node.run(1.1)
    assert len(node.push_pulls(join=True)) == 4


# ---------------------------------------------------------------------------- push-pull


def test_push_pull_merge_rules() -> None:
    node = cluster(["b", "c"])
    remote = PushPull(
        False,
        "s",
        (
            state("b", Status.DEAD),  # known: downgraded to suspect
            state("c", Status.LEFT),  # known: left
            state("d", Status.LEFT),  # unknown and left: not learned
            state("e", Status.DEAD),  # unknown and dead: not learned
            state("f", Status.SUSPECT),  # unknown and suspect: not learned
            state("g", Status.ALIVE),  # unknown and alive: learned
        ),
    )
    reply = node.stream(1.0, STRANGER, remote)
    assert node.status("b") is Status.SUSPECT
    assert node.status("c") is Status.LEFT
    for name in "def":
        assert node.core.member(name) is None
    assert node.status("g") is Status.ALIVE
    assert node.events(EventKind.DEAD) == []
    assert [e.member.name for e in node.events(EventKind.SUSPECT)] == ["b"]
    assert [e.member.name for e in node.events(EventKind.LEAVE)] == ["c"]
    # The reply carries the state after the merge.
    assert isinstance(reply, PushPull)
    assert (reply.join, reply.sender) == (False, "a")
    assert {m.name: m.status for m in reply.members} == {
        "a": Status.ALIVE,
        "b": Status.SUSPECT,
        "c": Status.LEFT,
        "g": Status.ALIVE,
    }
    assert node.core.stats.push_pulls == 1


def test_push_pull_dead_verdict_is_not_taken_on_trust() -> None:
    node = cluster(answering=True)
    node.stream(1.0, STRANGER, PushPull(False, "s", (state("b", Status.DEAD),)))
    assert node.status("b") is Status.SUSPECT
    node.run(1.0 + MAX_5 - EPS)
    assert node.status("b") is Status.SUSPECT  # the remote's verdict is not a confirmation


def test_push_pull_about_self_refutes_before_replying() -> None:
    node = cluster(["b"])
    reply = node.stream(1.0, B, PushPull(False, "b", (state("a", Status.DEAD, 4),)))
    assert node.core.incarnation == 5
    assert isinstance(reply, PushPull)
    [me] = [m for m in reply.members if m.name == "a"]
    assert (me.status, me.incarnation) == (Status.ALIVE, 5)


def test_push_pull_newer_alive_wins() -> None:
    node = cluster(["b"])
    newer = MemberState("b", B, 3, Status.ALIVE, {"k": "v"})
    node.stream(1.0, B, PushPull(False, "b", (newer,)))
    view = node.core.member("b")
    assert view is not None and (view.incarnation, view.tags) == (3, {"k": "v"})


def test_periodic_push_pull_goes_to_an_alive_member_and_merges_the_reply() -> None:
    node = cluster(["b"], answering=True)
    node.run(LAN.push_pull_interval * 1.5)
    reqs = node.push_pulls(join=False)
    assert reqs
    _, req, msg = reqs[0]
    assert req.addr == B
    assert msg.sender == "a"
    node.result(node.now, req.token, PushPull(False, "b", (state("h", Status.ALIVE),)))
    assert node.status("h") is Status.ALIVE


def test_malformed_and_unexpected_stream_requests_are_rejected() -> None:
    node = cluster(["b"])
    assert node.core.handle_stream(1.0, B, b"\x00garbage") is None
    assert node.stream(1.0, B, alive("z")) is None
    assert node.core.stats.rejected == {
        "malformed_stream": 1,
        "unexpected_stream_message": 1,
    }
    assert node.core.member("z") is None


# ---------------------------------------------------------------------------- leave


def test_leave_goes_out_at_once_and_finishes_after_its_transmits() -> None:
    node = cluster(["b", "c", "d"], answering=True)
    node.run(5.0)
    limit = retransmit_limit(LAN.retransmit_mult, 4)
    node.leave(5.0)
    view = node.core.member("a")
    assert view is not None and view.status is Status.LEFT
    first = [(at, dest) for at, dest, m in node.find(Left) if m == Left("a", 0)]
    assert len(first) == LAN.gossip_nodes
    assert {at for at, _ in first} == {5.0}
    assert {dest for _, dest in first} == {B, C, D}
    assert not node.core.leave_done()
    while not node.core.leave_done():
        node.step()
    assert node.now <= 5.0 + LAN.gossip_interval
    assert len(node.find(Left)) == limit
    # A leaving node no longer probes, pushes or reconnects.
    node.run(100.0)
    assert node.find(Ping, since=5.0) == []
    assert node.streams(since=5.0) == []


def test_leave_alone_is_done_at_once() -> None:
    node = Node(make_core())
    node.leave(1.0)
    assert node.core.leave_done()


def test_leaving_node_still_answers_pings() -> None:
    node = cluster(["b"])
    node.leave(1.0)
    node.send(1.1, B, Ping(3, "a", "b"))
    assert Ack(3) in [m for _, _, m in node.find(Ack)]


# ---------------------------------------------------------------------------- reconnect


def test_reconnect_tries_a_dead_members_address_with_a_push_pull() -> None:
    node = cluster(["b"], tune=tuning(push_pull_interval=1000.0))
    node.send(1.0, STRANGER, Dead("b", 0, "c", True))
    node.run(1.5 * LAN.reconnect_interval)
    reqs = node.push_pulls(join=True)
    assert reqs, "no reconnect attempt"
    _, req, msg = reqs[0]
    assert req.addr == B
    assert msg.sender == "a"
    assert node.core.stats.reconnect_attempts >= 1
    # The far side answers: both sides of the healed partition merge.
    node.result(node.now, req.token, PushPull(False, "b", (state("b", Status.ALIVE, 1),)))
    assert node.status("b") is Status.ALIVE
    assert node.events(EventKind.JOIN, "b")[-1].member.incarnation == 1


def test_dead_members_are_forgotten_after_the_reconnect_timeout() -> None:
    tune = tuning(reconnect_interval=10.0, reconnect_timeout=40.0, push_pull_interval=1000.0)
    node = cluster(["b"], tune=tune)
    node.send(1.0, STRANGER, Dead("b", 0, "c", True))
    node.run(60.0)
    assert node.core.member("b") is None
    assert node.push_pulls(since=41.0 + 15.0) == []


# ---------------------------------------------------------------------------- reaping


def reference(node: Node) -> frozenset[str]:
    return reference_members(node.core.members())


def test_a_dead_member_is_reaped_after_the_reconnect_timeout_with_one_event() -> None:
    tune = tuning(reconnect_interval=10.0, reconnect_timeout=40.0, push_pull_interval=1000.0)
    node = cluster(["b", "c"], tune=tune, answering=True)
    node.send(1.0, STRANGER, Dead("b", 0, "c", True))
    node.run(41.0)
    # Dead for the whole reconnect timeout: still known, still counted in majorities.
    assert node.status("b") is Status.DEAD
    assert reference(node) == {"a", "b", "c"}
    assert node.events(EventKind.REAP) == []
    node.run(60.0)  # at least one reconnect round (every 7.5 to 12.5 s) reaps it
    [reap] = node.events(EventKind.REAP)
    assert (reap.member.name, reap.member.status, reap.member.status_since) == (
        "b",
        Status.DEAD,
        1.0,
    )
    assert reap.at - reap.member.status_since > tune.reconnect_timeout
    assert node.core.member("b") is None
    assert reference(node) == {"a", "c"}
    assert node.core.stats.reaped == 1
    node.run(200.0)
    assert len(node.events(EventKind.REAP)) == 1


def test_a_left_member_is_reaped_after_left_reclaim() -> None:
    tune = tuning(reconnect_interval=10.0, left_reclaim=30.0, push_pull_interval=1000.0)
    node = cluster(["b", "c"], tune=tune, answering=True)
    node.send(1.0, B, Left("b", 0))
    assert reference(node) == {"a", "c"}
    node.run(100.0)
    [reap] = node.events(EventKind.REAP)
    assert (reap.member.name, reap.member.status) == ("b", Status.LEFT)
    assert node.core.member("b") is None
    assert node.core.stats.reaped == 1


# ---------------------------------------------------------------------------- operator removal


def test_remove_refuses_unknown_names_and_this_node() -> None:
    node = cluster(["b"])
    with pytest.raises(errors.NotFound):
        node.remove(1.0, "zed")
    with pytest.raises(errors.Invalid, match="this node"):
        node.remove(1.0, "a")
    assert node.status("a") is Status.ALIVE
    assert node.core.stats.removed == 0


@pytest.mark.parametrize("status", [Status.ALIVE, Status.SUSPECT])
def test_remove_refuses_a_member_that_is_not_dead(status: Status) -> None:
    node = cluster(["b", "c"], answering=True)
    if status is Status.SUSPECT:
        node.send(1.0, C, Suspect("b", 0, "c"))
    with pytest.raises(errors.Conflict, match="only a dead member can be removed") as info:
        node.remove(2.0, "b")
    assert info.value.detail == {"node": "b", "status": status.name.lower()}
    assert node.status("b") is status
    assert node.find(Left) == []
    assert node.events(EventKind.LEAVE) == []
    assert reference(node) == {"a", "b", "c"}
    assert node.core.stats.removed == 0


def test_removing_a_dead_member_marks_it_left_and_tells_everyone_at_once() -> None:
    node = cluster(["b", "c", "d"], answering=True)
    node.send(1.0, C, Dead("b", 2, "c", True))
    assert reference(node) == {"a", "b", "c", "d"}
    assert node.remove(5.0, "b") is True
    assert node.status("b") is Status.LEFT
    [leave] = node.events(EventKind.LEAVE)
    assert (leave.member.name, leave.member.incarnation, leave.at) == ("b", 2, 5.0)
    # Gossiped at once (not at the next round), at the incarnation it died with.
    assert Left("b", 2) in [m for at, _, m in node.find(Left) if at == 5.0]
    assert reference(node) == {"a", "c", "d"}
    assert node.core.stats.removed == 1


def test_removing_a_member_that_already_left_changes_nothing() -> None:
    node = cluster(["b", "c"], answering=True)
    node.send(1.0, B, Left("b", 0))
    log = len(node.log)
    assert node.remove(2.0, "b") is False
    assert len(node.log) == log  # no event, no packet
    node.send(3.0, C, Dead("c", 0, "b", True))
    assert node.remove(4.0, "c") is True
    assert node.remove(5.0, "c") is False  # twice is once
    assert [e.member.name for e in node.events(EventKind.LEAVE)] == ["b", "c"]
    assert node.core.stats.removed == 1


def test_a_removed_member_leaves_the_reference_of_the_other_members_too() -> None:
    a = cluster(["b", "c"], answering=True)
    c = Node(make_core("c"))
    c.learn(0.0, ["a", "b"])
    c.answering = {"a", "b"}
    for node in (a, c):
        node.send(1.0, STRANGER, Dead("b", 0, "x", True))
        assert reference(node) == {"a", "b", "c"}
    a.remove(2.0, "b")
    assert a.forward(2.0, c, since=2.0) >= 1  # c is a's only live peer: the gossip goes there
    assert c.status("b") is Status.LEFT
    assert [e.at for e in c.events(EventKind.LEAVE, "b")] == [2.0]
    assert reference(c) == reference(a) == {"a", "c"}


def test_a_member_removed_while_alive_refutes_and_comes_back() -> None:
    a = cluster(["b", "c"], answering=True)
    b = Node(make_core("b"))
    b.learn(0.0, ["a", "c"])
    b.answering = {"a", "c"}
    a.send(1.0, C, Dead("b", 0, "c", True))  # wrongly: b is only cut off from a and c
    a.remove(2.0, "b")
    assert "b" not in reference(a)
    # The partition heals; b hears that it was removed (gossip to the dead, or a push-pull).
    b.send(3.0, ADDR_A, Left("b", 0))
    assert b.core.incarnation == 1
    assert b.status("b") is Status.ALIVE
    b.run(3.5)
    assert b.forward(3.5, a, since=3.0) >= 1
    assert a.status("b") is Status.ALIVE
    assert a.events(EventKind.JOIN, "b")[-1].member.incarnation == 1
    assert reference(a) == {"a", "b", "c"}


def test_alone_node_tries_its_seeds_again() -> None:
    node = joining(tune=tuning(push_pull_interval=1000.0))
    (_, first, _), _ = node.push_pulls()
    node.result(0.1, first.token, PushPull(False, "s1", ()))
    assert node.core.joined
    assert node.core.alive_count == 1
    node.run(3 * LAN.reconnect_interval)
    later = node.push_pulls(since=1.0, join=True)
    assert {req.addr for _, req, _ in later} == {SEED1, SEED2}


# ---------------------------------------------------------------------------- gossip


def many(n: int, prefix: str = "member-with-a-long-name-") -> list[str]:
    names = [f"{prefix}{i}" for i in range(n)]
    assert len({addr_for(x) for x in names}) == n
    return names


@pytest.mark.parametrize("budget", [None, 512, 1000])
def test_packets_never_exceed_the_budget(budget: int | None) -> None:
    node = cluster(many(300), packet_budget=budget)
    limit = budget if budget is not None else LAN.udp_packet_size
    assert node.core.broadcast_backlog() > 100
    node.run(10.0)
    datagrams = node.datagrams()
    assert len(datagrams) > 20
    for out in datagrams:
        assert len(out.data) <= limit
        packet.parse(out.data)
    assert max(len(out.data) for out in datagrams) > limit - 100  # packets are filled


def test_large_budget_packets_stay_within_the_message_limit() -> None:
    node = cluster(many(700, prefix="m"), packet_budget=60_000)
    node.run(2.0)
    datagrams = node.datagrams()
    assert datagrams
    counts = []
    for out in datagrams:
        assert len(out.data) <= 60_000
        counts.append(len(packet.parse(out.data)))
    assert max(counts) == packet.MAX_MESSAGES


def test_gossip_item_is_sent_at_most_the_retransmit_limit() -> None:
    node = cluster(answering=True)
    node.run(10.0)
    assert node.core.broadcast_backlog() == 0
    node.send(10.0, STRANGER, alive("f"))
    node.answering.add("f")
    node.run(40.0)
    limit = retransmit_limit(LAN.retransmit_mult, 6)
    assert limit == 4
    assert len([m for _, _, m in node.find(Alive, since=10.0) if m.node == "f"]) == limit


@pytest.mark.parametrize("n", [5, 10, 100])
def test_retransmit_limit_follows_cluster_size(n: int) -> None:
    names = many(n - 1, prefix="n")
    node = cluster(names, answering=True)
    node.run(60.0)
    assert node.core.broadcast_backlog() == 0
    node.send(60.0, STRANGER, Suspect(names[0], 0, "x"))
    node.run(120.0)
    sent = [m for _, _, m in node.find(Suspect, since=60.0) if m.sender == "x"]
    assert len(sent) == LAN.retransmit_mult * math.ceil(math.log10(n + 1))


def test_newest_gossip_goes_first() -> None:
    node = cluster(answering=True)
    node.run(10.0)
    assert node.core.broadcast_backlog() == 0
    node.send(10.0, STRANGER, alive("f"))
    node.send(10.0, STRANGER, alive("g"))
    node.run(10.0 + LAN.gossip_interval)
    first = next(msgs for _, _, msgs in node.sent(since=10.0) if msgs)
    gossip = [m for m in first if isinstance(m, Alive)]
    assert [m.node for m in gossip[:2]] == ["g", "f"]


def test_exact_duplicate_gossip_is_skipped() -> None:
    node = cluster(["b"])
    data = build(alive("f"), Suspect("b", 0, "c"))
    node.deliver(1.0, STRANGER, data)
    events = len(node.events())
    backlog = node.core.broadcast_backlog()
    node.deliver(1.1, STRANGER, data)
    assert node.core.stats.duplicates == 2
    assert len(node.events()) == events
    assert node.core.broadcast_backlog() == backlog


def test_duplicate_within_one_packet_is_skipped() -> None:
    node = cluster(["b"])
    node.send(1.0, STRANGER, alive("f"), alive("f"))
    assert node.core.stats.duplicates == 1
    assert len(node.events(EventKind.JOIN, "f")) == 1


def test_pings_and_acks_are_never_deduplicated() -> None:
    node = Node(make_core())
    node.send(1.0, STRANGER, Ping(1, "a", "x"))
    node.send(1.1, STRANGER, Ping(1, "a", "x"))
    assert len(node.find(Ack)) == 2
    assert node.core.stats.duplicates == 0


# ---------------------------------------------------------------------------- bad input


def snapshot(node: Node) -> tuple[object, ...]:
    core = node.core
    s = core.stats
    return (
        core.members(),
        core.incarnation,
        core.broadcast_backlog(),
        core.next_deadline(),
        core.awareness.score,
        s.messages_in,
        s.duplicates,
        s.packets_out,
        len(node.log),
    )


VALID = wire.encode(alive("f"))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"\xff",
        cbor.dumps([1]),  # no messages
        cbor.dumps([2, VALID]),  # another protocol version
        cbor.dumps(["1", VALID]),
        cbor.dumps([1, [5, "f"]]),  # a message not wrapped in a byte string
        cbor.dumps({"1": VALID}),
        cbor.dumps([1, VALID]) + b"\x00",  # trailing bytes
        cbor.dumps([1, *([VALID] * 256)]),  # too many messages
        cbor.dumps([1, VALID, b"\x82\x63\x01"]),  # one broken message spoils the packet
        cbor.dumps([1, VALID, cbor.dumps([42, 1])]),  # unknown type
        cbor.dumps([1, VALID, cbor.dumps([3, -1])]),  # negative seq
        cbor.dumps([1, VALID, b"\xc1\x00"]),  # a CBOR tag
        b"\x9f\x01\xff",  # indefinite length
    ],
)
def test_malformed_packets_change_nothing(data: bytes) -> None:
    node = cluster(["b"])
    before = snapshot(node)
    node.deliver(1.0, STRANGER, data)
    assert snapshot(node) == before
    assert node.core.stats.rejected == {"malformed_packet": 1}


def test_rejected_packet_does_not_mark_its_gossip_as_seen() -> None:
    node = cluster(["b"])
    node.deliver(1.0, STRANGER, cbor.dumps([1, VALID, cbor.dumps([42])]))
    assert node.core.member("f") is None
    node.deliver(1.1, STRANGER, cbor.dumps([1, VALID]))
    assert node.status("f") is Status.ALIVE
    assert node.core.stats.duplicates == 0


def test_push_pull_over_udp_is_unexpected() -> None:
    node = cluster(["b"])
    node.send(1.0, B, PushPull(False, "b", (state("z", Status.ALIVE),)))
    assert node.core.member("z") is None
    assert node.core.stats.rejected == {"unexpected_message": 1}


def test_member_table_is_bounded() -> None:
    node = cluster(["b", "c", "d"], tune=tuning(max_members=5))
    node.send(1.0, STRANGER, alive("e"))
    node.send(1.0, STRANGER, alive("f"))
    assert node.core.member("e") is not None
    assert node.core.member("f") is None
    assert len(node.core.members()) == 5
    assert node.core.stats.rejected == {"member_table_full": 1}
    # Updates about known members still get in.
    node.send(2.0, STRANGER, Alive("e", 1, addr_for("e"), {"k": "v"}))
    view = node.core.member("e")
    assert view is not None and view.incarnation == 1


# ---------------------------------------------------------------------------- robustness rules


def test_a_verdict_without_evidence_about_an_unsuspected_member_is_checked_first() -> None:
    """A DEAD from someone else about a member we believe alive becomes a suspicion (its
    accuser may be the cut-off one); the member can still refute."""
    node = cluster(["b", "c", "d"])
    node.send(1.0, C, Dead("b", 0, "c"))
    assert node.status("b") is Status.SUSPECT
    assert node.core.stats.dead_downgraded == 1
    assert node.events(EventKind.DEAD) == []
    node.send(2.0, B, Alive("b", 1, B, {}))
    assert node.status("b") is Status.ALIVE


def test_a_verdict_with_refusal_evidence_is_accepted_at_once() -> None:
    node = cluster(["b", "c", "d"])
    node.send(1.0, C, Dead("b", 0, "c", True))
    assert node.status("b") is Status.DEAD
    assert node.core.stats.dead_downgraded == 0


def test_a_verdict_about_a_suspect_is_accepted() -> None:
    node = cluster(["b", "c", "d"])
    node.send(1.0, C, Suspect("b", 0, "c"))
    node.send(2.0, D, Dead("b", 0, "d"))
    assert node.status("b") is Status.DEAD


def test_a_stale_accusation_re_announces_our_refutation() -> None:
    node = cluster(["b", "c"])
    node.send(1.0, B, Suspect("a", 0, "b"))
    assert node.core.incarnation == 1
    node.run(30.0)  # the refutation used up its transmits
    assert node.core.stats.reannouncements == 0
    node.send(31.0, C, Suspect("a", 0, "c"))  # someone still accuses the old incarnation
    assert node.core.incarnation == 1  # no new incarnation ...
    assert node.core.stats.reannouncements == 1  # ... but the alive goes out again
    node.run(31.5)
    assert Alive("a", 1, ADDR_A, {}) in [m for _, _, m in node.find(Alive, since=31.0)]


def test_our_own_suspicions_are_slowed_by_poor_local_health() -> None:
    node = cluster(["b", "c", "d"])
    node.core.awareness.apply(3)  # we have been missing acks and nacks: score 3 → ×4
    node.core._on_suspect(1.0, Suspect("b", 0, "a"))
    node.run(200.0)
    from meshd.membership.suspicion import suspicion_bounds

    lo, _ = suspicion_bounds(
        LAN.suspicion_mult, LAN.suspicion_max_timeout_mult, 4, LAN.probe_interval
    )
    assert dead_at(node) >= 1.0 + 4 * lo
