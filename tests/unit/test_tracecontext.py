"""W3C Trace Context: parsing rules, the DELIVER's optional trace field, and how the routing
core carries a context (as data) from a call to the agent and across hosts."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from meshd.routing import messages
from meshd.routing.messages import Deliver, DeliveryKind
from meshd.routing.outcome import Ok, Outcome
from meshd.routing.ports import DeliveryObserver
from meshd_client.protocol import tracecontext
from meshd_client.protocol.tracecontext import Malformed, TraceContext
from tests.unit.routing_helpers import Outcomes, Rig, entry, rig, serve

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
TP = f"00-{TRACE}-{SPAN}-01"


# ---------------------------------------------------------------------------- parsing


def test_a_valid_traceparent_parses_with_its_ids() -> None:
    ctx = tracecontext.parse(TP, "congo=t61rcWkgMzE")
    assert ctx == TraceContext(TP, "congo=t61rcWkgMzE")
    assert (ctx.trace_id, ctx.span_id, ctx.sampled) == (TRACE, SPAN, True)
    assert not tracecontext.parse(f"00-{TRACE}-{SPAN}-00").sampled


@pytest.mark.parametrize(
    "bad",
    [
        None,
        42,
        b"00-" + TRACE.encode(),
        "",
        TP[:-1],  # too short
        TP + "0",  # version 00 is exactly 55 characters
        "ff" + TP[2:],  # version ff is invalid
        "0g" + TP[2:],
        TP.upper(),  # hex is lowercase
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00_{TRACE}-{SPAN}-01",
        f"00-{TRACE}_{SPAN}-01",
        f"00-{TRACE}-{SPAN}_01",
        f"00-{TRACE}-{SPAN}-0x",
        f"01-{TRACE}-{SPAN}-01x",  # a later version's extra fields follow a '-'
        f"01-{TRACE}-{SPAN}-01-" + "a" * tracecontext.MAX_TRACEPARENT,  # over the bound
    ],
)
def test_malformed_traceparents_are_refused(bad: Any) -> None:
    with pytest.raises(Malformed):
        tracecontext.parse(bad)


def test_a_later_version_is_read_as_version_00() -> None:
    ctx = tracecontext.parse(f"cc-{TRACE}-{SPAN}-01-what-the-future-brings")
    assert ctx.traceparent == TP


@pytest.mark.parametrize("state", [42, "x" * (tracecontext.MAX_TRACESTATE + 1), "a=\n"])
def test_a_bad_tracestate_is_dropped_and_the_traceparent_kept(state: Any) -> None:
    assert tracecontext.parse(TP, state) == TraceContext(TP, "")


def test_fields_absent_mean_no_context_and_present_but_bad_raise() -> None:
    assert tracecontext.from_fields({"to": "x"}) is None
    assert tracecontext.from_fields({"traceparent": TP}) == TraceContext(TP)
    with pytest.raises(Malformed):
        tracecontext.from_fields({"traceparent": "nope"})


def test_a_new_root_is_valid_and_random() -> None:
    a, b = tracecontext.new_root(), tracecontext.new_root()
    assert tracecontext.parse(a.traceparent) == a
    assert a.trace_id != b.trace_id


@settings(max_examples=examples(500), deadline=None)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=64), st.integers(), st.none()))
def test_fuzz_parsing_only_raises_malformed(value: Any) -> None:
    try:
        ctx = tracecontext.parse(value, value)
    except Malformed:
        return
    assert tracecontext.parse(ctx.traceparent, ctx.tracestate) == ctx


# ---------------------------------------------------------------------------- the wire


def deliver(trace: Any = None, extra: tuple[Any, ...] = ()) -> bytes:
    wire: list[Any] = [1, "m", "to", "", 1, False, 1000, {"b": 1}]
    if trace is not None:
        wire.append(trace)
    return cbor2.dumps(wire + list(extra))


def test_deliver_without_trace_is_the_old_eight_field_message() -> None:
    msg = Deliver("m", "to", "", DeliveryKind.REQUEST, False, 1000, {"b": 1})
    assert messages.encode(msg) == deliver()
    decoded = messages.decode(deliver())
    assert decoded == msg and isinstance(decoded, Deliver) and decoded.trace is None


def test_deliver_carries_its_trace_context() -> None:
    ctx = TraceContext(TP, "k=v")
    msg = Deliver("m", "to", "", DeliveryKind.REQUEST, False, 1000, None, ctx)
    decoded = messages.decode(messages.encode(msg))
    assert isinstance(decoded, Deliver) and decoded.trace == ctx and not decoded.bad_trace
    assert messages.decode(deliver([TP])) == Deliver(
        "m", "to", "", DeliveryKind.REQUEST, False, 1000, {"b": 1}, TraceContext(TP)
    )


@pytest.mark.parametrize("trace", ["00-bad", [], [TP, "s", "x"], [42], {"traceparent": TP}])
def test_a_malformed_trace_field_is_ignored_not_the_message(trace: Any) -> None:
    decoded = messages.decode(deliver(trace))
    assert isinstance(decoded, Deliver)
    assert decoded.trace is None and decoded.bad_trace and decoded.body == {"b": 1}


# ---------------------------------------------------------------------------- the core


def traced_call(r: Rig, to: str, trace: TraceContext | None, kind: DeliveryKind) -> Outcomes:
    done = Outcomes()
    found = r.directory.lookup(to)
    assert found is not None
    r.core.call(
        0.0,
        entry=found,
        msg_id="m1",
        to=to,
        body="hi",
        sender="tester",
        kind=kind,
        at_least_once=False,
        timeout=1.0,
        deadline=1.0,
        done=done,
        trace=trace,
    )
    return done


def test_a_local_call_hands_its_context_to_the_agent() -> None:
    r = rig()
    sink = serve(r, "echo")
    traced_call(r, "echo", TraceContext(TP, "k=v"), DeliveryKind.REQUEST)
    traced_call(r, "echo", None, DeliveryKind.SEND)
    first, second = sink.events
    assert (first["traceparent"], first["tracestate"]) == (TP, "k=v")
    assert "traceparent" not in second and "tracestate" not in second


def test_a_forwarded_call_carries_its_context_to_the_agents_host() -> None:
    a, b = rig("a", peers=("b",)), rig("b", peers=("a",))
    a.directory.live["echo"] = entry("echo", "b")
    sink = serve(b, "echo")
    done = traced_call(a, "echo", TraceContext(TP), DeliveryKind.REQUEST)
    ((peer, msg),) = a.wire.take()
    assert peer == "b" and isinstance(msg, Deliver) and msg.trace == TraceContext(TP)
    b.core.receive(0.0, "a", messages.encode(msg))
    assert sink.events[0]["traceparent"] == TP
    assert b.core.local.reply(0.1, "echo", "m1", Ok("pong"))
    ((_, result),) = b.wire.take()
    a.core.receive(0.2, "b", messages.encode(result))
    assert done.one == Ok("pong")


def test_a_malformed_context_from_a_peer_is_counted_and_the_message_delivered() -> None:
    b = rig("b", peers=("a",))
    sink = serve(b, "echo")
    b.core.receive(0.0, "a", cbor2.dumps([1, "m2", "echo", "", 0, False, 1000, None, "x"]))
    assert b.core.stats.bad_trace_context == 1
    assert sink.events[-1]["id"] == "m2" and "traceparent" not in sink.events[-1]


class Observer:
    """A DeliveryObserver that re-parents deliveries and records their outcomes."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.ended: list[Outcome] = []

    def remote_delivery(self, peer: str, msg: Deliver) -> tuple[Deliver, Any]:
        self.seen.append((peer, msg.msg_id))
        child = TraceContext(f"00-{TRACE}-{'1' * 16}-01")
        return replace(msg, trace=child), self.ended.append


def test_the_observer_sees_each_remote_delivery_and_its_outcome() -> None:
    b = rig("b", peers=("a",))
    observer = Observer()
    _: DeliveryObserver = observer
    b.core.observer = observer
    sink = serve(b, "echo")
    b.core.receive(0.0, "a", cbor2.dumps([1, "m1", "echo", "", 1, False, 1000, None, [TP]]))
    assert observer.seen == [("a", "m1")]
    assert sink.events[0]["traceparent"] == f"00-{TRACE}-{'1' * 16}-01"
    assert observer.ended == []
    b.core.local.reply(0.1, "echo", "m1", Ok(1))
    assert observer.ended == [Ok(1)]
    b.core.receive(0.0, "a", cbor2.dumps([1, "m2", "echo", "", 0, False, 1000, None]))
    assert observer.ended[-1] == Ok(None)  # a send ends when handed to the agent
