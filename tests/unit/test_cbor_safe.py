"""The client's safe CBOR codec: plain values only, everything else refused as CodecError."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from meshd_client.protocol import cbor
from meshd_client.protocol.cbor import MAX_DEPTH, CodecError

PLAIN: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**64 - 1,
    -(2**64),
    1.5,
    float("inf"),
    "",
    "text ü",
    b"",
    b"\x00\xff",
    [],
    [1, [2, [3]]],
    {},
    {"a": 1, "b": [None, {"c": b"x"}]},
]


@pytest.mark.parametrize("value", PLAIN, ids=repr)
def test_plain_values_round_trip(value: Any) -> None:
    assert cbor.loads(cbor.dumps(value)) == value


def test_nan_round_trips() -> None:
    value = cbor.loads(cbor.dumps(float("nan")))
    assert value != value


def test_codec_error_is_a_value_error() -> None:
    assert issubclass(CodecError, ValueError)


def test_dumps_wraps_encoder_errors() -> None:
    with pytest.raises(CodecError):
        cbor.dumps(object())
    with pytest.raises(CodecError):
        cbor.dumps([1, {2, object()}])


# ---------------------------------------------------------------------------- tags


@pytest.mark.parametrize(
    "data",
    [
        cbor2.dumps(cbor2.CBORTag(0, "2020-01-01T00:00:00Z")),  # datetime string
        cbor2.dumps(cbor2.CBORTag(1, 0)),  # epoch datetime
        cbor2.dumps(2**64),  # bignum (tag 2)
        cbor2.dumps(-(2**64) - 1),  # negative bignum (tag 3)
        cbor2.dumps(cbor2.CBORTag(4, [-2, 27315])),  # decimal fraction
        cbor2.dumps(cbor2.CBORTag(35, "a+")),  # regular expression
        cbor2.dumps(cbor2.CBORTag(36, "Subject: x\n\nbody")),  # MIME message
        cbor2.dumps(cbor2.CBORTag(37, bytes(16))),  # UUID
        cbor2.dumps(cbor2.CBORTag(258, [1, 2])),  # set
        cbor2.dumps(cbor2.CBORTag(28, [1])),  # shareable
        cbor2.dumps([cbor2.CBORTag(28, [1]), cbor2.CBORTag(29, 0)]),  # shared reference
        b"\xd9\xd9\xf7\x01",  # self-described CBOR
        cbor2.dumps(cbor2.CBORTag(99, 1)),  # an unknown tag
        cbor2.dumps(cbor2.CBORTag(2**40, 1)),  # a huge unknown tag
        cbor2.dumps({"k": [1, cbor2.CBORTag(1, 0)]}),  # nested deep inside
    ],
)
def test_tags_are_refused(data: bytes) -> None:
    with pytest.raises(CodecError):
        cbor.loads(data)
    with pytest.raises(CodecError):
        cbor.loads_sequence(data, 10)
    with pytest.raises(CodecError):
        cbor.split_sequence(data, 10)


# ---------------------------------------------------------------------------- indefinite


@pytest.mark.parametrize(
    "data",
    [
        b"\x9f\xff",  # indefinite array
        b"\x9f\x01\x02\xff",
        b"\xbf\xff",  # indefinite map
        b"\xbf\x61a\x01\xff",
        b"\x5f\xff",  # indefinite byte string
        b"\x5f\x41a\x41b\xff",
        b"\x7f\xff",  # indefinite text string
        b"\x7f\x61a\x61b\xff",
        b"\x82\x01\x9f\xff",  # nested
    ],
)
def test_indefinite_lengths_are_refused(data: bytes) -> None:
    with pytest.raises(CodecError):
        cbor.loads(data)
    with pytest.raises(CodecError):
        cbor.split_sequence(data, 10)


# ---------------------------------------------------------------------------- map keys


@pytest.mark.parametrize(
    "data",
    [
        b"\xa1\x01\x01",  # int key
        b"\xa1\x20\x01",  # negative int key
        b"\xa1\xf5\x01",  # bool key
        b"\xa1\xf6\x01",  # null key
        b"\xa1\xf9\x3c\x00\x01",  # float key
        b"\xa1\x81\x01\x01",  # array key
        b"\xa1\xa0\x01",  # map key
        b"\x81\xa1\x01\x01",  # nested
    ],
)
def test_non_string_keys_are_refused(data: bytes) -> None:
    with pytest.raises(CodecError):
        cbor.loads(data)


# ---------------------------------------------------------------------------- depth


def nested(depth: int, container: bytes = b"\x81") -> bytes:
    return container * depth + b"\x00"


def test_nesting_up_to_the_limit_is_accepted() -> None:
    value = cbor.loads(nested(MAX_DEPTH))
    for _ in range(MAX_DEPTH):
        assert isinstance(value, list)
        value = value[0]
    assert value == 0


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 100, 100_000])
def test_deeper_nesting_is_refused(depth: int) -> None:
    with pytest.raises(CodecError):
        cbor.loads(nested(depth))
    with pytest.raises(CodecError):
        cbor.split_sequence(nested(depth), 1)


def test_depth_limit_counts_maps_too() -> None:
    assert cbor.loads(nested(MAX_DEPTH, b"\xa1\x61k")) is not None
    with pytest.raises(CodecError):
        cbor.loads(nested(MAX_DEPTH + 1, b"\xa1\x61k"))


# ---------------------------------------------------------------------------- framing


def test_trailing_bytes_are_refused() -> None:
    with pytest.raises(CodecError, match="trailing"):
        cbor.loads(cbor.dumps([1, 2]) + b"\x00")
    with pytest.raises(CodecError):
        cbor.loads(cbor.dumps("x") * 2)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x18",  # truncated uint
        b"\x82\x01",  # truncated array
        b"\x62a",  # truncated text
        b"\x5b" + b"\xff" * 8,  # absurd declared length
        b"\x9b" + b"\xff" * 8,
        b"\x62\xff\xfe",  # invalid UTF-8
        b"\xff",  # lone break
        b"\x1c",  # reserved additional information
    ],
)
def test_malformed_input_is_a_codec_error(data: bytes) -> None:
    with pytest.raises(CodecError):
        cbor.loads(data)


def test_split_sequence_returns_each_items_exact_bytes() -> None:
    items = [1, [1, 2], "a", {"k": b"v"}, None]
    encoded = [cbor.dumps(i) for i in items]
    data = b"".join(encoded)
    assert cbor.split_sequence(data, 10) == list(zip(items, encoded, strict=True))
    assert cbor.loads_sequence(data, 10) == items


def test_sequences_of_nothing() -> None:
    assert cbor.split_sequence(b"", 10) == []
    assert cbor.loads_sequence(b"", 10) == []


def test_sequences_are_bounded() -> None:
    data = cbor.dumps(1) * 4
    assert len(cbor.split_sequence(data, 4)) == 4
    with pytest.raises(CodecError):
        cbor.split_sequence(data, 3)
    with pytest.raises(CodecError):
        cbor.loads_sequence(data, 3)


def test_truncated_last_item_in_a_sequence_is_refused() -> None:
    data = cbor.dumps([1, 2]) + cbor.dumps([3, 4])[:-1]
    with pytest.raises(CodecError):
        cbor.split_sequence(data, 10)
    with pytest.raises(CodecError):
        cbor.loads_sequence(data, 10)


@settings(max_examples=examples(200), deadline=None, derandomize=True, database=None)
@given(st.binary(max_size=200))
def test_fuzz_only_codec_errors(data: bytes) -> None:
    decoders: list[Callable[[bytes], object]] = [
        cbor.loads,
        lambda d: cbor.split_sequence(d, 8),
        lambda d: cbor.loads_sequence(d, 8),
    ]
    for decode in decoders:
        try:
            decode(data)
        except CodecError:
            pass


@settings(max_examples=examples(100), deadline=None, derandomize=True, database=None)
@given(
    st.lists(
        st.integers(-(2**64), 2**64 - 1) | st.text(max_size=5) | st.binary(max_size=5),
        max_size=8,
    )
)
def test_split_sequence_reassembles(items: list[Any]) -> None:
    data = b"".join(cbor2.dumps(i) for i in items)
    pairs = cbor.split_sequence(data, 100)
    assert [v for v, _ in pairs] == items
    assert b"".join(raw for _, raw in pairs) == data
