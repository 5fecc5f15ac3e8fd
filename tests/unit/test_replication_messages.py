"""Replication messages: round trips, strict rejection of malformed input, chunk reassembly."""

from __future__ import annotations

import logging
import random
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples
from replication_helpers import QUIET

from meshd.replication import messages
from meshd.replication.core import Replicator
from meshd.replication.driver import ReplicationDriver
from meshd.replication.messages import (
    MAX_DOC_NAME,
    MAX_DOCS_PER_MESSAGE,
    MAX_HOPS,
    MAX_NODES_PER_MESSAGE,
    MAX_RANGES_PER_MESSAGE,
    MAX_VECTOR,
    Ack,
    Chunk,
    DocUpdate,
    DocVector,
    Kind,
    ListRange,
    Message,
    Nodes,
    Page,
    Push,
    Query,
    Reassembler,
    Sync,
    Tree,
    TreeNode,
    Updates,
    Vectors,
)
from meshd.replication.tree import LEAVES
from meshd.wire.validate import WireError
from meshd_client.protocol import cbor

SV = b"\x01\x07\x02"
UPDATE = b"\x01\x01\x07\x00\x28\x01\x04root\x01x\x01\x7d\x01\x00"

SAMPLES: list[Message] = [
    Push("state/a", 0, UPDATE),
    Push("reg/node-1", 2**63, UPDATE, ack=17, hops=MAX_HOPS),
    Push("é/ü 字", 1, b""),
    Ack(5, True, SV),
    Ack(6, False),
    Tree(0, ()),
    Tree(2**31 - 1, (TreeNode(0, 0, 2**64 - 1, 5), TreeNode(4, 65535, 1, 0))),
    Nodes(1, ()),
    Nodes(2, (TreeNode(1, 15, 7, 2**32),)),
    ListRange(3, ()),
    ListRange(4, ((1, 0), (4, 65535)), (LEAVES - 1, "state/z")),
    Page(5, ()),
    Page(6, (DocVector("state/a", 0, SV), DocVector("reg/b", 9, b"\x00")), (17, "reg/b")),
    Page(7, (), None, busy=True),
    Sync(3, (), ()),
    Sync(
        4,
        (DocUpdate("state/a", 0, UPDATE), DocUpdate("state/b", 1, b"")),
        (DocVector("state/c", 3, SV),),
    ),
    Updates(5, ()),
    Updates(6, (DocUpdate("x" * MAX_DOC_NAME, 0, UPDATE),)),
    Chunk(1, 0, 1, b""),
    Chunk(2**64 - 1, 65535, 65536, b"\xff" * 100),
    messages.Query(7, ()),
    messages.Query(8, ("state/a", "reg/b")),
    Vectors(9, ()),
    Vectors(10, (DocVector("state/a", 0, SV),)),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    assert messages.decode(messages.encode(msg)) == msg


def test_every_kind_has_a_sample() -> None:
    kinds = {cbor.loads(messages.encode(m))[0] for m in SAMPLES}
    assert kinds == {k.value for k in Kind}


# ---------------------------------------------------------------------- hypothesis round trips

NAMES = st.text(
    alphabet=st.characters(categories=("L", "N", "P", "S", "Zs")), min_size=1, max_size=40
).filter(str.isprintable)
UINT = st.integers(min_value=0, max_value=2**64 - 1)
BLOB = st.binary(max_size=64)
VECTORS = st.builds(DocVector, NAMES, UINT, BLOB)
UPDATES = st.builds(DocUpdate, NAMES, UINT, BLOB)
NODE_IDS = st.integers(0, 4).flatmap(lambda lv: st.tuples(st.just(lv), st.integers(0, 16**lv - 1)))
TREE_NODES = NODE_IDS.flatmap(
    lambda n: st.builds(TreeNode, st.just(n[0]), st.just(n[1]), UINT, UINT)
)
MESSAGES = st.one_of(
    st.builds(Push, NAMES, UINT, BLOB, UINT, st.integers(0, MAX_HOPS)),
    st.builds(Ack, UINT, st.booleans(), BLOB),
    st.builds(Tree, UINT, st.lists(TREE_NODES, max_size=5).map(tuple)),
    st.builds(Nodes, UINT, st.lists(TREE_NODES, max_size=5).map(tuple)),
    st.builds(
        ListRange,
        UINT,
        st.lists(NODE_IDS, max_size=5).map(tuple),
        st.none() | st.tuples(st.integers(0, LEAVES - 1), NAMES),
    ),
    st.builds(
        Page,
        UINT,
        st.lists(VECTORS, max_size=5).map(tuple),
        st.none() | st.tuples(st.integers(0, LEAVES - 1), NAMES),
        st.booleans(),
    ),
    st.builds(
        Sync,
        UINT,
        st.lists(UPDATES, max_size=4).map(tuple),
        st.lists(VECTORS, max_size=4).map(tuple),
    ),
    st.builds(Updates, UINT, st.lists(UPDATES, max_size=4).map(tuple)),
    st.integers(1, 65536).flatmap(
        lambda total: st.builds(Chunk, UINT, st.integers(0, total - 1), st.just(total), BLOB)
    ),
    st.builds(Query, UINT, st.lists(NAMES, max_size=5).map(tuple)),
    st.builds(Vectors, UINT, st.lists(VECTORS, max_size=5).map(tuple)),
)


@given(MESSAGES)
@settings(max_examples=examples(300), derandomize=True, deadline=None)
def test_round_trip_any(msg: Message) -> None:
    assert messages.decode(messages.encode(msg)) == msg


# ---------------------------------------------------------------------- strict rejection


def raw(*items: Any) -> bytes:
    return cbor.dumps(list(items))


PUSH = [Kind.PUSH, "state/a", 0, UPDATE, 0, 0]


def push_with(index: int, value: Any) -> bytes:
    fields = list(PUSH)
    fields[index] = value
    return cbor.dumps(fields)


BAD: dict[str, bytes] = {
    "not cbor": b"\xff\x00",
    "truncated cbor": messages.encode(Push("state/a", 0, UPDATE))[:-3],
    "trailing bytes": messages.encode(Ack(1, True, SV)) + b"\x00",
    "a map": cbor.dumps({"kind": 1}),
    "an int": cbor.dumps(1),
    "empty array": cbor.dumps([]),
    "string type code": raw("1", "state/a", 0, b"", 0, 0),
    "bool type code": raw(True, "state/a", 0, b"", 0, 0),
    "float type code": raw(1.0, "state/a", 0, b"", 0, 0),
    "unknown type 0": raw(0),
    "unknown type 10": raw(10, 1, 2),
    "negative type": raw(-1),
    "push too short": raw(*PUSH[:5]),
    "push too long": raw(*PUSH, 0),
    "empty doc name": push_with(1, ""),
    "doc name too long": push_with(1, "x" * (MAX_DOC_NAME + 1)),
    "doc name not printable": push_with(1, "state/a\nb"),
    "doc name control char": push_with(1, "state/\x00"),
    "doc name bytes": push_with(1, b"state/a"),
    "negative epoch": push_with(2, -1),
    "epoch too large": push_with(2, 2**64),
    "float epoch": push_with(2, 1.0),
    "bool epoch": push_with(2, True),
    "string update": push_with(3, "update"),
    "list update": push_with(3, [1, 2]),
    "negative ack": push_with(4, -5),
    "hops too large": push_with(5, MAX_HOPS + 1),
    "null hops": push_with(5, None),
    "ack ok not bool": raw(Kind.ACK, 1, 1, SV),
    "ack sv string": raw(Kind.ACK, 1, True, "sv"),
    "ack sv too long": raw(Kind.ACK, 1, True, bytes(MAX_VECTOR + 1)),
    "ack too short": raw(Kind.ACK, 1, True),
    "version 1 digest": raw(3, 1, bytes(2048)),
    "version 1 buckets": raw(4, 1, [], []),
    "tree nodes not a list": raw(Kind.TREE, 1, {"a": 1}),
    "tree node too short": raw(Kind.TREE, 1, [[1, 0, 5]]),
    "tree node level 5": raw(Kind.TREE, 1, [[5, 0, 5, 1]]),
    "tree node index beyond its level": raw(Kind.TREE, 1, [[1, 16, 5, 1]]),
    "tree node hash too large": raw(Kind.TREE, 1, [[1, 0, 2**64, 1]]),
    "tree node negative count": raw(Kind.NODES, 1, [[1, 0, 5, -1]]),
    "too many tree nodes": raw(Kind.NODES, 1, [[1, 0, 5, 1]] * (MAX_NODES_PER_MESSAGE + 1)),
    "list range wrong arity": raw(Kind.LIST, 1, [[1]], None),
    "list range index beyond its level": raw(Kind.LIST, 1, [[2, 256]], None),
    "too many ranges": raw(Kind.LIST, 1, [[0, 0]] * (MAX_RANGES_PER_MESSAGE + 1), None),
    "list cursor leaf too large": raw(Kind.LIST, 1, [], [LEAVES, "a"]),
    "list cursor bad name": raw(Kind.LIST, 1, [], [1, ""]),
    "list cursor not a pair": raw(Kind.LIST, 1, [], 5),
    "page vector too short": raw(Kind.PAGE, 1, [["state/a", 0]], None, False),
    "page vector bad name": raw(Kind.PAGE, 1, [["", 0, SV]], None, False),
    "page sv too long": raw(Kind.PAGE, 1, [["a", 0, bytes(MAX_VECTOR + 1)]], None, False),
    "page busy not bool": raw(Kind.PAGE, 1, [], None, 1),
    "page too short": raw(Kind.PAGE, 1, [], None),
    "too many docs": raw(Kind.PAGE, 1, [["a", 0, b""]] * (MAX_DOCS_PER_MESSAGE + 1), None, False),
    "sync updates not a list": raw(Kind.SYNC, 1, b"", []),
    "sync update wrong arity": raw(Kind.SYNC, 1, [["state/a", 0]], []),
    "sync update is a vector of bad name": raw(Kind.SYNC, 1, [], [[5, 0, SV]]),
    "sync too short": raw(Kind.SYNC, 1, []),
    "updates update not bytes": raw(Kind.UPDATES, 1, [["state/a", 0, "u"]]),
    "updates too long": raw(Kind.UPDATES, 1, [], []),
    "chunk total zero": raw(Kind.CHUNK, 1, 0, 0, b""),
    "chunk index equals total": raw(Kind.CHUNK, 1, 3, 3, b""),
    "chunk index beyond total": raw(Kind.CHUNK, 1, 7, 3, b""),
    "chunk total too large": raw(Kind.CHUNK, 1, 0, (1 << 16) + 1, b""),
    "chunk negative index": raw(Kind.CHUNK, 1, -1, 3, b""),
    "chunk data string": raw(Kind.CHUNK, 1, 0, 1, "data"),
    "chunk too short": raw(Kind.CHUNK, 1, 0, 1),
    "query docs too many": raw(Kind.QUERY, 1, ["a"] * 1025),
    "query doc bad name": raw(Kind.QUERY, 1, ["ok", ""]),
    "query doc not a string": raw(Kind.QUERY, 1, [1]),
    "vectors too many": raw(Kind.VECTORS, 1, [["a", 0, b""]] * 1025),
    "vectors bad vector": raw(Kind.VECTORS, 1, [["a", -1, b""]]),
    "cbor tag": bytes.fromhex("83") + bytes.fromhex("01") + bytes.fromhex("c11a00000000") + b"\x40",
    "indefinite array": bytes.fromhex("9f01ff"),
}


@pytest.mark.parametrize("data", BAD.values(), ids=BAD.keys())
def test_malformed_messages_are_refused(data: bytes) -> None:
    with pytest.raises(WireError):
        messages.decode(data)


def test_limits_are_inclusive() -> None:
    assert messages.decode(push_with(1, "x" * MAX_DOC_NAME))
    assert messages.decode(push_with(5, MAX_HOPS))
    assert messages.decode(raw(Kind.ACK, 1, True, bytes(MAX_VECTOR)))
    assert messages.decode(raw(Kind.LIST, 1, [[0, 0]] * MAX_RANGES_PER_MESSAGE, None))
    assert messages.decode(raw(Kind.TREE, 1, [[4, 65535, 2**64 - 1, 1]] * MAX_NODES_PER_MESSAGE))
    assert messages.decode(raw(Kind.QUERY, 1, ["a"] * 1024))
    many = messages.decode(raw(Kind.UPDATES, 1, [["a", 0, b""]] * MAX_DOCS_PER_MESSAGE))
    assert isinstance(many, Updates)
    assert len(many.updates) == MAX_DOCS_PER_MESSAGE


def test_the_documents_bound_is_the_decoders_parameter() -> None:
    """A daemon may lower it (``ReplicationTuning.max_docs_per_message``); senders page
    below it."""
    page = messages.encode(Page(1, tuple(DocVector(f"d{i}", 0, SV) for i in range(10))))
    sync = messages.encode(Sync(1, (), tuple(DocVector(f"d{i}", 0, SV) for i in range(10))))
    for data in (page, sync):
        assert messages.decode(data, max_docs=10)
        with pytest.raises(WireError, match=r"0\.\.9 items"):
            messages.decode(data, max_docs=9)


def test_oversize_update_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # 128 MiB is too much memory for a unit test: the same check, with a smaller bound.
    monkeypatch.setattr(messages, "MAX_UPDATE", 1000)
    assert messages.decode(messages.encode(Push("a", 0, bytes(1000))))
    for msg in (
        Push("a", 0, bytes(1001)),
        Sync(1, (DocUpdate("a", 0, bytes(1001)),), ()),
        Updates(1, (DocUpdate("a", 0, bytes(1001)),)),
        Chunk(1, 0, 1, bytes(1001)),
    ):
        with pytest.raises(WireError, match="1000 bytes"):
            messages.decode(messages.encode(msg))


# ---------------------------------------------------------------------- fuzz

CBOR_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.binary(max_size=16),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=20,
)


def decode_or_wire_error(data: bytes) -> None:
    try:
        msg = messages.decode(data)
    except WireError:
        return
    # Anything accepted is a well-formed message that survives another round trip.
    assert messages.decode(messages.encode(msg)) == msg


@given(st.binary(max_size=200))
@settings(max_examples=examples(1000), derandomize=True, deadline=None)
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    decode_or_wire_error(data)


@given(st.sampled_from([k.value for k in Kind]), st.lists(CBOR_VALUES, max_size=6))
@settings(max_examples=examples(400), derandomize=True, deadline=None)
def test_fuzz_arrays_with_a_valid_type_code(kind: int, rest: list[Any]) -> None:
    decode_or_wire_error(cbor.dumps([kind, *rest]))


@given(MESSAGES, st.data())
@settings(max_examples=examples(300), derandomize=True, deadline=None)
def test_fuzz_mutated_valid_messages(msg: Message, data: st.DataObject) -> None:
    encoded = bytearray(messages.encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(encoded) - 1))
        action = data.draw(st.sampled_from(["flip", "delete", "insert"]))
        if action == "flip":
            encoded[pos] ^= data.draw(st.integers(1, 255))
        elif action == "delete" and len(encoded) > 1:
            del encoded[pos]
        else:
            encoded.insert(pos, data.draw(st.integers(0, 255)))
    decode_or_wire_error(bytes(encoded))


# ---------------------------------------------------------------------- chunking


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def chunks_of(data: bytes, transfer: int, frame: int) -> list[Chunk]:
    out = []
    for encoded in messages.split(data, transfer, frame):
        chunk = messages.decode(encoded)
        assert isinstance(chunk, Chunk)
        out.append(chunk)
    return out


def test_split_respects_the_frame_size() -> None:
    data = payload(10_000)
    frames = messages.split(data, 1, 2048)
    assert len(frames) == 6  # 1984-byte slices
    assert all(len(f) <= 2048 for f in frames)
    assert messages.split(b"", 1, 2048) == [messages.encode(Chunk(1, 0, 1, b""))]
    # Tiny frame sizes are raised to 1 KiB slices rather than making millions of chunks.
    assert all(len(c.data) <= 1024 for c in chunks_of(data, 1, 10))


def test_reassembly_in_order() -> None:
    data = payload(5000)
    assembler = Reassembler()
    parts = chunks_of(data, 9, 1100)
    assert [assembler.add(c) for c in parts[:-1]] == [None] * (len(parts) - 1)
    assert assembler.add(parts[-1]) == data


@pytest.mark.parametrize("seed", range(5))
def test_reassembly_out_of_order(seed: int) -> None:
    data = payload(7000, seed)
    parts = chunks_of(data, 3, 1100)
    random.Random(seed).shuffle(parts)
    assembler = Reassembler()
    results = [assembler.add(c) for c in parts]
    assert results[:-1] == [None] * (len(parts) - 1)
    assert results[-1] == data


def test_single_chunk_transfer() -> None:
    assert Reassembler().add(Chunk(1, 0, 1, b"abc")) == b"abc"
    assert Reassembler().add(Chunk(1, 0, 1, b"")) == b""


def test_interleaved_transfers() -> None:
    a, b = payload(3000, 1), payload(3000, 2)
    ca, cb = chunks_of(a, 1, 1100), chunks_of(b, 2, 1100)
    assembler = Reassembler()
    results = []
    for x, y in zip(ca, cb, strict=True):
        results += [assembler.add(x), assembler.add(y)]
    assert [r for r in results if r is not None] == [a, b]


def test_duplicate_chunk_is_refused_and_the_transfer_dropped() -> None:
    parts = chunks_of(payload(3000), 1, 1100)
    assembler = Reassembler()
    assembler.add(parts[0])
    with pytest.raises(WireError, match="inconsistent"):
        assembler.add(parts[0])
    # The broken transfer is forgotten: the rest of it cannot complete it...
    assert assembler.add(parts[1]) is None
    assert assembler.add(parts[2]) is None
    # ... and a clean resend of the whole transfer works.
    fresh = Reassembler()
    assert [fresh.add(c) for c in parts][-1] == payload(3000)


def test_inconsistent_total_is_refused() -> None:
    assembler = Reassembler()
    assembler.add(Chunk(1, 0, 3, b"a"))
    with pytest.raises(WireError, match="inconsistent"):
        assembler.add(Chunk(1, 1, 4, b"b"))


def test_size_limit() -> None:
    assembler = Reassembler(max_bytes=100)
    assert assembler.add(Chunk(1, 0, 3, bytes(50))) is None
    assert assembler.add(Chunk(1, 1, 3, bytes(50))) is None
    with pytest.raises(WireError, match="too large"):
        assembler.add(Chunk(1, 2, 3, bytes(1)))
    # The transfer is dropped, so its memory is released and it cannot be completed.
    assert assembler.add(Chunk(1, 2, 3, b"")) is None
    # Exactly at the limit is fine.
    exact = Reassembler(max_bytes=100)
    exact.add(Chunk(2, 0, 2, bytes(60)))
    assert exact.add(Chunk(2, 1, 2, bytes(40))) == bytes(100)


def test_transfer_limit_evicts_the_oldest_unfinished_transfer() -> None:
    """A peer's transfers arrive in order on one link: when a new one starts with the table
    full, the oldest unfinished one was abandoned (a chunk was dropped) and makes room."""
    assembler = Reassembler(max_transfers=2)
    assembler.add(Chunk(1, 0, 2, b"a"))
    assembler.add(Chunk(2, 0, 2, b"b"))
    assert assembler.add(Chunk(3, 0, 2, b"c")) is None
    assert assembler.evicted == 1
    # Transfer 1 was evicted: its late chunk starts it over (evicting 2, now the oldest) and
    # cannot complete it ...
    assert assembler.add(Chunk(1, 1, 2, b"A")) is None
    assert assembler.evicted == 2
    # ... while the newest transfer completes.
    assert assembler.add(Chunk(3, 1, 2, b"C")) == b"cC"
    # A finished transfer frees its slot; so does dropping one.
    assembler.drop(1)
    assert assembler.add(Chunk(4, 0, 1, b"d")) == b"d"


# ---------------------------------------------------------------------- the driver's input path


def make_driver() -> ReplicationDriver:
    core = Replicator(node="b", tuning=QUIET, rng=random.Random(1), now=trio.current_time())
    core.set_peers(["a"])
    return ReplicationDriver(core, logging.getLogger("test.replication"))


async def test_driver_reassembles_chunked_messages() -> None:
    from pycrdt import Doc, Map

    doc: Doc[Any] = Doc()
    with doc.transaction():
        root = doc.get("root", type=Map)
        for i in range(200):
            root[f"key-{i}"] = "v" * 50
    push = messages.encode(Push("state/big", 0, doc.get_update()))
    driver = make_driver()
    frames = messages.split(push, 77, 2048)
    assert len(frames) > 3
    for frame in frames:
        await driver.receive("a", frame)
    replica = driver.core.store.get("state/big")
    assert replica is not None
    assert replica.doc.get_state() == doc.get_state()
    assert driver.core.stats.rejected == {}


async def test_driver_rejects_nested_chunks() -> None:
    inner = messages.encode(Push("state/a", 0, UPDATE))
    nested = messages.split(inner, 5, 2048)[0]  # a chunk ...
    outer = messages.split(nested, 6, 2048)  # ... wrapped in a chunk
    driver = make_driver()
    for frame in outer:
        await driver.receive("a", frame)
    assert driver.core.stats.rejected == {"malformed_message": 1}
    assert driver.core.store.get("state/a") is None


async def test_driver_counts_malformed_frames() -> None:
    driver = make_driver()
    await driver.receive("a", b"\xff")
    await driver.receive("a", BAD["tree node too short"])
    assert driver.core.stats.rejected == {"malformed_message": 2}


async def test_driver_hands_a_bare_chunk_nowhere_else() -> None:
    # A chunk that reached the core (not through the driver) is counted, not processed.
    driver = make_driver()
    driver.core.handle(0.0, "a", Chunk(1, 0, 1, b""))
    assert driver.core.stats.rejected == {"unexpected_chunk": 1}


async def test_driver_logs_a_stalled_peer_once_and_refuses_more_docs_than_its_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import dataclasses

    base = trio.current_time()
    tune = dataclasses.replace(QUIET, anti_entropy_interval=1.0, round_timeout=3.0)
    core = Replicator(node="a", tuning=tune, rng=random.Random(1), now=base)
    core.set_peers(["b"])  # b never answers: no links
    driver = ReplicationDriver(core, logging.getLogger("test.replication"))
    with caplog.at_level(logging.WARNING):
        for second in range(1, 120):
            core.tick(base + second)
            driver.flush()
    assert core.stats.rounds_failed >= 3
    stalled = [r for r in caplog.records if "make no progress" in r.getMessage()]
    assert len(stalled) == 1
    page = Page(1, tuple(DocVector(f"d{i}", 0, SV) for i in range(11)))
    driver.core.tuning = dataclasses.replace(driver.core.tuning, max_docs_per_message=10)
    await driver.receive("b", messages.encode(page))
    assert driver.core.stats.rejected == {"malformed_message": 1}
