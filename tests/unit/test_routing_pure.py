"""The pure parts of routing: topics and patterns, the per-host circuit breaker, the
at-least-once de-duplication window, and the ROUTING wire messages."""

from __future__ import annotations

import re
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from meshd.routing import messages, topics
from meshd.routing.breaker import Breaker, BreakerState
from meshd.routing.dedup import DedupWindow, InProgress, Outcome
from meshd.routing.messages import (
    Activate,
    Control,
    Deliver,
    DeliveryKind,
    Kind,
    Result,
    Signal,
)
from meshd.wire.validate import WireError
from meshd_client.protocol import cbor, errors
from meshd_client.protocol.tracecontext import TraceContext

# ---------------------------------------------------------------------------- topics


@pytest.mark.parametrize(
    "topic",
    ["a", "orders.eu.created", "a-b_c.d:e/f", "x" * topics.MAX_TOPIC, ".".join("s" * 32)],
)
def test_valid_topics(topic: str) -> None:
    assert topics.check_topic(topic) == topic


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("", "printable"),
        ("x" * (topics.MAX_TOPIC + 1), "printable"),
        ("a\nb", "printable"),
        ("a\x00b", "printable"),
        ("a..b", "segments"),
        (".a", "segments"),
        ("a.", "segments"),
        (".", "segments"),
        (".".join("s" * 33), "segments"),
        ("a.*", "wildcards"),
        ("a.**", "wildcards"),
        ("*", "wildcards"),
        (5, "printable"),
        (None, "printable"),
    ],
)
def test_invalid_topics(topic: Any, reason: str) -> None:
    with pytest.raises(errors.Invalid, match=reason):
        topics.check_topic(topic)


@pytest.mark.parametrize(
    "pattern", ["a", "*", "**", "a.*", "a.**", "*.b", "*.*.c", "a.*.**", "*.**", "a.b.c"]
)
def test_valid_patterns(pattern: str) -> None:
    assert topics.check_pattern(pattern) == pattern


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("**.a", "last segment"),
        ("a.**.b", "last segment"),
        ("**.**", "last segment"),
        ("a*", "whole segments"),
        ("a.b*", "whole segments"),
        ("a.*b.c", "whole segments"),
        ("a.***", "whole segments"),
        ("", "printable"),
        ("a..*", "segments"),
        ("a.", "segments"),
        ("a\tb", "printable"),
        ("p" * (topics.MAX_TOPIC + 1), "printable"),
        (["a"], "printable"),
    ],
)
def test_invalid_patterns(pattern: Any, reason: str) -> None:
    with pytest.raises(errors.Invalid, match=reason):
        topics.check_pattern(pattern)


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        # exact
        ("a.b.c", "a.b.c", True),
        ("a.b.c", "a.b", False),
        ("a.b.c", "a.b.c.d", False),
        ("a.b.c", "a.b.x", False),
        ("a", "a", True),
        ("a", "ab", False),
        # '*' is exactly one segment
        ("a.*", "a.b", True),
        ("a.*", "a", False),
        ("a.*", "a.b.c", False),
        ("a.*", "b.a", False),
        ("*", "a", True),
        ("*", "a.b", False),
        ("*.b", "x.b", True),
        ("*.b", "x.c", False),
        ("a.*.c", "a.zz.c", True),
        ("a.*.c", "a.c", False),
        ("*.*", "x.y", True),
        ("*.*", "x", False),
        # '**' is one or more trailing segments
        ("a.**", "a.b", True),
        ("a.**", "a.b.c", True),
        ("a.**", "a.b.c.d.e", True),
        ("a.**", "a", False),
        ("a.**", "b.a", False),
        ("a.**", "ab.c", False),
        ("**", "a", True),
        ("**", "a.b.c", True),
        ("a.*.**", "a.b", False),
        ("a.*.**", "a.b.c", True),
        ("*.**", "x", False),
        ("*.**", "x.y.z", True),
    ],
)
def test_matches(pattern: str, topic: str, expected: bool) -> None:
    topics.check_pattern(pattern)
    topics.check_topic(topic)
    assert topics.matches(pattern, topic) is expected


def reference_match(pattern: str, topic: str) -> bool:
    """An independent statement of the rules, as a regular expression over segments."""
    parts = pattern.split(".")
    regex = []
    for i, part in enumerate(parts):
        if part == "**":
            assert i == len(parts) - 1
            regex.append(r"[^.]+(?:\.[^.]+)*")
        elif part == "*":
            regex.append(r"[^.]+")
        else:
            regex.append(re.escape(part))
    return re.fullmatch(r"\.".join(regex), topic) is not None


segment = st.sampled_from(["a", "b", "c", "orders", "eu"])
topic_st = st.lists(segment, min_size=1, max_size=5).map(".".join)
pattern_st = st.tuples(
    st.lists(st.one_of(segment, st.just("*")), min_size=0, max_size=4),
    st.booleans(),
).map(lambda t: ".".join([*t[0], "**"] if t[1] else (t[0] or ["*"])))


@settings(max_examples=examples(500), deadline=None)
@given(pattern=pattern_st, topic=topic_st)
def test_matches_agrees_with_a_reference(pattern: str, topic: str) -> None:
    topics.check_pattern(pattern)
    assert topics.matches(pattern, topic) is reference_match(pattern, topic)


@settings(max_examples=examples(200), deadline=None, derandomize=True)
@given(
    steps=st.lists(st.tuples(st.booleans(), pattern_st), max_size=40),
    probes=st.lists(topic_st, min_size=1, max_size=8),
)
def test_the_pattern_index_matches_what_matches_does(
    steps: list[tuple[bool, str]], probes: list[str]
) -> None:
    """The index subscriptions are looked up in (add and remove in any order) finds exactly
    the held patterns that match, each once, and gives its tree back when emptied."""
    index = topics.PatternIndex()
    held: set[str] = set()
    for add, pattern in steps:
        if add:
            index.add(pattern)
            held.add(pattern)
        else:
            index.discard(pattern)
            held.discard(pattern)
        assert len(index) == len(held)
        for topic in probes:
            found = index.match(topic)
            assert len(found) == len(set(found))
            assert set(found) == {p for p in held if topics.matches(p, topic)}
    for pattern in held:
        index.discard(pattern)
    assert len(index) == 0 and not index._root.children


def test_the_pattern_index_costs_the_topic_not_the_patterns_held() -> None:
    index = topics.PatternIndex()
    for i in range(20_000):
        index.add(f"orders.p{i}.*")
    index.add("orders.**")
    index.add("*.p7.created")
    # Walking the tree visits only the branches the topic's segments name.
    assert sorted(index.match("orders.p7.created")) == [
        "*.p7.created",
        "orders.**",
        "orders.p7.*",
    ]
    assert index.match("billing.x") == []


# ---------------------------------------------------------------------------- breaker


def tripped(threshold: int = 3, cooldown: float = 2.0, max_cooldown: float = 30.0) -> Breaker:
    b = Breaker(threshold=threshold, cooldown=cooldown, max_cooldown=max_cooldown)
    for _ in range(threshold):
        b.failure(0.0)
    assert b.state is BreakerState.OPEN
    return b


def test_breaker_starts_closed_and_lets_everything_through() -> None:
    b = Breaker()
    assert b.state is BreakerState.CLOSED
    assert all(b.allow(float(t)) for t in range(10))


def test_breaker_opens_at_the_threshold() -> None:
    b = Breaker(threshold=3)
    b.failure(1.0)
    b.failure(1.1)
    assert b.state is BreakerState.CLOSED
    assert b.allow(1.2)
    b.failure(1.3)
    assert b.state is BreakerState.OPEN
    assert b.opened_at == 1.3
    assert b.current_cooldown == b.cooldown
    assert not b.allow(1.3)


def test_success_resets_the_failure_count() -> None:
    b = Breaker(threshold=3)
    b.failure(0.0)
    b.failure(0.0)
    b.success()
    b.failure(0.0)
    b.failure(0.0)
    assert b.state is BreakerState.CLOSED


def test_open_breaker_refuses_until_the_cooldown_elapsed() -> None:
    b = tripped(cooldown=2.0)
    assert not b.allow(0.5)
    assert not b.allow(1.999)
    assert b.state is BreakerState.OPEN
    assert b.allow(2.0)
    assert b.state is BreakerState.HALF_OPEN


def test_half_open_lets_exactly_one_trial_through() -> None:
    b = tripped()
    assert b.allow(5.0)
    assert b.trial_in_flight
    assert not b.allow(5.0)
    assert not b.allow(100.0)  # still one trial, however long it takes
    assert b.state is BreakerState.HALF_OPEN


def test_trial_success_closes() -> None:
    b = tripped()
    assert b.allow(5.0)
    b.success()
    assert b.state is BreakerState.CLOSED
    assert b.failures == 0
    assert b.current_cooldown == 0.0
    assert not b.trial_in_flight
    assert b.allow(5.0)
    assert b.allow(5.0)


def test_trial_failure_reopens_with_a_doubled_cooldown() -> None:
    b = tripped(cooldown=2.0)
    assert b.allow(2.0)
    b.failure(2.5)
    assert b.state is BreakerState.OPEN
    assert b.opened_at == 2.5
    assert b.current_cooldown == 4.0
    assert not b.allow(6.4)
    assert b.allow(6.5)
    assert b.state is BreakerState.HALF_OPEN


def test_cooldown_doubles_up_to_the_cap() -> None:
    b = tripped(cooldown=2.0, max_cooldown=30.0)
    seen = [b.current_cooldown]
    now = 0.0
    for _ in range(6):
        now += b.current_cooldown
        assert b.allow(now)
        b.failure(now)
        seen.append(b.current_cooldown)
    assert seen == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_after_closing_the_next_trip_starts_from_the_base_cooldown() -> None:
    b = tripped(cooldown=2.0)
    assert b.allow(2.0)
    b.failure(2.0)  # cooldown 4
    assert b.allow(6.0)
    b.success()
    for _ in range(3):
        b.failure(10.0)
    assert b.state is BreakerState.OPEN
    assert b.current_cooldown == 2.0


def test_trip_opens_at_once_and_is_idempotent_while_open() -> None:
    b = Breaker(cooldown=2.0)
    b.trip(1.0)
    assert b.state is BreakerState.OPEN
    assert b.opened_at == 1.0
    assert b.current_cooldown == 2.0
    b.trip(1.5)  # membership says it again: no change, no doubling
    assert b.opened_at == 1.0
    assert b.current_cooldown == 2.0
    assert not b.allow(2.9)
    assert b.allow(3.0)


def test_trip_while_half_open_doubles_the_cooldown() -> None:
    b = tripped(cooldown=2.0)
    assert b.allow(2.0)
    b.trip(2.1)
    assert b.state is BreakerState.OPEN
    assert b.current_cooldown == 4.0


def test_failures_while_open_do_not_extend_it() -> None:
    b = tripped(cooldown=2.0)
    b.failure(1.0)  # a call that was in flight before the trip
    assert b.opened_at == 0.0
    assert b.current_cooldown == 2.0


def test_host_up_turns_open_into_half_open_with_one_trial() -> None:
    b = tripped(cooldown=30.0)
    b.host_up()
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow(0.1)  # well inside the cooldown
    assert not b.allow(0.1)


def test_host_up_leaves_closed_and_half_open_alone() -> None:
    b = Breaker()
    b.host_up()
    assert b.state is BreakerState.CLOSED
    h = tripped()
    assert h.allow(10.0)
    h.host_up()
    assert h.state is BreakerState.HALF_OPEN
    assert h.trial_in_flight  # the running trial is still the only one


# ---------------------------------------------------------------------------- dedup


def test_dedup_new_then_in_progress_then_outcome() -> None:
    w = DedupWindow()
    assert w.begin("m1", 0.0) is None
    assert len(w) == 1
    again = w.begin("m1", 0.1)
    assert isinstance(again, InProgress)
    assert again.at == 0.0
    w.finish("m1", True, {"reply": 1}, 0.2, size=10)
    done = w.begin("m1", 0.3)
    assert isinstance(done, Outcome)
    assert (done.ok, done.payload, done.at) == (True, {"reply": 1}, 0.2)
    assert w.duplicates == 2


def test_dedup_remembers_failures_too() -> None:
    w = DedupWindow()
    w.begin("m", 0.0)
    error = errors.Invalid("bad").to_wire()
    w.finish("m", False, error, 0.0, size=40)
    done = w.begin("m", 0.0)
    assert isinstance(done, Outcome)
    assert done.ok is False
    assert done.payload == error


def test_dedup_ids_are_independent() -> None:
    w = DedupWindow()
    assert w.begin("a", 0.0) is None
    assert w.begin("b", 0.0) is None
    w.finish("a", True, 1, 0.0, size=1)
    assert isinstance(w.begin("b", 0.0), InProgress)
    assert isinstance(w.begin("a", 0.0), Outcome)


def test_finish_of_an_unknown_id_remembers_nothing() -> None:
    w = DedupWindow()
    w.finish("ghost", True, 1, 0.0, size=1)
    assert len(w) == 0
    assert w.begin("ghost", 0.0) is None


def test_forget_lets_a_retry_run() -> None:
    w = DedupWindow()
    w.begin("m", 0.0)
    w.forget("m")
    assert len(w) == 0
    assert w.begin("m", 1.0) is None
    w.forget("never-seen")  # harmless


def test_dedup_expires_by_age() -> None:
    w = DedupWindow(max_age=10.0)
    w.begin("old", 0.0)
    w.begin("newer", 5.0)
    assert isinstance(w.begin("old", 10.0), InProgress)  # exactly max_age: still known
    assert w.begin("x", 10.5) is None  # "old" (0.0) expires, "newer" (5.0) stays
    assert w.begin("old", 10.5) is None
    assert isinstance(w.begin("newer", 10.5), InProgress)


def test_dedup_age_counts_from_the_outcome() -> None:
    w = DedupWindow(max_age=10.0)
    w.begin("m", 0.0)
    w.finish("m", True, "r", 8.0, size=1)
    assert isinstance(w.begin("m", 17.0), Outcome)
    assert w.begin("m", 18.5) is None


def test_dedup_bounded_by_count_oldest_first() -> None:
    w = DedupWindow(max_entries=3)
    for i in range(3):
        assert w.begin(f"m{i}", float(i)) is None
    assert w.begin("m3", 3.0) is None
    assert len(w) == 3
    assert w.begin("m0", 3.0) is None  # evicted, so new again (and m1 goes now)
    assert len(w) == 3
    assert isinstance(w.begin("m2", 3.0), InProgress)
    assert isinstance(w.begin("m3", 3.0), InProgress)


def test_finishing_moves_an_entry_to_the_young_end() -> None:
    w = DedupWindow(max_entries=2)
    w.begin("a", 0.0)
    w.begin("b", 0.0)
    w.finish("a", True, 1, 0.0, size=1)
    w.begin("c", 0.0)  # evicts the oldest: b, not the just-finished a
    assert isinstance(w.begin("a", 0.0), Outcome)
    assert w.begin("b", 0.0) is None


def test_reply_bodies_are_kept_within_a_byte_budget_oldest_let_go_first() -> None:
    w = DedupWindow(max_body_bytes=100)
    for name in ("a", "b", "c"):
        w.begin(name, 0.0)
    w.finish("a", True, "A", 0.0, size=40)
    w.finish("b", True, "B", 0.0, size=40)
    assert w.body_bytes == 80
    w.finish("c", True, "C", 0.0, size=40)  # over budget: a's body goes
    assert w.body_bytes == 80 and w.bodies_dropped == 1
    a, b, c = (w.begin(name, 0.0) for name in ("a", "b", "c"))
    assert isinstance(a, Outcome) and (a.ok, a.kept, a.payload) == (True, False, None)
    assert isinstance(b, Outcome) and (b.kept, b.payload) == (True, "B")
    assert isinstance(c, Outcome) and (c.kept, c.payload) == (True, "C")


def test_a_body_larger_than_the_budget_is_not_kept_and_empty_replies_cost_nothing() -> None:
    w = DedupWindow(max_body_bytes=100)
    w.begin("huge", 0.0)
    w.finish("huge", True, "x" * 200, 0.0, size=200)
    w.begin("send", 0.0)
    w.finish("send", True, None, 0.0, size=0)
    huge, send = w.begin("huge", 0.0), w.begin("send", 0.0)
    assert isinstance(huge, Outcome) and not huge.kept and huge.payload is None
    assert isinstance(send, Outcome) and send.kept and send.payload is None
    assert w.body_bytes == 0


def test_evicting_or_forgetting_entries_gives_their_bytes_back() -> None:
    w = DedupWindow(max_entries=2, max_age=10.0, max_body_bytes=1000)
    w.begin("a", 0.0)
    w.finish("a", True, "A", 0.0, size=300)
    w.begin("b", 1.0)
    w.finish("b", True, "B", 1.0, size=200)
    w.begin("c", 2.0)  # the count bound evicts a
    assert w.body_bytes == 200
    w.forget("b")
    assert w.body_bytes == 0
    w.finish("c", True, "C", 2.0, size=100)
    w.begin("d", 20.0)  # c expires by age
    assert w.body_bytes == 0 and len(w) == 1


# ---------------------------------------------------------------------------- wire messages

TP = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"  # a valid W3C traceparent

ROUND_TRIP = [
    Deliver("m-1", "echo", "caller", DeliveryKind.REQUEST, False, 10_000, {"x": [1, b"\x00"]}),
    Deliver("m-2", "echo", "", DeliveryKind.SEND, True, 1, None),
    Deliver("i" * messages.MAX_ID, "n" * messages.MAX_NAME, "s", DeliveryKind.SEND, False, 0, 1.5),
    Deliver("m-3", "a", "b", DeliveryKind.REQUEST, True, messages.MAX_TTL_MS, "body"),
    Result("m-1", True, {"reply": "yes"}),
    Result("m-1", True, None),
    Result("m-2", False, errors.Unreachable("gone").to_wire()),
    Signal("orders.eu.created", {"id": "1", "source": "s", "type": "t", "data": [1, 2]}),
    Signal("a", {}),
    Deliver("m-4", "echo", "c", DeliveryKind.REQUEST, False, 5, [1], TraceContext(TP)),
    Deliver("m-5", "echo", "", DeliveryKind.SEND, True, 5, None, TraceContext(TP, "k=v,x=y")),
    Activate("a-1", "svc", "kind", 1000),
    Activate("i" * messages.MAX_ID, "n" * messages.MAX_NAME, "k" * 128, messages.MAX_TTL_MS),
    Activate("a-2", "svc", "kind", 0),
    Control("c-1", "drain", {}),
    Control("c-2", "o" * 64, {"timeout": 2.5, "nodes": ["a", "b"]}),
]


def test_every_message_type_has_a_round_trip_example() -> None:
    codes = {cbor.loads(messages.encode(msg))[0] for msg in ROUND_TRIP}
    assert codes == {int(kind) for kind in Kind}


@pytest.mark.parametrize("msg", ROUND_TRIP, ids=lambda m: type(m).__name__)
def test_routing_messages_round_trip(msg: messages.Message) -> None:
    data = messages.encode(msg)
    back = messages.decode(data)
    assert back == msg
    assert type(back) is type(msg)
    if isinstance(back, Deliver):
        assert type(back.kind) is DeliveryKind


def test_wire_layout_is_a_plain_array_with_the_type_first() -> None:
    msg = Deliver("m", "to", "from", DeliveryKind.REQUEST, True, 5, "b")
    assert cbor.loads(messages.encode(msg)) == [1, "m", "to", "from", 1, True, 5, "b"]
    assert cbor.loads(messages.encode(Result("m", False, {}))) == [2, "m", False, {}]
    assert cbor.loads(messages.encode(Signal("t", {"a": 1}))) == [3, "t", {"a": 1}]
    assert cbor.loads(messages.encode(Activate("m", "n", "k", 7))) == [4, "m", "n", "k", 7]
    assert cbor.loads(messages.encode(Control("m", "op", {"a": 1}))) == [5, "m", "op", {"a": 1}]
    traced = Deliver("m", "to", "", DeliveryKind.SEND, False, 5, None, TraceContext(TP, "k=v"))
    assert cbor.loads(messages.encode(traced)) == [1, "m", "to", "", 0, False, 5, None, [TP, "k=v"]]


def deliver(**changes: Any) -> bytes:
    fields: dict[str, Any] = {
        "type": 1,
        "msg_id": "m",
        "to": "agent",
        "sender": "",
        "kind": 0,
        "alo": False,
        "ttl": 1000,
        "body": None,
    }
    fields.update(changes)
    return cbor2.dumps(list(fields.values()))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xff",
        cbor2.dumps({"t": 1}),
        cbor2.dumps([]),
        cbor2.dumps(["1", "m"]),
        cbor2.dumps([True, "m", True, None]),  # a bool is not a type code
        cbor2.dumps([9, "m"]),
        cbor2.dumps([0]),
        cbor2.dumps([1.0, "m", True, None]),
        cbor2.dumps([2, "m", True, None]) + b"\x00",  # trailing bytes
        deliver()[:-1],  # truncated
        cbor2.dumps([1, "m", "to", "", 0, False, 1]),  # too short
        cbor2.dumps(
            [
                1,
                "m",
                "to",
                "",
                0,
                False,
                1,
                None,
                ["00-" + "1" * 32 + "-" + "2" * 16 + "-01"],
                "extra",
            ]
        ),  # too long
        deliver(msg_id=""),
        deliver(msg_id="i" * (messages.MAX_ID + 1)),
        deliver(msg_id=5),
        deliver(to=""),
        deliver(to="n" * (messages.MAX_NAME + 1)),
        deliver(to=b"agent"),
        deliver(sender=None),
        deliver(sender="s" * (messages.MAX_NAME + 1)),
        deliver(kind=2),
        deliver(kind=-1),
        deliver(kind=True),
        deliver(kind="request"),
        deliver(alo=1),
        deliver(alo=None),
        deliver(ttl=-1),
        deliver(ttl=messages.MAX_TTL_MS + 1),
        deliver(ttl=1.5),
        cbor2.dumps([2, "m", True]),
        cbor2.dumps([2, "m", True, None, None]),
        cbor2.dumps([2, "", True, None]),
        cbor2.dumps([2, "m", 1, None]),
        cbor2.dumps([2, "m", "yes", None]),
        cbor2.dumps([3, "topic"]),
        cbor2.dumps([3, "topic", [1, 2]]),
        cbor2.dumps([3, "topic", None]),
        cbor2.dumps([3, "", {}]),
        cbor2.dumps([3, "t" * 257, {}]),
        cbor2.dumps([3, "topic", {}, "extra"]),
        cbor2.dumps([4, "m", "name", "kind"]),
        cbor2.dumps([4, "m", "name", "kind", 1, "extra"]),
        cbor2.dumps([4, "", "name", "kind", 1]),
        cbor2.dumps([4, "i" * (messages.MAX_ID + 1), "name", "kind", 1]),
        cbor2.dumps([4, "m", "", "kind", 1]),
        cbor2.dumps([4, "m", "n" * (messages.MAX_NAME + 1), "kind", 1]),
        cbor2.dumps([4, "m", "name", "", 1]),
        cbor2.dumps([4, "m", "name", "k" * 129, 1]),
        cbor2.dumps([4, "m", "name", b"kind", 1]),
        cbor2.dumps([4, "m", "name", "kind", -1]),
        cbor2.dumps([4, "m", "name", "kind", messages.MAX_TTL_MS + 1]),
        cbor2.dumps([4, "m", "name", "kind", True]),
        cbor2.dumps([5, "m", "drain"]),
        cbor2.dumps([5, "m", "drain", {}, "extra"]),
        cbor2.dumps([5, "", "drain", {}]),
        cbor2.dumps([5, "m", "", {}]),
        cbor2.dumps([5, "m", "o" * 65, {}]),
        cbor2.dumps([5, "m", 1, {}]),
        cbor2.dumps([5, "m", "drain", None]),
        cbor2.dumps([5, "m", "drain", ["a"]]),
        b"\xc1\x00",  # a tag
        b"\x9f\x01\xff",  # indefinite-length array
    ],
)
def test_malformed_routing_messages_raise_wire_error(data: bytes) -> None:
    with pytest.raises(WireError):
        messages.decode(data)


@pytest.mark.parametrize("code", [0, 6, 9, 255, 2**64 - 1, -1, -100])
def test_an_unknown_type_code_is_refused(code: int) -> None:
    with pytest.raises(WireError, match=f"^routing message: unknown type {code}$"):
        messages.decode(cbor2.dumps([code, "m", "to", "", 0, False, 1000, None]))


# Each type's name in its errors and the array lengths it accepts (type code included).
LENGTHS = {
    Kind.DELIVER: ("deliver", 8, 9),
    Kind.RESULT: ("result", 4, 4),
    Kind.SIGNAL: ("signal", 3, 3),
    Kind.ACTIVATE: ("activate", 5, 5),
    Kind.CONTROL: ("control", 4, 4),
}


def longest_example(kind: Kind) -> list[Any]:
    """The wire array of a valid message of ``kind`` with all its optional fields."""
    arrays = [cbor.loads(messages.encode(msg)) for msg in ROUND_TRIP]
    return max((a for a in arrays if a[0] == kind), key=len)


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.name)
def test_every_type_refuses_an_array_of_the_wrong_length(kind: Kind) -> None:
    what, shortest, longest = LENGTHS[kind]
    valid = longest_example(kind)
    assert len(valid) == longest
    message = f"^{what}: expected an array of {shortest}..{longest} items$"
    for size in range(1, shortest):
        with pytest.raises(WireError, match=message):
            messages.decode(cbor2.dumps(valid[:size]))
    for extra in (["x"], [None, None]):
        with pytest.raises(WireError, match=message):
            messages.decode(cbor2.dumps(valid + extra))


@settings(max_examples=examples(500), deadline=None)
@given(data=st.binary(max_size=256))
def test_fuzz_decode_only_raises_wire_error(data: bytes) -> None:
    try:
        messages.decode(data)
    except WireError:
        pass


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-5, max_value=2**64 - 1)
    | st.text(max_size=12)
    | st.binary(max_size=4)
    | st.floats(allow_nan=False)
)


@settings(max_examples=examples(500), deadline=None)
@given(
    code=st.integers(min_value=0, max_value=len(Kind) + 1),
    rest=st.lists(scalars | st.dictionaries(st.text(max_size=3), scalars), max_size=9),
)
def test_fuzz_arrays_with_a_type_code_decode_or_raise_wire_error(
    code: int, rest: list[Any]
) -> None:
    try:
        msg = messages.decode(cbor2.dumps([code, *rest]))
    except WireError:
        return
    assert messages.decode(messages.encode(msg)) == msg
