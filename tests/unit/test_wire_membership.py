"""Membership messages and compound packets: round trips and strict rejection of bad input."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from meshd.wire import membership as wire
from meshd.wire import packet
from meshd.wire.membership import (
    MAX_PUSH_PULL_MEMBERS,
    Ack,
    Alive,
    Dead,
    Left,
    MemberState,
    Message,
    MsgType,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Status,
    Suspect,
)
from meshd.wire.validate import MAX_NAME, MAX_TAG_BYTES, MAX_TAGS, MAX_UINT64, WireError

V4 = ("10.0.0.1", 7946)
V6 = ("2001:db8::1", 65535)
V4_WIRE = [bytes([10, 0, 0, 1]), 7946]

MESSAGES: list[Message] = [
    Ping(0, "a", "b"),
    Ping(MAX_UINT64, "node-1.example", "ü-ñode"),
    PingReq(7, "t", V4, "s", True),
    PingReq(8, "t", V6, "s", False),
    Ack(1),
    Ack(MAX_UINT64),
    Nack(2),
    Alive("a", 0, V4, {}),
    Alive("a", wire.MAX_INCARNATION, V6, {"role": "db", "zone": "eu-1", "": ""}),
    Suspect("a", 3, "b"),
    Dead("a", 4, "b"),
    Left("a", 5),
    PushPull(False, "a", ()),
    PushPull(
        True,
        "a",
        tuple(MemberState(f"m{s}", V4 if s % 2 else V6, s, s, {"k": str(s)}) for s in Status),
    ),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    data = wire.encode(msg)
    assert wire.decode(data) == msg
    assert wire.from_wire(cbor2.loads(data)) == msg
    assert cbor2.loads(data)[0] == msg.to_wire()[0]


def test_every_type_code_is_covered() -> None:
    codes = {wire.decode(wire.encode(m)).to_wire()[0] for m in MESSAGES}
    assert codes == set(MsgType)


def test_statuses_round_trip_as_enums() -> None:
    msg = wire.decode(wire.encode(MESSAGES[-1]))
    assert isinstance(msg, PushPull)
    assert [type(m.status) for m in msg.members] == [Status] * 4


def test_max_size_tags_and_names_are_accepted() -> None:
    tags = {f"k{i:02}": "v" for i in range(MAX_TAGS)}
    assert wire.decode(wire.encode(Alive("a" * MAX_NAME, 1, V4, tags))).tags == tags
    big = {"k": "x" * (MAX_TAG_BYTES - 1)}
    assert wire.decode(wire.encode(Alive("a", 1, V4, big))).tags == big


# ---------------------------------------------------------------------------- rejection


def good(code: MsgType) -> list[Any]:
    """A valid wire list for each type, to be broken one field at a time."""
    return {
        MsgType.PING: [1, 5, "a", "b"],
        MsgType.PING_REQ: [2, 5, "t", V4_WIRE, "s", True],
        MsgType.ACK: [3, 5],
        MsgType.NACK: [4, 5],
        MsgType.ALIVE: [5, "a", 1, V4_WIRE, {"k": "v"}],
        MsgType.SUSPECT: [6, "a", 1, "b"],
        MsgType.DEAD: [7, "a", 1, "b", False],
        MsgType.LEFT: [8, "a", 1],
        MsgType.PUSH_PULL: [9, False, "a", [["a", V4_WIRE, 1, 0, {}]]],
    }[code]


@pytest.mark.parametrize("code", list(MsgType))
def test_good_baselines_decode(code: MsgType) -> None:
    wire.from_wire(good(code))
    wire.decode(cbor2.dumps(good(code)))


def with_field(code: MsgType, index: int, value: Any) -> list[Any]:
    v = good(code)
    v[index] = value
    return v


BAD_UINTS = [-1, MAX_UINT64 + 1, 2**200, True, False, 1.0, "1", b"\x01", None, [1], {}]
BAD_NAMES = ["", "x" * (MAX_NAME + 1), "a\nb", "a\x00", "\u200b" * 2, "\x7f", 1, b"a", None, ["a"]]
BAD_ADDRS: list[Any] = [
    None,
    "10.0.0.1",
    [],
    [bytes(4)],
    [bytes(4), 1, 2],
    [bytes(3), 1],
    [bytes(5), 1],
    [bytes(15), 1],
    [bytes(17), 1],
    [bytes(4), 0],
    [bytes(4), 65536],
    [bytes(4), -1],
    [bytes(4), True],
    [bytes(4), "80"],
    [bytes(4), 80.0],
    ["10.0.0.1", 80],
    [[10, 0, 0, 1], 80],
    {"ip": bytes(4), "port": 80},
]
BAD_TAGS: list[Any] = [
    None,
    [],
    "k=v",
    {"k": 1},
    {"k": None},
    {"k": b"v"},
    {b"k": "v"},
    {"k": ["v"]},
    {f"k{i}": "" for i in range(MAX_TAGS + 1)},
    {"k": "x" * MAX_TAG_BYTES},
    {"ü": "x" * (MAX_TAG_BYTES - 1)},  # 512 characters, 513 bytes: the limit is in bytes
]

CASES: list[tuple[str, Any]] = [
    *[(f"ping.seq={v!r}", with_field(MsgType.PING, 1, v)) for v in BAD_UINTS],
    *[(f"ping.target={v!r}", with_field(MsgType.PING, 2, v)) for v in BAD_NAMES],
    *[(f"ping.source={v!r}", with_field(MsgType.PING, 3, v)) for v in BAD_NAMES],
    *[(f"ping_req.addr={v!r}", with_field(MsgType.PING_REQ, 3, v)) for v in BAD_ADDRS],
    *[(f"ping_req.nack={v!r}", with_field(MsgType.PING_REQ, 5, v)) for v in [1, 0, "t", None]],
    *[(f"ack.seq={v!r}", with_field(MsgType.ACK, 1, v)) for v in BAD_UINTS],
    *[(f"nack.seq={v!r}", with_field(MsgType.NACK, 1, v)) for v in BAD_UINTS],
    *[(f"alive.node={v!r}", with_field(MsgType.ALIVE, 1, v)) for v in BAD_NAMES],
    *[(f"alive.inc={v!r}", with_field(MsgType.ALIVE, 2, v)) for v in BAD_UINTS],
    *[(f"alive.addr={v!r}", with_field(MsgType.ALIVE, 3, v)) for v in BAD_ADDRS],
    *[(f"alive.tags={v!r}"[:60], with_field(MsgType.ALIVE, 4, v)) for v in BAD_TAGS],
    *[(f"suspect.sender={v!r}", with_field(MsgType.SUSPECT, 3, v)) for v in BAD_NAMES],
    *[(f"dead.inc={v!r}", with_field(MsgType.DEAD, 2, v)) for v in BAD_UINTS],
    *[(f"left.node={v!r}", with_field(MsgType.LEFT, 1, v)) for v in BAD_NAMES],
    ("push_pull.join=1", with_field(MsgType.PUSH_PULL, 1, 1)),
    ("push_pull.sender=''", with_field(MsgType.PUSH_PULL, 2, "")),
    ("push_pull.members=map", with_field(MsgType.PUSH_PULL, 3, {})),
    ("push_pull.member=short", with_field(MsgType.PUSH_PULL, 3, [["a", V4_WIRE, 1, 0]])),
    ("push_pull.member=long", with_field(MsgType.PUSH_PULL, 3, [["a", V4_WIRE, 1, 0, {}, 0]])),
    ("push_pull.status=4", with_field(MsgType.PUSH_PULL, 3, [["a", V4_WIRE, 1, 4, {}]])),
    ("push_pull.status=-1", with_field(MsgType.PUSH_PULL, 3, [["a", V4_WIRE, 1, -1, {}]])),
    ("push_pull.status=bool", with_field(MsgType.PUSH_PULL, 3, [["a", V4_WIRE, 1, True, {}]])),
    ("push_pull.inc=-1", with_field(MsgType.PUSH_PULL, 3, [["a", V4_WIRE, -1, 0, {}]])),
    ("push_pull.addr", with_field(MsgType.PUSH_PULL, 3, [["a", [bytes(4), 0], 1, 0, {}]])),
    ("push_pull.name", with_field(MsgType.PUSH_PULL, 3, [["a\tb", V4_WIRE, 1, 0, {}]])),
    ("push_pull.tags", with_field(MsgType.PUSH_PULL, 3, [["a", V4_WIRE, 1, 0, {"k": 1}]])),
    ("push_pull.member=map", with_field(MsgType.PUSH_PULL, 3, [{"name": "a"}])),
    ("push_pull.too_many", with_field(MsgType.PUSH_PULL, 3, [0] * (MAX_PUSH_PULL_MEMBERS + 1))),
    # Wrong lengths, for every type.
    *[(f"{c.name}.short", good(c)[:-1]) for c in MsgType],
    *[(f"{c.name}.long", [*good(c), 0]) for c in MsgType],
    # Unknown or malformed type codes.
    ("type=0", [0, 5]),
    ("type=10", [10, 5]),
    ("type=255", [255]),
    ("type=-1", [-1, 5]),
    ("type=2**64", [2**64, 5]),
    ("type=True", [True, 5]),
    ("type=1.0", [1.0, 5, "a", "b"]),
    ("type='1'", ["1", 5, "a", "b"]),
    ("type=None", [None]),
    ("empty", []),
    ("not a list: map", {"type": 1}),
    ("not a list: int", 3),
    ("not a list: str", "ping"),
    ("not a list: bytes", b"\x03\x05"),
    ("not a list: None", None),
]


@pytest.mark.parametrize("value", [v for _, v in CASES], ids=[i for i, _ in CASES])
def test_malformed_values_are_rejected(value: Any) -> None:
    with pytest.raises(WireError):
        wire.from_wire(value)


@pytest.mark.parametrize("value", [v for _, v in CASES], ids=[i for i, _ in CASES])
def test_malformed_values_are_rejected_from_bytes(value: Any) -> None:
    with pytest.raises(WireError):
        wire.decode(cbor2.dumps(value))


ALIVE_NO_TAGS = wire.encode(Alive("a", 1, V4, {}))
PING_AB = wire.encode(Ping(5, "a", "b"))
PING_REQ = wire.encode(PingReq(7, "t", V4, "s", True))


def test_indefinite_baselines_are_valid_when_definite() -> None:
    assert ALIVE_NO_TAGS.endswith(b"\xa0")
    assert PING_AB.endswith(b"\x61b")
    assert b"\x44\x0a\x00\x00\x01" in PING_REQ


@pytest.mark.parametrize(
    ("label", "data"),
    [
        ("empty", b""),
        ("truncated", wire.encode(Ping(5, "a", "b"))[:-1]),
        ("trailing bytes", wire.encode(Ack(5)) + b"\x00"),
        ("two items", wire.encode(Ack(5)) * 2),
        ("huge int (bignum tag)", cbor2.dumps([3, 2**64])),
        ("negative bignum", cbor2.dumps([3, -(2**64) - 1])),
        ("tagged message", cbor2.dumps(cbor2.CBORTag(99, [3, 5]))),
        ("tagged field", cbor2.dumps([3, cbor2.CBORTag(1, 5)])),
        ("self-describe tag", b"\xd9\xd9\xf7" + wire.encode(Ack(5))),
        ("datetime tag", cbor2.dumps([5, "a", 1, V4_WIRE, {"k": cbor2.CBORTag(0, "2020")}])),
        ("indefinite array", b"\x9f\x03\x05\xff"),
        ("indefinite map", ALIVE_NO_TAGS[:-1] + b"\xbf\xff"),
        ("indefinite text", PING_AB[:-2] + b"\x7f\x61b\xff"),
        (
            "indefinite bytes",
            PING_REQ.replace(b"\x44\x0a\x00\x00\x01", b"\x5f\x44\x0a\x00\x00\x01\xff"),
        ),
        ("non-string map key", cbor2.dumps([5, "a", 1, V4_WIRE, {1: "v"}])),
        ("invalid utf-8", b"\x84\x01\x05\x61\xff\x61b"),
        ("break outside indefinite", b"\xff"),
        ("reserved additional info", b"\x1c"),
        ("undefined type", b"\x82\xf7\x05"),
        ("float seq", cbor2.dumps([3, 5.0])),
        ("deep nesting", b"\x81" * 40 + b"\x03"),
        ("huge declared length", b"\x9b" + b"\xff" * 8),
    ],
)
def test_malformed_bytes_are_rejected(label: str, data: bytes) -> None:
    with pytest.raises(WireError):
        wire.decode(data)


def test_wire_error_is_a_value_error() -> None:
    assert issubclass(WireError, ValueError)


def test_uint_bounds_are_inclusive() -> None:
    assert wire.decode(cbor2.dumps([3, 0])) == Ack(0)
    assert wire.decode(cbor2.dumps([3, MAX_UINT64])) == Ack(MAX_UINT64)


# ---------------------------------------------------------------------------- packets


PARTS = [wire.encode(m) for m in MESSAGES[:12]]


def test_packet_round_trip() -> None:
    data = packet.build(PARTS)
    assert packet.split(data) == PARTS
    assert packet.parse(data) == MESSAGES[:12]
    assert [packet.decode_part(p) for p in PARTS] == MESSAGES[:12]


@pytest.mark.parametrize("count", [1, 23, 24, 255])
def test_packet_size_is_an_upper_bound(count: int) -> None:
    parts = [wire.encode(Ack(i)) for i in range(count)]
    assert len(packet.build(parts)) <= packet.size(parts)
    big = [wire.encode(Alive(f"n{i}" * 20, 1, V6, {"k": "v" * 200})) for i in range(count)]
    assert len(packet.build(big)) <= packet.size(big)


def test_packet_with_the_maximum_number_of_messages() -> None:
    parts = [wire.encode(Ack(i)) for i in range(packet.MAX_MESSAGES)]
    assert len(packet.parse(packet.build(parts))) == packet.MAX_MESSAGES
    with pytest.raises(WireError):
        packet.split(packet.build([*parts, wire.encode(Ack(0))]))


ACK = wire.encode(Ack(5))


@pytest.mark.parametrize(
    ("label", "data"),
    [
        ("empty packet", b""),
        ("version only", cbor2.dumps([packet.PROTOCOL_VERSION])),
        ("empty array", cbor2.dumps([])),
        ("version mismatch", cbor2.dumps([2, ACK])),
        ("version zero", cbor2.dumps([0, ACK])),
        ("version as bool", cbor2.dumps([True, ACK])),
        ("version as str", cbor2.dumps(["1", ACK])),
        ("version as float", cbor2.dumps([1.0, ACK])),
        ("missing version", cbor2.dumps([ACK])),
        ("not an array", cbor2.dumps({1: ACK})),
        ("a bare message", ACK),
        ("too many messages", cbor2.dumps([1, *([ACK] * 256)])),
        ("message as array", cbor2.dumps([1, [3, 5]])),
        ("message as str", cbor2.dumps([1, "\x82\x03\x05"])),
        ("message as int", cbor2.dumps([1, 3])),
        ("one part not bytes", cbor2.dumps([1, ACK, [3, 5]])),
        ("trailing bytes", cbor2.dumps([1, ACK]) + b"\x00"),
        ("tagged packet", cbor2.dumps(cbor2.CBORTag(55799, [1, ACK]))),
        ("indefinite packet", b"\x9f\x01" + cbor2.dumps(ACK) + b"\xff"),
    ],
)
def test_bad_packet_envelopes_are_rejected(label: str, data: bytes) -> None:
    with pytest.raises(WireError):
        packet.split(data)
    with pytest.raises(WireError):
        packet.parse(data)


def test_one_bad_message_rejects_the_whole_packet() -> None:
    bad = cbor2.dumps([3, -1])
    data = cbor2.dumps([1, ACK, bad, ACK])
    assert packet.split(data) == [ACK, bad, ACK]  # the envelope itself is fine
    with pytest.raises(WireError):
        packet.parse(data)
    with pytest.raises(WireError):
        packet.decode_part(bad)


# ---------------------------------------------------------------------------- fuzzing


plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(
            st.text(max_size=8) | st.integers() | st.binary(max_size=4), children, max_size=4
        )
    ),
    max_leaves=20,
)


@st.composite
def mutated(draw: st.DrawFn) -> list[Any]:
    """A valid message with one field (possibly nested) replaced by an arbitrary value."""
    value = good(draw(st.sampled_from(list(MsgType))))
    index = draw(st.integers(0, len(value) - 1))
    value[index] = draw(plain)
    return value


def only_wire_errors(data: bytes) -> None:
    for fn in (packet.parse, packet.split, wire.decode, packet.decode_part):
        try:
            fn(data)
        except WireError:
            pass


# Derandomized: the same examples every run (the suite must be deterministic).
FUZZ = settings(
    max_examples=examples(300),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@FUZZ
@given(st.binary(max_size=300))
@example(b"\x9b" + b"\xff" * 8)
@example(b"\x81" * 100)
@example(b"\xd8\x63\x00")
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    only_wire_errors(data)


@FUZZ
@given(plain)
def test_fuzz_arbitrary_cbor_values(value: Any) -> None:
    data = cbor2.dumps(value)
    only_wire_errors(data)
    only_wire_errors(cbor2.dumps([1, data]))


@FUZZ
@given(mutated())
def test_fuzz_mutated_messages(value: list[Any]) -> None:
    data = cbor2.dumps(value)
    only_wire_errors(data)
    only_wire_errors(cbor2.dumps([1, ACK, data]))


@FUZZ
@given(st.sampled_from(PARTS), st.integers(0, 400), st.integers(0, 255))
def test_fuzz_corrupted_packets(part: bytes, position: int, byte: int) -> None:
    data = bytearray(packet.build([part, ACK]))
    data[position % len(data)] = byte
    only_wire_errors(bytes(data))
    only_wire_errors(bytes(data[: position % len(data)]))
