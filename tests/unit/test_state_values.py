"""State document values and operations: every op, its errors, atomicity, numbers, merging."""

from __future__ import annotations

import logging
import random
from typing import Any

import pytest
import trio
from pycrdt import Map
from replication_helpers import QUIET, content, edit, marked

from meshd.replication.core import Replicator
from meshd.replication.driver import ReplicationDriver
from meshd.replication.replica import Replica
from meshd.state import values
from meshd.state.service import StateService
from meshd_client.protocol import errors

MAX = values.MAX_SAFE_INT


def doc_with(value: dict[str, Any]) -> Replica:
    replica = Replica("state/t", 0)
    if value:
        edit(replica, [{"op": "set", "path": [k], "value": v} for k, v in value.items()])
    return replica


def apply(replica: Replica, *ops: dict[str, Any]) -> Any:
    edit(replica, list(ops))
    return content(replica)


def remote_copy(replica: Replica) -> Replica:
    copy = Replica(replica.name, replica.epoch)
    copy.apply(replica.full_update())
    return copy


def sync(a: Replica, b: Replica) -> None:
    b.apply(a.full_update())
    a.apply(b.full_update())


def fails(replica: Replica, kind: type[errors.MeshError], *ops: dict[str, Any]) -> None:
    before = (content(replica), replica.vector, bytes(replica.doc.get_update()))
    with pytest.raises(kind) as info:
        edit(replica, list(ops))
    assert type(info.value) is kind
    assert (content(replica), replica.vector, bytes(replica.doc.get_update())) == before


# ---------------------------------------------------------------------- set


def test_set_values_of_every_kind() -> None:
    r = doc_with({})
    value = {
        "none": None,
        "bool": True,
        "int": 42,
        "neg": -7,
        "float": 2.5,
        "str": "hé 😀",
        "bytes": b"\x00\xff",
        "list": [1, "two", [3], {"four": 4}],
        "map": {"nested": {"deep": [True]}},
    }
    assert apply(r, {"op": "set", "path": ["v"], "value": value}) == {"v": value}
    assert content(remote_copy(r)) == {"v": value}


def test_set_nested_paths_and_list_elements() -> None:
    r = doc_with({"m": {"a": 1}, "l": [10, 20, 30]})
    apply(r, {"op": "set", "path": ["m", "b"], "value": 2})
    apply(r, {"op": "set", "path": ["l", 1], "value": "twenty"})
    apply(r, {"op": "set", "path": ["l", -1], "value": "last"})
    assert content(r) == {"m": {"a": 1, "b": 2}, "l": [10, "twenty", "last"]}
    assert content(remote_copy(r)) == content(r)
    assert values.read(r.doc, ["m", "b"]) == 2
    assert values.read(r.doc, ["l", 0]) == 10


def test_set_errors() -> None:
    r = doc_with({"m": {"a": 1}, "l": [1], "n": 5})
    fails(r, errors.Invalid, {"op": "set", "path": [], "value": 1})
    fails(r, errors.NotFound, {"op": "set", "path": ["missing", "x"], "value": 1})
    fails(r, errors.Invalid, {"op": "set", "path": ["n", "x"], "value": 1})  # into a number
    fails(r, errors.Invalid, {"op": "set", "path": ["m", 0], "value": 1})  # index into a map
    fails(r, errors.Invalid, {"op": "set", "path": ["l", "k"], "value": 1})  # key into a list
    fails(r, errors.NotFound, {"op": "set", "path": ["l", 1], "value": 1})
    fails(r, errors.NotFound, {"op": "set", "path": ["l", -2], "value": 1})
    fails(r, errors.Invalid, {"op": "set", "path": ["$x"], "value": 1})
    fails(r, errors.Invalid, {"op": "set", "path": ["m", "$counter"], "value": 1})
    fails(r, errors.Invalid, {"op": "set", "path": ["k"], "value": {"$x": 1}})
    fails(r, errors.Invalid, {"op": "set", "path": ["k"], "value": {"$counter": 1, "a": 2}})
    fails(r, errors.Invalid, {"op": "set", "path": ["k"], "value": {1: "non-string key"}})
    fails(r, errors.Invalid, {"op": "set", "path": ["k"], "value": {"$counter": 1.5}})
    fails(r, errors.Invalid, {"op": "set", "path": ["k"], "value": {"$counter": True}})
    fails(r, errors.Invalid, {"op": "set", "path": ["k"], "value": {"$text": 5}})
    fails(r, errors.Invalid, {"op": "set", "path": ["k"], "value": {1, 2}})
    fails(r, errors.Invalid, {"op": "set", "path": ["k"], "value": (1, 2)})
    fails(r, errors.Invalid, {"op": "set", "path": ["k"], "value": object()})
    fails(r, errors.Invalid, {"op": "set", "path": ["k"], "value": MAX + 1})
    fails(r, errors.Invalid, {"op": "set", "path": ["k"], "value": [1, -(MAX + 1)]})


# ---------------------------------------------------------------------- delete


def test_delete() -> None:
    r = doc_with({"a": 1, "m": {"x": 1, "y": 2}, "l": [1, 2, 3]})
    apply(r, {"op": "delete", "path": ["a"]})
    apply(r, {"op": "delete", "path": ["m", "x"]})
    apply(r, {"op": "delete", "path": ["l", 0]})
    apply(r, {"op": "delete", "path": ["l", -1]})
    assert content(r) == {"m": {"y": 2}, "l": [2]}
    assert content(remote_copy(r)) == content(r)


def test_delete_errors() -> None:
    r = doc_with({"m": {"x": 1}, "l": [1]})
    fails(r, errors.Invalid, {"op": "delete", "path": []})
    fails(r, errors.NotFound, {"op": "delete", "path": ["nothing"]})
    fails(r, errors.NotFound, {"op": "delete", "path": ["m", "nothing"]})
    fails(r, errors.NotFound, {"op": "delete", "path": ["nothing", "x"]})
    fails(r, errors.NotFound, {"op": "delete", "path": ["l", 5]})
    fails(r, errors.Invalid, {"op": "delete", "path": ["l", "x"]})


# ---------------------------------------------------------------------- incr & counters


def test_incr_creates_and_increments_counters() -> None:
    r = doc_with({"m": {}})
    apply(r, {"op": "incr", "path": ["hits"]})
    apply(r, {"op": "incr", "path": ["hits"], "by": 5})
    apply(r, {"op": "incr", "path": ["hits"], "by": -2})
    apply(r, {"op": "incr", "path": ["m", "inner"], "by": 3})
    assert content(r) == {"hits": 4, "m": {"inner": 3}}
    assert content(remote_copy(r)) == content(r)


def test_counter_values() -> None:
    r = doc_with({"c": {"$counter": 10}, "l": [{"$counter": 1}]})
    assert content(r) == {"c": 10, "l": [1]}
    apply(r, {"op": "incr", "path": ["c"], "by": 5}, {"op": "incr", "path": ["l", 0]})
    assert content(r) == {"c": 15, "l": [2]}
    # A counter is marked as such for the dry run, so incr knows it from a plain number.
    assert isinstance(marked(r.doc)["c"], values.CounterInt)


def test_incr_errors() -> None:
    r = doc_with({"n": 5, "s": "str", "m": {}, "l": [1]})
    fails(r, errors.Invalid, {"op": "incr", "path": []})
    fails(r, errors.Invalid, {"op": "incr", "path": ["n"]})  # a plain number
    fails(r, errors.Invalid, {"op": "incr", "path": ["s"]})
    fails(r, errors.Invalid, {"op": "incr", "path": ["m"]})
    fails(r, errors.Invalid, {"op": "incr", "path": ["l", 0]})
    fails(r, errors.NotFound, {"op": "incr", "path": ["l", 3]})
    fails(r, errors.NotFound, {"op": "incr", "path": ["missing", "c"]})
    fails(r, errors.Invalid, {"op": "incr", "path": ["c"], "by": 1.5})
    fails(r, errors.Invalid, {"op": "incr", "path": ["c"], "by": "1"})
    fails(r, errors.Invalid, {"op": "incr", "path": ["c"], "by": True})
    fails(r, errors.Invalid, {"op": "incr", "path": ["c"], "by": MAX + 1})


def test_incr_refuses_reserved_keys() -> None:
    """A "$counter" key would make its map read as a counter (and lose its content)."""
    r = doc_with({"m": {"a": 1}})
    fails(r, errors.Invalid, {"op": "incr", "path": ["$counter"]})
    fails(r, errors.Invalid, {"op": "incr", "path": ["m", "$counter"]})
    fails(r, errors.Invalid, {"op": "incr", "path": ["m", "$text"]})
    assert content(r) == {"m": {"a": 1}}


def test_concurrent_increments_all_count() -> None:
    a = doc_with({"hits": {"$counter": 0}})
    b = remote_copy(a)
    for _ in range(3):
        apply(a, {"op": "incr", "path": ["hits"], "by": 2})
    for _ in range(4):
        apply(b, {"op": "incr", "path": ["hits"]})
    sync(a, b)
    assert content(a) == content(b) == {"hits": 10}


def test_concurrent_first_increments_of_a_missing_counter_all_count() -> None:
    """Two replicas creating the same counter at once: nested maps would not merge (one of
    the two wins), so the slots live in a root map named after the counter's path."""
    a = doc_with({"m": {}})
    b = remote_copy(a)
    c = remote_copy(a)
    apply(a, {"op": "incr", "path": ["hits"], "by": 2}, {"op": "incr", "path": ["m", "n"]})
    apply(b, {"op": "incr", "path": ["hits"], "by": 3}, {"op": "incr", "path": ["m", "n"]})
    apply(c, {"op": "incr", "path": ["hits"], "by": 4})
    sync(a, b)
    sync(b, c)
    sync(a, b)
    assert content(a) == content(b) == content(c) == {"hits": 9, "m": {"n": 2}}


def test_a_counter_deleted_and_created_again_at_its_path_starts_from_zero() -> None:
    a = doc_with({})
    b = remote_copy(a)
    apply(a, {"op": "incr", "path": ["hits"], "by": 5})
    sync(a, b)
    apply(a, {"op": "delete", "path": ["hits"]})
    sync(a, b)
    apply(b, {"op": "incr", "path": ["hits"], "by": 1})
    apply(a, {"op": "incr", "path": ["hits"], "by": 2})  # concurrently: both start again
    sync(a, b)
    assert content(a) == content(b) == {"hits": 3}
    apply(a, {"op": "set", "path": ["hits"], "value": {"$counter": 10}})  # a reset
    sync(a, b)
    assert apply(b, {"op": "incr", "path": ["hits"]}) == {"hits": 11}


def test_replacing_a_map_retires_the_counters_inside_it() -> None:
    a = doc_with({})
    apply(a, {"op": "set", "path": ["m"], "value": {}})
    apply(a, {"op": "incr", "path": ["m", "n"], "by": 7})
    apply(a, {"op": "set", "path": ["m"], "value": {}})
    assert apply(a, {"op": "incr", "path": ["m", "n"]}) == {"m": {"n": 1}}


def test_a_malformed_counter_marker_from_a_peer_reads_as_zero() -> None:
    a = doc_with({})
    with a.doc.transaction():
        a.doc.get("root", type=Map)["bad"] = Map({"$counter": 12345})
    assert content(a) == {"bad": 0}


def test_concurrent_increments_of_a_counter_created_by_set() -> None:
    a = doc_with({"c": {"$counter": 5}})
    b = remote_copy(a)
    apply(a, {"op": "incr", "path": ["c"], "by": 10})
    apply(b, {"op": "incr", "path": ["c"], "by": 100})
    sync(a, b)
    assert content(a) == content(b) == {"c": 115}


# ---------------------------------------------------------------------- lists


def test_insert_and_append() -> None:
    r = doc_with({"l": [1, 2], "nested": [[]]})
    apply(r, {"op": "insert", "path": ["l"], "index": 0, "values": ["a", "b"]})
    apply(r, {"op": "insert", "path": ["l"], "index": 4, "values": ["end"]})
    apply(r, {"op": "insert", "path": ["l"], "index": 2, "values": [{"m": 1}]})
    apply(r, {"op": "append", "path": ["l"], "values": [{"$counter": 3}, {"$text": "t"}]})
    apply(r, {"op": "append", "path": ["nested", 0], "values": [9]})
    apply(r, {"op": "insert", "path": ["l"], "index": 0, "values": []})
    expected = ["a", "b", {"m": 1}, 1, 2, "end", 3, "t"]
    assert content(r) == {"l": expected, "nested": [[9]]}
    assert content(remote_copy(r)) == content(r)


def test_list_errors() -> None:
    r = doc_with({"l": [1], "m": {}})
    fails(r, errors.NotFound, {"op": "insert", "path": ["l"], "index": 2, "values": [1]})
    fails(r, errors.NotFound, {"op": "insert", "path": ["l"], "index": -1, "values": [1]})
    fails(r, errors.Invalid, {"op": "insert", "path": ["l"], "index": "0", "values": [1]})
    fails(r, errors.Invalid, {"op": "insert", "path": ["l"], "values": [1]})
    fails(r, errors.Invalid, {"op": "insert", "path": ["m"], "index": 0, "values": [1]})
    fails(r, errors.Invalid, {"op": "append", "path": ["m"], "values": [1]})
    fails(r, errors.Invalid, {"op": "append", "path": [], "values": [1]})  # the root is a map
    fails(r, errors.Invalid, {"op": "append", "path": ["l"], "values": 1})
    fails(r, errors.Invalid, {"op": "append", "path": ["l"]})
    fails(r, errors.Invalid, {"op": "append", "path": ["l"], "values": [MAX + 1]})
    fails(r, errors.NotFound, {"op": "append", "path": ["nothing"], "values": [1]})


# ---------------------------------------------------------------------- text


def test_text_insert_and_delete() -> None:
    r = doc_with({"t": {"$text": "hello"}})
    apply(r, {"op": "text_insert", "path": ["t"], "index": 5, "text": " world"})
    apply(r, {"op": "text_insert", "path": ["t"], "index": 0, "text": ">"})
    apply(r, {"op": "text_delete", "path": ["t"], "index": 1, "length": 1})
    assert content(r) == {"t": ">ello world"}
    assert content(remote_copy(r)) == content(r)


@pytest.mark.parametrize(
    ("initial", "index", "insert", "expected"),
    [
        ("héllo", 2, "Q", "héQllo"),
        ("héllo", 5, "!", "héllo!"),
        ("a😀b", 2, "Q", "a😀Qb"),
        ("日本語", 1, "の", "日の本語"),
    ],
)
def test_text_indexes_are_characters(initial: str, index: int, insert: str, expected: str) -> None:
    r = doc_with({"t": {"$text": initial}})
    assert apply(r, {"op": "text_insert", "path": ["t"], "index": index, "text": insert}) == {
        "t": expected
    }


@pytest.mark.parametrize(
    ("initial", "index", "length", "expected"),
    [
        ("héllo", 1, 1, "hllo"),
        ("héllo", 0, 2, "llo"),
        ("a😀b", 1, 1, "ab"),
        ("日本語", 1, 2, "日"),
    ],
)
def test_text_delete_counts_characters(
    initial: str, index: int, length: int, expected: str
) -> None:
    r = doc_with({"t": {"$text": initial}})
    assert apply(r, {"op": "text_delete", "path": ["t"], "index": index, "length": length}) == {
        "t": expected
    }


def test_text_errors() -> None:
    r = doc_with({"t": {"$text": "abc"}, "s": "plain", "m": {}})
    fails(r, errors.NotFound, {"op": "text_insert", "path": ["t"], "index": 4, "text": "x"})
    fails(r, errors.NotFound, {"op": "text_insert", "path": ["t"], "index": -1, "text": "x"})
    fails(r, errors.Invalid, {"op": "text_insert", "path": ["s"], "index": 0, "text": "x"})
    fails(r, errors.Invalid, {"op": "text_insert", "path": ["m"], "index": 0, "text": "x"})
    fails(r, errors.Invalid, {"op": "text_insert", "path": [], "index": 0, "text": "x"})
    fails(r, errors.Invalid, {"op": "text_insert", "path": ["t"], "index": 0, "text": 5})
    fails(r, errors.Invalid, {"op": "text_insert", "path": ["t"], "text": "x"})
    fails(r, errors.NotFound, {"op": "text_insert", "path": ["nothing"], "index": 0, "text": "x"})
    fails(r, errors.NotFound, {"op": "text_delete", "path": ["t"], "index": 2, "length": 2})
    fails(r, errors.NotFound, {"op": "text_delete", "path": ["t"], "index": 1, "length": -1})
    fails(r, errors.NotFound, {"op": "text_delete", "path": ["t"], "index": 4, "length": 0})
    fails(r, errors.Invalid, {"op": "text_delete", "path": ["s"], "index": 0, "length": 1})
    fails(r, errors.Invalid, {"op": "text_delete", "path": ["t"], "index": 0})


def test_concurrent_text_edits_merge() -> None:
    a = doc_with({"t": {"$text": "middle"}})
    b = remote_copy(a)
    apply(a, {"op": "text_insert", "path": ["t"], "index": 0, "text": "start "})
    apply(b, {"op": "text_insert", "path": ["t"], "index": 6, "text": " end"})
    sync(a, b)
    assert content(a) == content(b) == {"t": "start middle end"}


def test_a_plain_string_is_replaced_whole() -> None:
    a = doc_with({"s": "base"})
    b = remote_copy(a)
    apply(a, {"op": "set", "path": ["s"], "value": "from a"})
    apply(b, {"op": "set", "path": ["s"], "value": "from b"})
    sync(a, b)
    assert content(a) == content(b)
    assert content(a)["s"] in ("from a", "from b")


# ---------------------------------------------------------------------- numbers


@pytest.mark.parametrize("number", [0, 1, -1, 2**31, 2**32 + 1, 10**15, MAX - 1, MAX, -MAX])
def test_integers_up_to_2_53_round_trip_as_int(number: int) -> None:
    r = doc_with({"n": number, "l": [number], "c": {"$counter": number}})
    for replica in (r, remote_copy(r)):
        value = content(replica)
        assert value == {"n": number, "l": [number], "c": number}
        assert type(value["n"]) is int
        assert type(value["l"][0]) is int
        assert type(value["c"]) is int


def test_integers_beyond_2_53_are_refused() -> None:
    r = doc_with({})
    for number in (MAX + 1, -(MAX + 1), 2**63, 10**30):
        fails(r, errors.Invalid, {"op": "set", "path": ["n"], "value": number})
        fails(r, errors.Invalid, {"op": "set", "path": ["n"], "value": {"$counter": number}})
        fails(r, errors.Invalid, {"op": "incr", "path": ["n"], "by": number})


@pytest.mark.parametrize("number", [0.5, -2.25, 1e-9, 3.141592653589793, 1e300, -1e300])
def test_floats_stay_floats(number: float) -> None:
    r = doc_with({"f": number})
    for replica in (r, remote_copy(r)):
        value = content(replica)["f"]
        assert value == number
        assert type(value) is float


def test_integral_floats_read_back_as_integers() -> None:
    """Yjs numbers are doubles: an integral one is an integer as far as readers can tell."""
    r = doc_with({"f": 2.0})
    assert content(remote_copy(r)) == {"f": 2}
    assert type(content(remote_copy(r))["f"]) is int


# ---------------------------------------------------------------------- concurrency


def test_concurrent_writes_to_one_key_converge_to_one_value() -> None:
    for seed in range(5):
        rng = random.Random(seed)
        a = doc_with({"k": "base", "other": 1})
        b = remote_copy(a)
        from_a = {"by": "a", "n": rng.random()}
        apply(a, {"op": "set", "path": ["k"], "value": from_a})
        apply(b, {"op": "set", "path": ["k"], "value": ["by b"]})
        sync(a, b)
        assert content(a) == content(b)
        assert content(a)["k"] in (from_a, ["by b"])
        assert content(a)["other"] == 1
        assert a.vector == b.vector


def test_concurrent_delete_and_nested_set() -> None:
    a = doc_with({"m": {"x": 1}})
    b = remote_copy(a)
    apply(a, {"op": "delete", "path": ["m"]})
    apply(b, {"op": "set", "path": ["m", "y"], "value": 2})
    sync(a, b)
    assert content(a) == content(b) == {}


# ---------------------------------------------------------------------- batches & limits


def test_ops_within_a_batch_see_each_other() -> None:
    r = doc_with({})
    apply(
        r,
        {"op": "set", "path": ["l"], "value": []},
        {"op": "append", "path": ["l"], "values": [1]},
        {"op": "set", "path": ["m"], "value": {"t": {"$text": "ab"}}},
        {"op": "text_insert", "path": ["m", "t"], "index": 1, "text": "-"},
        {"op": "incr", "path": ["m", "c"], "by": 2},
        {"op": "incr", "path": ["m", "c"], "by": 2},
        {"op": "delete", "path": ["l", 0]},
    )
    assert content(r) == {"l": [], "m": {"t": "a-b", "c": 4}}


@pytest.mark.parametrize(
    "bad_op",
    [
        {"op": "delete", "path": ["nothing"]},
        {"op": "incr", "path": ["a"]},
        {"op": "text_insert", "path": ["a"], "index": 0, "text": "x"},
        {"op": "insert", "path": ["l"], "index": 9, "values": [1]},
        {"op": "set", "path": ["l", 7], "value": 1},
    ],
)
def test_a_batch_with_a_failing_op_changes_nothing(bad_op: dict[str, Any]) -> None:
    r = doc_with({"a": 1, "l": [1, 2]})
    before = (content(r), r.vector, bytes(r.doc.get_update()))
    with pytest.raises((errors.Invalid, errors.NotFound)):
        edit(
            r,
            [
                {"op": "set", "path": ["a"], "value": 2},
                {"op": "append", "path": ["l"], "values": [3]},
                {"op": "incr", "path": ["c"]},
                bad_op,
            ],
        )
    assert (content(r), r.vector, bytes(r.doc.get_update())) == before


def test_op_list_shape() -> None:
    r = doc_with({})
    for raw in (
        [],
        {"op": "set"},
        "ops",
        [{"op": "set", "path": ["k"], "value": 1}] * 1001,
        [{"op": "nope", "path": ["k"]}],
        ["set"],
        [{"path": ["k"], "value": 1}],
        [{"op": "set", "path": "k", "value": 1}],
        [{"op": "set", "path": [True], "value": 1}],
        [{"op": "set", "path": [1.5], "value": 1}],
        [{"op": "set", "path": [None], "value": 1}],
        [{"op": "set", "path": ["k"] * (values.MAX_DEPTH + 1), "value": 1}],
    ):
        with pytest.raises(errors.Invalid):
            values.parse_ops(raw)
    assert len(values.parse_ops([{"op": "set", "path": ["k"], "value": 1}] * 1000)) == 1000
    assert content(r) == {}


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"n": value}
    return value


def test_depth_limit() -> None:
    r = doc_with({})
    apply(r, {"op": "set", "path": ["ok"], "value": nested(values.MAX_DEPTH)})
    fails(r, errors.Invalid, {"op": "set", "path": ["deep"], "value": nested(values.MAX_DEPTH + 1)})
    deep_list: Any = 1
    for _ in range(values.MAX_DEPTH + 1):
        deep_list = [deep_list]
    fails(r, errors.Invalid, {"op": "set", "path": ["deep"], "value": deep_list})
    fails(r, errors.Invalid, {"op": "append", "path": ["l"], "values": [nested(values.MAX_DEPTH)]})
    assert values.read(r.doc, ["ok"] + ["n"] * values.MAX_DEPTH) == "leaf"


def test_read_paths() -> None:
    r = doc_with({"m": {"l": [1, {"x": "y"}]}, "t": {"$text": "abc"}, "c": {"$counter": 2}})
    assert values.read(r.doc) == {"m": {"l": [1, {"x": "y"}]}, "t": "abc", "c": 2}
    assert values.read(r.doc, ["m", "l", 1, "x"]) == "y"
    assert values.read(r.doc, ["c"]) == 2
    for path in (
        ["nothing"],
        ["m", "l", 5],
        ["m", "l", "x"],
        ["m", "l", True],
        ["m", "nothing", "x"],
        ["t", 0],
        ["c", "$counter"],
        ["m", "l", 0, "x"],
    ):
        with pytest.raises(errors.NotFound):
            values.read(r.doc, path)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- through the service


def make_service() -> StateService:
    core = Replicator(node="a", tuning=QUIET, rng=random.Random(1), now=trio.current_time())
    return StateService(ReplicationDriver(core, logging.getLogger("test.state")))


async def test_service_batches_are_all_or_nothing() -> None:
    service = make_service()
    await service.update("doc", [{"op": "set", "path": ["a"], "value": 1}])
    replica = service.driver.core.store.get("state/doc")
    assert replica is not None
    before = (service.get("doc"), replica.vector)
    with pytest.raises(errors.NotFound):
        await service.update(
            "doc",
            [{"op": "set", "path": ["a"], "value": 2}, {"op": "delete", "path": ["missing"]}],
        )
    with pytest.raises(errors.Invalid):
        await service.update("doc", [{"op": "incr", "path": ["a"]}])
    assert (service.get("doc"), replica.vector) == before
    summary = await service.update("doc", [{"op": "incr", "path": ["n"], "by": 3}])
    assert summary == {"acked": ["a"], "needed": 1, "total": 1}
    assert service.get("doc") == {"a": 1, "n": 3}
    assert service.get("doc", ["n"]) == 3


async def test_service_watchers_and_names() -> None:
    service = make_service()
    seen: list[tuple[str, Any]] = []
    cancel = service.watch("doc", lambda kind, value: seen.append((kind, value)))
    await service.update("doc", [{"op": "set", "path": ["a"], "value": 1}])
    await service.update("doc", [{"op": "set", "path": ["a"], "value": 2}])
    cancel()
    await service.update("doc", [{"op": "set", "path": ["a"], "value": 3}])
    # The first write opens the document and updates it; the third is not watched.
    assert seen == [("opened", {"a": 1}), ("updated", {"a": 1}), ("updated", {"a": 2})]
    assert [n["name"] for n in service.names()] == ["doc"]
    with pytest.raises(errors.NotFound):
        service.get("missing")
    with pytest.raises(errors.Invalid):
        service.get("")


def test_to_plain_of_documents_with_foreign_roots() -> None:
    r = doc_with({"a": 1})
    r.write(lambda d: d.get("other", type=Map).__setitem__("x", 1))
    assert content(r) == {"a": 1}
