"""State vectors (lib0 v1): decoding real and hand-made vectors, has_news, strict rejection."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples
from pycrdt import Doc, Map
from replication_helpers import encode_vector, varuint

from meshd.replication import vectors
from meshd.replication.vectors import MAX_CLIENTS, VectorError

CLIENTS = st.integers(min_value=0, max_value=2**53)
CLOCKS = st.integers(min_value=0, max_value=2**32)


def test_empty_vector() -> None:
    assert vectors.decode(b"\x00") == {}
    assert vectors.decode(Doc().get_state()) == {}


def test_decodes_a_real_document_state() -> None:
    a: Doc[Map[int]] = Doc(client_id=7)
    b: Doc[Map[int]] = Doc(client_id=300)
    with a.transaction():
        root = a.get("root", type=Map)
        root["x"] = 1
        root["y"] = 2
    b.apply_update(a.get_update())
    with b.transaction():
        b.get("root", type=Map)["z"] = 3
    assert vectors.decode(a.get_state()) == {7: 2}
    assert vectors.decode(b.get_state()) == {7: 2, 300: 1}


@given(st.dictionaries(CLIENTS, CLOCKS, max_size=20))
@settings(max_examples=examples(200), derandomize=True)
def test_round_trip(vector: dict[int, int]) -> None:
    assert vectors.decode(encode_vector(vector)) == vector


def test_large_varuints() -> None:
    vector = {2**53 - 1: 2**40, 0: 0, 127: 128, 128: 16383, 16384: 1}
    assert vectors.decode(encode_vector(vector)) == vector


@pytest.mark.parametrize(
    ("mine", "theirs", "expected"),
    [
        ({}, {}, False),
        ({1: 5}, {1: 5}, False),
        ({1: 5}, {1: 4}, True),
        ({1: 4}, {1: 5}, False),
        ({1: 5}, {}, True),
        ({}, {1: 5}, False),
        ({1: 5, 2: 1}, {1: 9}, True),  # a client they never heard of
        ({1: 5, 2: 0}, {1: 5}, False),  # a zero clock is nothing
        ({1: 3, 2: 9}, {1: 4, 2: 8}, True),  # concurrent: each has news for the other
        ({1: 4, 2: 8}, {1: 3, 2: 9}, True),
    ],
)
def test_has_news(mine: dict[int, int], theirs: dict[int, int], expected: bool) -> None:
    assert vectors.has_news(mine, theirs) is expected


def test_has_news_matches_documents() -> None:
    a: Doc[Map[int]] = Doc(client_id=1)
    b: Doc[Map[int]] = Doc(client_id=2)
    with a.transaction():
        a.get("root", type=Map)["x"] = 1
    va, vb = vectors.decode(a.get_state()), vectors.decode(b.get_state())
    assert vectors.has_news(va, vb)
    assert not vectors.has_news(vb, va)
    b.apply_update(a.get_update(b.get_state()))
    vb = vectors.decode(b.get_state())
    assert not vectors.has_news(va, vb)
    assert not vectors.has_news(vb, va)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "truncated"),
        (b"\x01", "truncated"),  # one client announced, none present
        (b"\x01\x05", "truncated"),  # client without a clock
        (b"\x02\x05\x01\x06", "truncated"),  # second pair missing
        (b"\x80", "truncated"),  # continuation bit, then nothing
        (b"\x01\x85", "truncated"),  # client varuint cut in the middle
        (b"\x01\x05\x81\x82", "truncated"),  # clock varuint cut in the middle
        (b"\x00\x00", "trailing"),
        (b"\x01\x05\x01\xff", "trailing"),
        (b"\x80" * 10 + b"\x01", "too long"),  # 11 bytes: beyond 64 bits
        (b"\x01" + b"\xff" * 10 + b"\x01\x01", "too long"),
        (varuint(MAX_CLIENTS + 1), "too many clients"),
        (varuint(2**40) + b"\x01\x01", "too many clients"),
    ],
)
def test_malformed_vectors_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(VectorError, match=reason):
        vectors.decode(data)


def test_client_count_limit_is_checked_before_reading_pairs() -> None:
    # At the limit the count is accepted (and then the missing pairs are the problem).
    with pytest.raises(VectorError, match="truncated"):
        vectors.decode(varuint(MAX_CLIENTS))
    # A vector that really holds MAX_CLIENTS clients is fine.
    full = {i: 1 for i in range(MAX_CLIENTS)}
    assert len(vectors.decode(encode_vector(full))) == MAX_CLIENTS


def test_vector_error_is_a_value_error() -> None:
    assert issubclass(VectorError, ValueError)


@given(st.binary(max_size=64))
@settings(max_examples=examples(500), derandomize=True)
def test_arbitrary_bytes_decode_or_raise_vector_error(data: bytes) -> None:
    try:
        decoded = vectors.decode(data)
    except VectorError:
        return
    # Whatever decodes re-encodes to a vector that decodes the same.
    assert vectors.decode(encode_vector(decoded)) == decoded


@given(st.dictionaries(CLIENTS, CLOCKS, max_size=20))
@settings(max_examples=examples(200), derandomize=True)
def test_canonical_encoding(vector: dict[int, int]) -> None:
    encoded = vectors.encode(vector)
    nonzero = {c: k for c, k in vector.items() if k > 0}
    assert vectors.decode(encoded) == nonzero
    # Insertion order does not matter, and neither do zero clocks.
    assert vectors.encode(dict(reversed(list(vector.items())))) == encoded
    assert encoded == encode_vector(dict(sorted(nonzero.items())))


def test_canonical_encoding_of_a_document_state() -> None:
    assert vectors.encode({}) == b"\x00"
    assert vectors.encode({5: 0}) == b"\x00"
    assert vectors.encode({300: 1, 7: 2}) == b"\x02\x07\x02\xac\x02\x01"
