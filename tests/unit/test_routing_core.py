"""The routing core's rules, one test each: local delivery, at-least-once repeats, calls to
other hosts and their breakers, inbound frames, health and signal fan-out. The core is driven
with explicit times; its collaborators are plain data (``routing_helpers``)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from meshd.routing import messages
from meshd.routing.breaker import BreakerState
from meshd.routing.dedup import DedupWindow
from meshd.routing.limits import MAX_PENDING_PER_AGENT
from meshd.routing.messages import Activate, Control, Deliver, DeliveryKind, Result, Signal
from meshd.routing.outcome import Err, Ok, from_result, to_result, unwrap
from meshd.wire.membership import Status
from meshd_client.protocol import errors
from tests.unit.routing_helpers import Outcomes, Rig, Sink, entry, rig, serve

REQ = DeliveryKind.REQUEST
SEND = DeliveryKind.SEND


def call(
    r: Rig,
    to: str,
    *,
    now: float = 0.0,
    kind: DeliveryKind = REQ,
    alo: bool = False,
    timeout: float = 1.0,
    msg_id: str = "m1",
    body: Any = "hi",
) -> Outcomes:
    done = Outcomes()
    found = r.directory.lookup(to)
    assert found is not None
    r.core.call(
        now,
        entry=found,
        msg_id=msg_id,
        to=to,
        body=body,
        sender="tester",
        kind=kind,
        at_least_once=alo,
        timeout=timeout,
        deadline=now + timeout,
        done=done,
    )
    return done


def error_of(done: Outcomes) -> errors.MeshError:
    outcome = done.one
    assert isinstance(outcome, Err), outcome
    return outcome.error


# ---------------------------------------------------------------------------- outcomes


def test_outcomes_cross_the_wire_with_their_kind() -> None:
    ok = from_result(to_result("x", Ok({"n": 1})))
    assert ok == Ok({"n": 1})
    err = from_result(to_result("x", Err(errors.Overloaded("busy", detail={"q": 3}))))
    assert isinstance(err, Err) and isinstance(err.error, errors.Overloaded)
    assert err.error.message == "busy" and err.error.detail == {"q": 3}
    malformed = from_result(Result("x", False, "not a map"))
    assert isinstance(malformed, Err) and isinstance(malformed.error, errors.Internal)
    with pytest.raises(errors.Overloaded):
        unwrap(err)
    assert unwrap(ok) == {"n": 1}


# ---------------------------------------------------------------------------- local delivery


def test_local_request_reaches_the_agent_and_ends_with_its_reply() -> None:
    r = rig()
    sink = serve(r, "echo")
    done = call(r, "echo", body={"x": 1})
    assert sink.events == [
        {"type": "request", "id": "m1", "from": "tester", "body": {"x": 1}, "at_least_once": False}
    ]
    assert done.got == []
    assert r.core.local.reply(0.5, "echo", "m1", Ok("pong"))
    assert done.one == Ok("pong")
    assert r.core.local.agents["echo"].pending == {}
    assert r.core.stats.local_deliveries == 1
    # The deadline was cancelled: nothing happens when it passes.
    r.core.tick(5.0)
    assert len(done.got) == 1


def test_local_send_ends_at_once_and_awaits_no_answer() -> None:
    r = rig()
    sink = serve(r, "echo")
    done = call(r, "echo", kind=SEND)
    assert done.one == Ok(None)
    assert sink.events[0]["type"] == "message"
    assert r.core.local.agents["echo"].pending == {}
    assert not r.core.local.reply(0.1, "echo", "m1", Ok(None))


def test_local_request_times_out_at_its_deadline() -> None:
    r = rig()
    serve(r, "slow")
    done = call(r, "slow", timeout=2.0)
    r.core.tick(1.999)
    assert done.got == []
    assert r.core.next_deadline() == 2.0
    r.core.tick(2.0)
    error = error_of(done)
    assert isinstance(error, errors.Timeout) and "did not answer in time" in error.message
    assert r.core.stats.timeouts == 1
    assert r.core.local.agents["slow"].pending == {}
    # A late answer finds nothing waiting.
    assert not r.core.local.reply(3.0, "slow", "m1", Ok("late"))


def test_an_agent_registered_but_not_served_is_unreachable() -> None:
    r = rig()
    r.directory.live["ghost"] = entry("ghost", "a")
    error = error_of(call(r, "ghost"))
    assert isinstance(error, errors.Unreachable) and "not served" in error.message


def test_a_leaving_daemon_delivers_nothing() -> None:
    r = rig()
    sink = serve(r, "echo")
    r.core.local.leaving = True
    error = error_of(call(r, "echo"))
    assert isinstance(error, errors.Unreachable) and error.detail == {"host": "a"}
    assert sink.events == []


def test_an_agent_whose_gate_refuses_gets_nothing_and_the_caller_gets_the_refusal() -> None:
    """Placement's keep_majority lease: a host without it delivers nothing to the agent."""
    r = rig()
    sink = serve(r, "solo")
    refusal: list[errors.MeshError] = [errors.Unreachable("no lease")]
    r.core.local.agents["solo"].gate = lambda: refusal[0] if refusal else None
    error = error_of(call(r, "solo"))
    assert isinstance(error, errors.Unreachable) and error.message == "no lease"
    assert sink.events == [] and r.core.local.agents["solo"].pending == {}
    refusal.clear()
    call(r, "solo", msg_id="m2")
    assert [e["id"] for e in sink.events] == ["m2"]


def test_too_many_waiting_deliveries_overload_an_agent() -> None:
    r = rig()
    sink = serve(r, "busy")
    for i in range(MAX_PENDING_PER_AGENT):
        call(r, "busy", msg_id=f"m{i}")
    error = error_of(call(r, "busy", msg_id="one-more"))
    assert isinstance(error, errors.Overloaded)
    assert len(sink.events) == MAX_PENDING_PER_AGENT
    assert len(r.core.local.agents["busy"].pending) == MAX_PENDING_PER_AGENT


def test_a_client_not_keeping_up_fails_the_delivery_and_leaves_nothing_waiting() -> None:
    r = rig()
    serve(r, "echo", Sink(full=True))
    error = error_of(call(r, "echo"))
    assert isinstance(error, errors.Overloaded)
    assert r.core.local.agents["echo"].pending == {}
    assert len(r.core.timers) == 0


def test_an_agent_stopping_fails_what_awaits_its_answer() -> None:
    r = rig()
    owner = object()
    serve(r, "echo", owner=owner)
    done = call(r, "echo")
    r.core.local.detach(0.1, "echo", object())  # another client's agent of that name
    assert done.got == [] and "echo" in r.core.local.agents
    r.core.local.detach(0.2, "echo", owner)
    error = error_of(done)
    assert isinstance(error, errors.Unreachable) and "stopped" in error.message
    assert "echo" not in r.core.local.agents


def test_a_send_reports_no_reply_body_even_if_its_ack_has_one() -> None:
    r = rig()
    serve(r, "echo")
    done = call(r, "echo", kind=SEND, alo=True)
    assert done.got == []
    r.core.local.reply(0.1, "echo", "m1", Ok("ack body"))
    assert done.one == Ok(None)


# ---------------------------------------------------------------------------- at least once


def test_a_repeat_of_a_finished_message_gets_its_outcome_without_running_again() -> None:
    r = rig()
    sink = serve(r, "echo")
    first = call(r, "echo", alo=True)
    r.core.local.reply(0.1, "echo", "m1", Ok("once"))
    repeat = call(r, "echo", alo=True, now=0.2)
    assert repeat.one == Ok("once") and first.one == Ok("once")
    assert len(sink.events) == 1
    assert r.core.stats.duplicates == 1


def test_a_repeat_of_a_failed_message_gets_the_same_error() -> None:
    r = rig()
    serve(r, "echo")
    call(r, "echo", alo=True)
    r.core.local.reply(0.1, "echo", "m1", Err(errors.Conflict("no", detail={"v": 2})))
    error = error_of(call(r, "echo", alo=True, now=0.2))
    assert isinstance(error, errors.Conflict) and error.detail == {"v": 2}


def test_a_repeat_waits_for_the_first_delivery_in_progress() -> None:
    r = rig()
    sink = serve(r, "echo")
    first = call(r, "echo", alo=True, timeout=5.0)
    repeat = call(r, "echo", alo=True, timeout=5.0, now=0.1)
    assert repeat.got == [] and len(sink.events) == 1
    r.core.local.reply(0.2, "echo", "m1", Err(errors.Invalid("bad")))
    first_error, repeat_error = error_of(first), error_of(repeat)
    assert isinstance(repeat_error, errors.Invalid)
    assert repeat_error is not first_error  # each waiter raises an error of its own


def test_a_repeat_gives_up_at_its_own_deadline_while_the_first_runs() -> None:
    r = rig()
    serve(r, "echo")
    first = call(r, "echo", alo=True, timeout=10.0)
    repeat = call(r, "echo", alo=True, timeout=1.0)
    r.core.tick(1.0)
    error = error_of(repeat)
    assert isinstance(error, errors.Timeout) and "still running" in error.message
    assert first.got == []
    r.core.local.reply(2.0, "echo", "m1", Ok(1))
    assert first.one == Ok(1) and len(repeat.got) == 1


def test_a_first_delivery_that_times_out_is_forgotten_and_its_repeats_fail() -> None:
    r = rig()
    sink = serve(r, "echo")
    call(r, "echo", alo=True, timeout=1.0)
    repeat = call(r, "echo", alo=True, timeout=5.0)
    r.core.tick(1.0)
    assert isinstance(error_of(repeat), errors.Timeout)
    retry = call(r, "echo", alo=True, now=1.5)
    assert len(sink.events) == 2  # the retry runs the handler
    r.core.local.reply(1.6, "echo", "m1", Ok("now"))
    assert retry.one == Ok("now")


def test_a_first_delivery_refused_at_once_is_forgotten() -> None:
    r = rig()
    sink = serve(r, "echo", Sink(full=True))
    assert isinstance(error_of(call(r, "echo", alo=True)), errors.Overloaded)
    sink.full = False
    call(r, "echo", alo=True)
    assert len(sink.events) == 1


def test_a_repeat_whose_reply_was_let_go_is_told_it_ran() -> None:
    r = rig()
    r.core.local.dedup = DedupWindow(max_body_bytes=8)
    serve(r, "echo")
    call(r, "echo", alo=True)
    r.core.local.reply(0.1, "echo", "m1", Ok("a reply larger than the budget"))
    error = error_of(call(r, "echo", alo=True))
    assert isinstance(error, errors.Conflict)
    assert error.detail == {"handled": True, "ok": True}


def test_message_ids_are_per_receiving_agent() -> None:
    r = rig()
    one, two = serve(r, "one"), serve(r, "two")
    call(r, "one", alo=True)
    call(r, "two", alo=True)
    assert len(one.events) == len(two.events) == 1
    assert r.core.stats.duplicates == 0


# ---------------------------------------------------------------------------- other hosts


def remote(r: Rig, name: str, host: str = "b") -> None:
    r.directory.live[name] = entry(name, host)


def test_a_request_to_another_host_goes_once_and_ends_with_its_result() -> None:
    r = rig()
    remote(r, "far")
    done = call(r, "far", body=[1, 2])
    [(peer, msg)] = r.wire.take()
    assert peer == "b" and isinstance(msg, Deliver)
    assert (msg.msg_id, msg.to, msg.kind, msg.ttl_ms, msg.body) == ("m1", "far", REQ, 1000, [1, 2])
    assert r.core.stats.forwarded == 1
    # A result from another host does not answer it.
    r.core.receive(0.1, "c", messages.encode(Result("m1", True, "wrong")))
    assert done.got == []
    r.core.receive(0.1, "b", messages.encode(Result("m1", True, "right")))
    assert done.one == Ok("right")
    assert r.core.remote.pending("b") == 0
    assert r.core.remote.breaker("b").state is BreakerState.CLOSED


def test_an_error_result_keeps_its_kind() -> None:
    r = rig()
    remote(r, "far")
    done = call(r, "far")
    error = errors.Overloaded("full", detail={"n": 1}).to_wire()
    r.core.receive(0.1, "b", messages.encode(Result("m1", False, error)))
    got = error_of(done)
    assert isinstance(got, errors.Overloaded) and got.detail == {"n": 1}


def test_a_one_way_send_to_another_host_ends_when_the_link_takes_it() -> None:
    r = rig()
    remote(r, "far")
    done = call(r, "far", kind=SEND)
    assert done.one == Ok(None)
    assert [p for p, _ in r.wire.take()] == ["b"]
    assert r.core.remote.pending("b") == 0 and len(r.core.timers) == 0


@pytest.mark.parametrize("status", [Status.DEAD, Status.LEFT, None])
def test_a_call_to_a_host_not_up_fails_at_once_and_opens_its_breaker(status: Any) -> None:
    r = rig()
    remote(r, "far")
    if status is None:
        del r.members.status["b"]
    else:
        r.members.status["b"] = status
    with pytest.raises(errors.Unreachable) as caught:
        call(r, "far")
    assert caught.value.detail == {"host": "b"}
    assert r.wire.sent == []
    assert r.core.remote.breaker("b").state is BreakerState.OPEN
    assert r.core.stats.unreachable == 1


def test_a_suspect_host_still_gets_calls() -> None:
    r = rig()
    remote(r, "far")
    r.members.status["b"] = Status.SUSPECT
    call(r, "far")
    assert len(r.wire.sent) == 1


def test_an_open_breaker_refuses_calls_until_its_cooldown_then_lets_one_trial_through() -> None:
    r = rig()
    remote(r, "far")
    breaker = r.core.remote.breaker("b")
    breaker.trip(0.0)
    with pytest.raises(errors.Unreachable) as caught:
        call(r, "far", now=0.5)
    assert caught.value.detail == {"host": "b", "breaker": "open"}
    trial = call(r, "far", now=breaker.cooldown, msg_id="t1")
    with pytest.raises(errors.Unreachable):  # the trial is out: one at a time
        call(r, "far", now=breaker.cooldown, msg_id="t2")
    r.core.receive(breaker.cooldown + 0.1, "b", messages.encode(Result("t1", True, None)))
    assert trial.one == Ok(None)
    assert breaker.state is BreakerState.CLOSED


def test_a_link_that_refuses_the_frame_overloads_the_call_and_frees_the_trial() -> None:
    r = rig()
    remote(r, "far")
    r.wire.refuse.add("b")
    breaker = r.core.remote.breaker("b")
    breaker.trip(0.0)
    breaker.host_up()
    for kind in (REQ, SEND):
        with pytest.raises(errors.Overloaded):
            call(r, "far", now=0.1, kind=kind)
        assert not breaker.trial_in_flight
    assert r.core.remote.pending("b") == 0 and len(r.core.timers) == 0


def test_an_unanswered_exchange_times_out_and_counts_against_a_disconnected_host() -> None:
    r = rig()
    remote(r, "far")
    breaker = r.core.remote.breaker("b")
    for i in range(breaker.threshold):
        done = call(r, "far", now=float(i), msg_id=f"m{i}", timeout=0.5)
        r.core.tick(i + 0.5)
        error = error_of(done)
        assert isinstance(error, errors.Timeout) and error.detail == {"host": "b"}
    assert breaker.state is BreakerState.OPEN
    assert r.core.stats.timeouts == breaker.threshold


def test_a_slow_handler_behind_a_connected_link_does_not_open_the_breaker() -> None:
    r = rig()
    remote(r, "far")
    r.wire.up_links.add("b")
    breaker = r.core.remote.breaker("b")
    for i in range(breaker.threshold + 2):
        call(r, "far", now=float(i), msg_id=f"m{i}", timeout=0.5)
        r.core.tick(i + 0.5)
    assert breaker.state is BreakerState.CLOSED and breaker.failures == 0


def test_a_dead_host_fails_its_exchanges_at_once_and_only_its_own() -> None:
    r = rig()
    remote(r, "on-b", "b")
    remote(r, "on-c", "c")
    to_b = [call(r, "on-b", msg_id=f"b{i}") for i in range(3)]
    to_c = call(r, "on-c", msg_id="c0")
    r.core.host_down(0.1, "b")
    for done in to_b:
        error = error_of(done)
        assert isinstance(error, errors.Unreachable) and "died" in error.message
    assert to_c.got == []
    assert r.core.remote.pending("b") == 0 and r.core.remote.pending("c") == 1
    r.core.tick(10.0)  # their deadlines were cancelled
    assert all(len(d.got) == 1 for d in to_b)


def test_a_broken_connection_fails_the_exchanges_sent_on_it() -> None:
    r = rig()
    remote(r, "far")
    done = call(r, "far")
    r.core.link_lost("c")
    assert done.got == []
    r.core.link_lost("b")
    error = error_of(done)
    assert isinstance(error, errors.Unreachable) and "connection" in error.message


def test_failed_connection_attempts_open_the_breaker_and_a_success_closes_it() -> None:
    r = rig()
    breaker = r.core.remote.breaker("b")
    for i in range(breaker.threshold):
        r.core.link_status(float(i), "b", False)
    assert breaker.state is BreakerState.OPEN
    r.core.host_up("b")
    assert breaker.state is BreakerState.HALF_OPEN
    r.core.link_status(5.0, "b", True)
    assert breaker.state is BreakerState.CLOSED


# ---------------------------------------------------------------------------- inbound frames


def test_a_request_from_a_peer_is_answered_with_a_result_to_that_peer() -> None:
    r = rig()
    sink = serve(r, "echo")
    deliver = Deliver("x1", "echo", "far-client", REQ, False, 2000, "ping")
    assert r.core.receive(0.0, "b", messages.encode(deliver)) is None
    assert sink.events[0]["id"] == "x1" and r.core.stats.received == 1
    r.core.local.reply(0.1, "echo", "x1", Ok("pong"))
    assert r.wire.take() == [("b", Result("x1", True, "pong"))]


def test_a_request_from_a_peer_times_out_at_its_ttl_and_says_so() -> None:
    r = rig()
    serve(r, "echo")
    r.core.receive(1.0, "b", messages.encode(Deliver("x1", "echo", "", REQ, False, 2000, None)))
    r.core.tick(2.999)
    assert r.wire.sent == []
    r.core.tick(3.0)
    [(peer, result)] = r.wire.take()
    assert peer == "b" and isinstance(result, Result) and not result.ok
    assert result.payload["kind"] == "timeout"


def test_a_send_from_a_peer_is_delivered_without_an_answer() -> None:
    r = rig()
    sink = serve(r, "echo")
    r.core.receive(0.0, "b", messages.encode(Deliver("x1", "echo", "", SEND, False, 2000, 1)))
    assert len(sink.events) == 1 and r.wire.sent == []
    assert r.core.local.agents["echo"].pending == {}


def test_a_failed_delivery_from_a_peer_is_answered_with_the_error() -> None:
    r = rig()
    r.directory.live["ghost"] = entry("ghost", "a")
    r.core.receive(0.0, "b", messages.encode(Deliver("x1", "ghost", "", REQ, False, 2000, 1)))
    [(peer, result)] = r.wire.take()
    assert peer == "b" and isinstance(result, Result) and not result.ok
    assert result.payload["kind"] == "unreachable"


def test_a_malformed_frame_is_dropped() -> None:
    r = rig()
    assert r.core.receive(0.0, "b", b"\xff\x00junk") is None
    assert r.core.receive(0.0, "b", messages.encode(Result("x", True, None))) is None
    assert r.wire.sent == []


def test_activation_and_control_requests_go_to_the_driver() -> None:
    r = rig()
    act = Activate("i1", "svc", "kind", 1000)
    ctl = Control("i2", "drain", {})
    assert r.core.receive(0.0, "b", messages.encode(act)) == act
    assert r.core.receive(0.0, "b", messages.encode(ctl)) == ctl
    r.core.answer("b", "i2", Err(errors.Invalid("no")))
    [(peer, result)] = r.wire.take()
    assert peer == "b" and isinstance(result, Result)
    assert (result.msg_id, result.ok, result.payload["kind"]) == ("i2", False, "invalid")


def test_an_activation_request_carries_the_time_left() -> None:
    r = rig()
    done = Outcomes()
    r.core.activate(1.0, "b", "i1", "svc", "kind", 3.5, done)
    [(peer, msg)] = r.wire.take()
    assert peer == "b" and msg == Activate("i1", "svc", "kind", 2500)
    r.core.receive(1.1, "b", messages.encode(Result("i1", True, {"name": "svc"})))
    assert done.one == Ok({"name": "svc"})


# ---------------------------------------------------------------------------- names and health


def test_an_agent_known_only_on_a_dead_host_is_unreachable_else_not_found() -> None:
    r = rig()
    r.directory.gone["was"] = entry("was", "b")
    gone = r.core.missing("was")
    assert isinstance(gone, errors.Unreachable) and gone.detail == {"host": "b"}
    assert isinstance(r.core.missing("never"), errors.NotFound)


def test_health_follows_membership_and_the_breaker() -> None:
    r = rig()
    serve(r, "here")
    remote(r, "far")
    r.directory.live["ghost"] = entry("ghost", "a")
    r.directory.gone["was"] = entry("was", "c")
    assert r.core.health("here")["health"] == "healthy"
    assert r.core.health("ghost")["health"] == "unreachable"
    assert r.core.health("was") == {
        "name": "was",
        "node": "c",
        "health": "unreachable",
        "reason": "its host is down or unreachable",
    }
    assert r.core.health("never") == {"name": "never", "health": "not_found"}
    assert r.core.health("far") == {
        "name": "far",
        "node": "b",
        "breaker": "closed",
        "health": "healthy",
    }
    r.members.status["b"] = Status.SUSPECT
    assert r.core.health("far")["health"] == "degraded"
    r.members.status["b"] = Status.ALIVE
    r.core.remote.breaker("b").trip(0.0)
    assert r.core.health("far")["health"] == "unreachable"
    r.core.host_up("b")
    assert r.core.health("far")["health"] == "degraded"
    r.members.status["b"] = Status.DEAD
    assert r.core.health("far")["health"] == "unreachable"


# ---------------------------------------------------------------------------- signals


def event(n: int = 0) -> dict[str, Any]:
    return {"id": str(n), "source": "t", "type": "x"}


def test_a_signal_goes_once_to_each_host_with_a_matching_pattern() -> None:
    r = rig(peers=("b", "c", "d"))
    r.core.signals.set_host_patterns("b", ["orders.*", "orders.**"])
    r.core.signals.set_host_patterns("c", ["other.*"])
    r.core.signals.set_host_patterns("d", ["orders.eu"])
    r.members.status["d"] = Status.DEAD
    local = Sink()
    r.core.signals.subscribe("orders.**", local)
    assert r.core.signals.publish("orders.eu", event()) == 2  # here and b (d is dead)
    assert [(p, m) for p, m in r.wire.take()] == [("b", Signal("orders.eu", event()))]
    assert local.offered == [{"topic": "orders.eu", "event": event()}]
    assert r.core.stats.signal_hosts == 2


def test_a_host_that_drops_its_patterns_gets_no_more_signals() -> None:
    r = rig()
    r.core.signals.set_host_patterns("b", ["t.*", "bad..pattern"])
    assert r.core.signals.hosts_for("t.x") == {"b"}
    r.core.signals.set_host_patterns("b", [])
    assert r.core.signals.hosts_for("t.x") == set()
    assert r.core.signals.publish("t.x", event()) == 0


def test_a_signal_from_a_peer_reaches_every_matching_local_subscriber() -> None:
    r = rig()
    one, two, other = Sink(), Sink(), Sink()
    r.core.signals.subscribe("t.*", one)
    r.core.signals.subscribe("t.**", two)
    r.core.signals.subscribe("u.*", other)
    r.core.receive(0.0, "b", messages.encode(Signal("t.x", event())))
    assert len(one.offered) == len(two.offered) == 1 and other.offered == []
    assert r.core.stats.signals_delivered == 2


def test_first_and_last_subscribers_of_a_pattern_mark_it_for_the_registry() -> None:
    r = rig()
    cancel_one = r.core.signals.subscribe("t.*", Sink())
    cancel_two = r.core.signals.subscribe("t.*", Sink())
    assert r.core.signals.take_adverts() == {"t.*"} and len(r.wakes) == 1
    cancel_one()
    cancel_one()  # cancelling twice is harmless
    assert r.core.signals.take_adverts() == set()
    cancel_two()
    assert r.core.signals.take_adverts() == {"t.*"} and len(r.wakes) == 2
    assert not r.core.signals.subscribed("t.*")


def test_signals_and_bodies_are_bounded() -> None:
    r = rig()
    with pytest.raises(errors.Invalid):
        r.core.signals.publish("t.x", {"blob": b"x" * (600 * 1024)})
    with pytest.raises(errors.Invalid):
        r.core.signals.publish("t.*", event())
    with pytest.raises(errors.Invalid):
        r.core.signals.subscribe("a.**.b", Sink())


# ---------------------------------------------------------------------------- every call ends once

_AGENTS = ("x", "y")  # served here
_REMOTE = {"p": "b", "q": "c"}  # agent -> host


@st.composite
def _steps(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    ids = st.sampled_from(["m0", "m1", "m2"])
    step = st.one_of(
        st.tuples(
            st.just("call"),
            st.sampled_from([*_AGENTS, *_REMOTE]),
            ids,
            st.sampled_from([REQ, SEND]),
            st.booleans(),
            st.floats(0.1, 3.0),
        ),
        st.tuples(st.just("reply"), st.sampled_from(_AGENTS), ids, st.booleans()),
        st.tuples(st.just("result"), st.sampled_from(["b", "c"]), ids, st.booleans()),
        st.tuples(st.just("deliver"), st.sampled_from(_AGENTS), ids, st.booleans()),
        st.tuples(st.just("detach"), st.sampled_from(_AGENTS)),
        st.tuples(st.just("serve"), st.sampled_from(_AGENTS)),
        st.tuples(st.just("down"), st.sampled_from(["b", "c"])),
        st.tuples(st.just("up"), st.sampled_from(["b", "c"])),
        st.tuples(st.just("link_lost"), st.sampled_from(["b", "c"])),
        st.tuples(st.just("full"), st.sampled_from(_AGENTS), st.booleans()),
        st.tuples(st.just("wait"), st.floats(0.0, 2.0)),
    )
    return draw(st.lists(step, max_size=40))


@settings(max_examples=examples(300))
@given(_steps())
def test_every_call_ends_exactly_once_and_nothing_is_left_waiting(
    steps: list[tuple[Any, ...]],
) -> None:
    r = rig()
    owners: dict[str, object] = {}
    sinks: dict[str, Sink] = {}
    for name in _AGENTS:
        owners[name] = object()
        sinks[name] = serve(r, name, owner=owners[name])
    for name, host in _REMOTE.items():
        remote(r, name, host)
    calls: list[Outcomes] = []
    now = 0.0
    for step in steps:
        match step:
            case ("call", to, msg_id, kind, alo, timeout):
                try:
                    calls.append(
                        call(r, to, now=now, kind=kind, alo=alo, timeout=timeout, msg_id=msg_id)
                    )
                except errors.MeshError:
                    pass  # refused before anything was sent: raised, never completed
            case ("reply", name, msg_id, ok):
                outcome = Ok(msg_id) if ok else Err(errors.Invalid("no"))
                r.core.local.reply(now, name, msg_id, outcome)
            case ("result", peer, msg_id, ok):
                payload = "r" if ok else errors.Invalid("no").to_wire()
                r.core.receive(now, peer, messages.encode(Result(msg_id, ok, payload)))
            case ("deliver", name, msg_id, alo):
                frame = messages.encode(Deliver(msg_id, name, "", REQ, alo, 1000, None))
                r.core.receive(now, "b", frame)
            case ("detach", name):
                r.core.local.detach(now, name, owners[name])
            case ("serve", name):
                if name not in r.core.local.agents:
                    owners[name] = object()
                    serve(r, name, sinks[name], owner=owners[name])
            case ("down", host):
                r.members.status[host] = Status.DEAD
                r.core.host_down(now, host)
            case ("up", host):
                r.members.status[host] = Status.ALIVE
                r.core.host_up(host)
            case ("link_lost", host):
                r.core.link_lost(host)
            case ("full", name, full):
                sinks[name].full = full
            case ("wait", seconds):
                now += seconds
                r.core.tick(now)
        assert all(len(c.got) <= 1 for c in calls)
    r.core.tick(now + 10.0)
    assert all(len(c.got) == 1 for c in calls)
    assert all(not a.pending for a in r.core.local.agents.values())
    assert r.core.remote.pending("b") == r.core.remote.pending("c") == 0
    assert len(r.core.timers) == 0
    # Every inbound request was answered, once.
    answered = [m.msg_id for _, m in r.wire.sent if isinstance(m, Result)]
    asked = [s for s in steps if s[0] == "deliver"]
    assert len(answered) == len(asked)


def test_a_reused_message_id_to_one_host_ends_each_call_once() -> None:
    r = rig()
    remote(r, "far")
    first = call(r, "far", timeout=1.0)
    second = call(r, "far", timeout=2.0)  # the caller chose the same id again
    r.core.receive(0.5, "b", messages.encode(Result("m1", True, "one answer")))
    assert second.one == Ok("one answer") and first.got == []
    r.core.tick(1.0)
    assert isinstance(error_of(first), errors.Timeout)
    assert r.core.remote.pending("b") == 0 and len(r.core.timers) == 0
