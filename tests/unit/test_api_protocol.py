"""The local API protocol shared by daemon and client: framing, messages, errors, versions.

Everything here is sans-IO: the decoder is fed bytes by hand, in every chunking that matters.
"""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from meshd_client.protocol import cbor, errors, messages
from meshd_client.protocol.errors import ErrorKind, MeshError
from meshd_client.protocol.framing import (
    DEFAULT_MAX_FRAME,
    HEADER,
    FrameDecoder,
    FrameError,
    encode_frame,
)

# ---------------------------------------------------------------------------- helpers


def raw_frame(body: bytes) -> bytes:
    """A length header and ``body`` as is (for bodies encode_frame would never make)."""
    return HEADER.pack(len(body)) + body


def drain(decoder: FrameDecoder) -> list[dict[str, Any]]:
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


def decode_in_chunks(data: bytes, sizes: list[int], max_frame: int = DEFAULT_MAX_FRAME) -> list:
    """Feed ``data`` in chunks of the given sizes (cycled), draining after every chunk, like
    the daemon's and the client's read loops do."""
    decoder = FrameDecoder(max_frame)
    frames: list[dict[str, Any]] = []
    pos = 0
    i = 0
    while pos < len(data):
        size = max(1, sizes[i % len(sizes)]) if sizes else len(data)
        decoder.feed(data[pos : pos + size])
        pos += size
        i += 1
        frames.extend(drain(decoder))
    return frames


SAMPLES: list[dict[str, Any]] = [
    messages.hello("test/1"),
    messages.request(1, "members", {"status": "alive"}),
    messages.request(2**63 - 1, "state.get", {"doc": "x", "path": ["a", 0]}),
    messages.cancel(7),
    messages.ok(3, {"nested": [1, 2.5, None, True, b"\x00\xff", "é"]}),
    messages.event(4, {"kind": "join"}),
    messages.end(4),
    messages.failed(None, errors.Invalid("nope")),
    {"t": "res", "id": 9, "ok": True, "value": "x" * 70_000},  # bigger than one read
]


# ---------------------------------------------------------------------------- framing


def test_encode_frame_is_a_big_endian_length_and_a_cbor_map() -> None:
    frame = encode_frame({"t": "cancel", "id": 1})
    body = cbor.dumps({"t": "cancel", "id": 1})
    assert frame[:4] == len(body).to_bytes(4, "big")
    assert frame[4:] == body


def test_frames_round_trip_fed_whole() -> None:
    data = b"".join(encode_frame(m) for m in SAMPLES)
    decoder = FrameDecoder()
    decoder.feed(data)
    assert drain(decoder) == SAMPLES
    assert decoder.buffered == 0


def test_frames_round_trip_fed_byte_by_byte() -> None:
    frame = encode_frame(messages.request(5, "info", {"a": [1, 2, 3]}))
    decoder = FrameDecoder()
    for i, byte in enumerate(frame):
        assert decoder.next_frame() is None, "a frame came out before its last byte"
        decoder.feed(bytes([byte]))
        assert decoder.buffered == i + 1
    assert decoder.next_frame() == messages.request(5, "info", {"a": [1, 2, 3]})
    assert decoder.next_frame() is None
    assert decoder.buffered == 0


def test_every_sample_survives_byte_by_byte_feeding() -> None:
    data = b"".join(encode_frame(m) for m in SAMPLES[:-1])
    assert decode_in_chunks(data, [1]) == SAMPLES[:-1]


def test_several_frames_in_one_chunk_and_a_frame_split_across_chunks() -> None:
    a, b, c = (encode_frame(messages.request(i, "op", {"i": i})) for i in (1, 2, 3))
    decoder = FrameDecoder()
    decoder.feed(a + b + c[:3])  # two whole frames and part of the third header
    assert drain(decoder) == [
        messages.request(1, "op", {"i": 1}),
        messages.request(2, "op", {"i": 2}),
    ]
    assert decoder.buffered == 3
    decoder.feed(c[3:10])
    assert decoder.next_frame() is None
    decoder.feed(c[10:])
    assert drain(decoder) == [messages.request(3, "op", {"i": 3})]


@pytest.mark.parametrize("sizes", [[1], [2], [3], [5], [7, 1, 13], [4096], [65536]])
def test_any_chunking_gives_the_same_frames(sizes: list[int]) -> None:
    data = b"".join(encode_frame(m) for m in SAMPLES)
    assert decode_in_chunks(data, sizes) == SAMPLES


def test_frame_of_exactly_the_limit_is_accepted() -> None:
    value = {"v": "x" * 100}
    body = cbor.dumps(value)
    decoder = FrameDecoder(max_frame=len(body))
    decoder.feed(encode_frame(value, max_frame=len(body)))
    assert decoder.next_frame() == value
    with pytest.raises(FrameError):
        encode_frame(value, max_frame=len(body) - 1)


def test_encode_refuses_an_oversized_frame() -> None:
    with pytest.raises(FrameError, match="exceeds"):
        encode_frame({"v": "x" * DEFAULT_MAX_FRAME})


def test_oversized_frame_rejected_from_the_header_alone() -> None:
    decoder = FrameDecoder(max_frame=1000)
    with pytest.raises(FrameError, match="exceeds"):
        decoder.feed(HEADER.pack(1001))
    # Nothing beyond the header was ever taken in: the body is never buffered.
    assert decoder.buffered == HEADER.size


def test_oversized_header_fed_byte_by_byte_fails_on_its_last_byte() -> None:
    decoder = FrameDecoder()
    header = HEADER.pack(DEFAULT_MAX_FRAME + 1)
    for byte in header[:-1]:
        decoder.feed(bytes([byte]))
        assert decoder.next_frame() is None
    with pytest.raises(FrameError):
        decoder.feed(header[-1:])


def test_huge_declared_length_rejected_before_any_body() -> None:
    decoder = FrameDecoder()
    with pytest.raises(FrameError):
        decoder.feed(b"\xff\xff\xff\xff" + b"\x00" * 10)
    assert decoder.buffered <= 14


def test_oversized_frame_after_a_good_one_is_rejected_without_its_body() -> None:
    good = encode_frame(messages.cancel(1))
    decoder = FrameDecoder(max_frame=100)
    decoder.feed(good + HEADER.pack(101))  # the body of the second frame never comes
    with pytest.raises(FrameError, match="exceeds"):
        while decoder.next_frame() is not None:
            pass
    assert decoder.buffered <= HEADER.size


@pytest.mark.parametrize(
    "body",
    [
        cbor.dumps([1, 2, 3]),
        cbor.dumps("hello"),
        cbor.dumps(42),
        cbor.dumps(None),
        cbor.dumps(b"bytes"),
    ],
    ids=["array", "text", "int", "null", "bytes"],
)
def test_a_frame_must_hold_a_map(body: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(raw_frame(body))
    with pytest.raises(FrameError, match="map"):
        decoder.next_frame()


@pytest.mark.parametrize(
    "body",
    [
        b"",  # empty frame
        b"\xff",  # a lone break code
        b"\xa1",  # a map header and nothing else
        b"\xa1\x61a",  # map with a key and no value
        b"\xa1\x01\x02",  # integer map key
        b"\xbf\xff",  # indefinite-length map
        b"\xc1\x00",  # a tag (epoch datetime)
        cbor2.dumps({"a": 1}) + b"\x00",  # trailing bytes inside the frame
        b"\x1f",  # reserved additional information
        b"\xa2\x61a\x01\x61a\x02",  # duplicate keys
    ],
    ids=[
        "empty",
        "break",
        "truncated-map",
        "missing-value",
        "int-key",
        "indefinite",
        "tag",
        "trailing",
        "reserved",
        "duplicate-keys",
    ],
)
def test_garbage_cbor_is_a_frame_error(body: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(raw_frame(body))
    with pytest.raises(FrameError):
        decoder.next_frame()


def test_deeply_nested_frame_is_refused() -> None:
    value: Any = "leaf"
    for _ in range(cbor.MAX_DEPTH + 5):
        value = [value]
    decoder = FrameDecoder()
    decoder.feed(raw_frame(cbor2.dumps({"v": value})))
    with pytest.raises(FrameError):
        decoder.next_frame()


chunkings = st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=8)


@settings(max_examples=examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=512), sizes=chunkings)
def test_fuzz_arbitrary_bytes_only_raise_frame_error(data: bytes, sizes: list[int]) -> None:
    try:
        decode_in_chunks(data, sizes, max_frame=4096)
    except FrameError:
        pass


@settings(max_examples=examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bodies=st.lists(st.binary(max_size=64), min_size=1, max_size=6),
    tail=st.binary(max_size=16),
    sizes=chunkings,
)
def test_fuzz_well_framed_garbage_only_raises_frame_error(
    bodies: list[bytes], tail: bytes, sizes: list[int]
) -> None:
    """Random bodies behind correct headers reach the CBOR decoder (random headers mostly
    declare oversized frames and stop at the header)."""
    data = b"".join(raw_frame(b) for b in bodies) + tail
    try:
        frames = decode_in_chunks(data, sizes, max_frame=4096)
    except FrameError:
        return
    assert all(isinstance(f, dict) for f in frames)


plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=examples(200), deadline=None)
@given(
    frames=st.lists(st.dictionaries(st.text(max_size=8), plain_values, max_size=4), max_size=5),
    sizes=chunkings,
)
def test_fuzz_valid_frames_round_trip_in_any_chunking(
    frames: list[dict[str, Any]], sizes: list[int]
) -> None:
    data = b"".join(encode_frame(f) for f in frames)
    assert decode_in_chunks(data, sizes) == frames


# ---------------------------------------------------------------------------- builders


def test_client_builders() -> None:
    assert messages.hello("meshctl") == {"t": "hello", "versions": [1], "client": "meshctl"}
    assert messages.request(3, "info", {}) == {"t": "req", "id": 3, "op": "info", "args": {}}
    assert messages.cancel(3) == {"t": "cancel", "id": 3}


def test_daemon_builders() -> None:
    assert messages.hello_reply(1, "n1", "meshd/0.1.0") == {
        "t": "hello",
        "version": 1,
        "node": "n1",
        "daemon": "meshd/0.1.0",
    }
    assert messages.ok(4, [1]) == {"t": "res", "id": 4, "ok": True, "value": [1]}
    assert messages.ok(4, None) == {"t": "res", "id": 4, "ok": True, "value": None}
    err = errors.NotFound("no such agent", detail={"name": "x"})
    assert messages.failed(4, err) == {
        "t": "res",
        "id": 4,
        "ok": False,
        "error": {"kind": "not_found", "message": "no such agent", "detail": {"name": "x"}},
    }
    assert messages.failed(None, errors.Invalid("bad"))["id"] is None
    assert messages.event(5, {"k": 1}) == {"t": "evt", "id": 5, "event": {"k": 1}}
    assert messages.end(5) == {"t": "end", "id": 5, "error": None}
    assert messages.end(5, errors.Overloaded("slow")) == {
        "t": "end",
        "id": 5,
        "error": {"kind": "overloaded", "message": "slow", "detail": {}},
    }


def test_client_builders_parse_back_after_framing() -> None:
    frames = [messages.hello("c/1"), messages.request(9, "members", {"x": 1}), messages.cancel(9)]
    decoder = FrameDecoder()
    decoder.feed(b"".join(encode_frame(f) for f in frames))
    parsed = [messages.parse_client_frame(f) for f in drain(decoder)]
    assert parsed == [
        messages.Hello((1,), "c/1"),
        messages.Request(9, "members", {"x": 1}),
        messages.Cancel(9),
    ]


# ---------------------------------------------------------------------------- parse_client_frame


def test_parse_request() -> None:
    assert messages.parse_client_frame({"t": "req", "id": 0, "op": "x", "args": {"a": 1}}) == (
        messages.Request(0, "x", {"a": 1})
    )


def test_parse_request_args_default_to_an_empty_map() -> None:
    assert messages.parse_client_frame({"t": "req", "id": 1, "op": "info"}) == messages.Request(
        1, "info", {}
    )


def test_parse_request_id_limits() -> None:
    top = messages.MAX_REQUEST_ID
    assert messages.parse_client_frame({"t": "req", "id": top, "op": "x"}).id == top  # type: ignore[union-attr]
    op = "o" * messages.MAX_OP_LENGTH
    assert messages.parse_client_frame({"t": "req", "id": 1, "op": op}) == messages.Request(
        1, op, {}
    )


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ({"t": "req", "op": "x"}, "request id"),
        ({"t": "req", "id": None, "op": "x"}, "request id"),
        ({"t": "req", "id": -1, "op": "x"}, "request id"),
        ({"t": "req", "id": 2**63, "op": "x"}, "request id"),
        ({"t": "req", "id": 1.0, "op": "x"}, "request id"),
        ({"t": "req", "id": True, "op": "x"}, "request id"),
        ({"t": "req", "id": "1", "op": "x"}, "request id"),
        ({"t": "req", "id": 1}, "op"),
        ({"t": "req", "id": 1, "op": ""}, "op"),
        ({"t": "req", "id": 1, "op": 5}, "op"),
        ({"t": "req", "id": 1, "op": b"info"}, "op"),
        ({"t": "req", "id": 1, "op": "o" * (messages.MAX_OP_LENGTH + 1)}, "op"),
        ({"t": "req", "id": 1, "op": "x", "args": []}, "args"),
        ({"t": "req", "id": 1, "op": "x", "args": None}, "args"),
        ({"t": "req", "id": 1, "op": "x", "args": "a=1"}, "args"),
        ({"t": "cancel"}, "request id"),
        ({"t": "cancel", "id": -5}, "request id"),
        ({"t": "cancel", "id": "7"}, "request id"),
        ({"t": "cancel", "id": False}, "request id"),
        ({"t": "hello"}, "versions"),
        ({"t": "hello", "versions": []}, "versions"),
        ({"t": "hello", "versions": 1}, "versions"),
        ({"t": "hello", "versions": [1, "2"]}, "versions"),
        ({"t": "hello", "versions": [1.0]}, "versions"),
        ({"t": "hello", "versions": [True]}, "versions"),
        ({"t": "hello", "versions": list(range(17))}, "versions"),
        ({"t": "hello", "versions": [1], "client": 5}, "client"),
        ({"t": "hello", "versions": [1], "client": "c" * 129}, "client"),
        ({"t": "hello", "versions": [1], "client": None}, "client"),
        ({"t": "res", "id": 1}, "unknown frame type"),
        ({"t": "evt", "id": 1}, "unknown frame type"),
        ({"t": 1, "id": 1}, "unknown frame type"),
        ({"id": 1, "op": "x"}, "unknown frame type"),
        ({}, "unknown frame type"),
    ],
)
def test_parse_client_frame_rejects(frame: dict[str, Any], reason: str) -> None:
    with pytest.raises(errors.Invalid, match=reason) as caught:
        messages.parse_client_frame(frame)
    assert caught.value.kind is ErrorKind.INVALID


def test_parse_hello() -> None:
    assert messages.parse_client_frame({"t": "hello", "versions": [1, 2], "client": "x"}) == (
        messages.Hello((1, 2), "x")
    )
    assert messages.parse_client_frame({"t": "hello", "versions": [3]}) == messages.Hello((3,), "")
    assert messages.parse_client_frame(
        {"t": "hello", "versions": list(range(16)), "client": "c" * 128}
    ) == messages.Hello(tuple(range(16)), "c" * 128)


def test_parse_cancel() -> None:
    assert messages.parse_client_frame({"t": "cancel", "id": 0}) == messages.Cancel(0)


# ---------------------------------------------------------------------------- versions


def test_negotiate_picks_the_highest_common_version() -> None:
    assert messages.negotiate((1,)) == 1
    assert messages.negotiate((1, 2, 3)) == 1
    assert messages.negotiate((3, 2, 1)) == max(set(messages.SUPPORTED_VERSIONS) & {1, 2, 3})


def test_negotiate_without_a_common_version() -> None:
    assert messages.negotiate((2, 3)) is None
    assert messages.negotiate((0,)) is None
    assert messages.negotiate(()) is None


def test_the_client_offers_every_supported_version() -> None:
    hello = messages.parse_client_frame(messages.hello("x"))
    assert isinstance(hello, messages.Hello)
    assert messages.negotiate(hello.versions) == messages.API_VERSION


# ---------------------------------------------------------------------------- errors

ALL_CLASSES = [
    errors.NotFound,
    errors.Unreachable,
    errors.Timeout,
    errors.Conflict,
    errors.Invalid,
    errors.Unauthorized,
    errors.Overloaded,
    errors.Closed,
    errors.Internal,
]


def test_every_kind_has_exactly_one_class() -> None:
    assert {cls.kind for cls in ALL_CLASSES} == set(ErrorKind)
    for cls in ALL_CLASSES:
        assert errors.error_class(cls.kind) is cls
        assert issubclass(cls, MeshError)


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_every_error_round_trips_through_the_wire(cls: type[MeshError]) -> None:
    original = cls("what happened", detail={"host": "n2", "n": [1, 2]})
    # Through a real frame, as it travels.
    decoder = FrameDecoder()
    decoder.feed(encode_frame(messages.failed(3, original)))
    frame = decoder.next_frame()
    assert frame is not None
    back = errors.error_from_wire(frame["error"])
    assert type(back) is cls
    assert back.kind is cls.kind
    assert back.message == "what happened"
    assert back.detail == {"host": "n2", "n": [1, 2]}
    assert str(back) == "what happened"


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_errors_in_stream_ends_round_trip(cls: type[MeshError]) -> None:
    frame = messages.end(1, cls("x"))
    assert type(errors.error_from_wire(frame["error"])) is cls


def test_error_without_detail_has_an_empty_detail() -> None:
    assert errors.NotFound("x").to_wire() == {"kind": "not_found", "message": "x", "detail": {}}
    assert errors.error_from_wire({"kind": "timeout", "message": "m"}).detail == {}


@pytest.mark.parametrize(
    "value",
    [
        None,
        "not_found",
        42,
        [{"kind": "not_found"}],
        {},
        {"kind": "no_such_kind", "message": "m"},
        {"kind": 3, "message": "m"},
        {"kind": None, "message": "m"},
        {"kind": "NOT_FOUND", "message": "m"},
        {"message": "m"},
    ],
)
def test_malformed_errors_become_internal(value: Any) -> None:
    error = errors.error_from_wire(value)
    assert type(error) is errors.Internal
    assert isinstance(error.message, str)
    assert isinstance(error.detail, dict)


def test_malformed_fields_of_a_known_kind_are_replaced() -> None:
    error = errors.error_from_wire({"kind": "conflict", "message": 5, "detail": [1]})
    assert type(error) is errors.Conflict
    assert error.message == "conflict"
    assert error.detail == {}


def test_error_repr_names_the_class() -> None:
    assert repr(errors.Unreachable("gone")) == "Unreachable('gone')"


def test_a_good_frame_before_an_oversized_header_is_still_delivered() -> None:
    decoder = FrameDecoder(max_frame=64)
    good = encode_frame({"t": "req", "id": 1, "op": "info", "args": {}})
    decoder.feed(good + HEADER.pack(1 << 20))
    assert decoder.next_frame() == {"t": "req", "id": 1, "op": "info", "args": {}}
    with pytest.raises(FrameError, match="exceeds"):
        decoder.next_frame()
