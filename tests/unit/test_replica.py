"""Replicas (write/apply/missing_for) and the DocStore's digest tree."""

from __future__ import annotations

import random
from typing import Any

import pytest
from pycrdt import Array, Doc, Map, Text, merge_updates
from replication_helpers import content, edit, vector

from meshd.replication import vectors
from meshd.replication.replica import DocStore, Replica, UpdateRejected
from meshd.replication.tree import FANOUT, LEAF_LEVEL, LEAVES, DigestTree, leaf_of, span


def root(doc: Doc[Any]) -> Map[Any]:
    return doc.get("root", type=Map)


def put(**items: Any) -> Any:
    def mutate(doc: Doc[Any]) -> None:
        for key, value in items.items():
            root(doc)[key] = value

    return mutate


def snapshot(replica: Replica) -> tuple[dict[int, int], Any, bytes]:
    return vector(replica), content(replica), bytes(replica.doc.get_update())


# ---------------------------------------------------------------------- write


def test_write_returns_the_delta_and_refreshes() -> None:
    replica = Replica("state/a", 0)
    assert replica.sv == b"\x00"
    delta = replica.write(put(x=1))
    assert delta is not None
    assert replica.vector == vectors.decode(replica.doc.get_state())
    assert replica.vector == {replica.doc.client_id: 1}
    other = Replica("state/a", 0)
    assert other.apply(delta)
    assert content(other) == {"x": 1}


def test_write_without_change_returns_none() -> None:
    replica = Replica("state/a", 0)
    replica.write(put(x=1))
    before = (replica.sv, replica.hash)
    assert replica.write(lambda doc: None) is None
    assert replica.write(lambda doc: root(doc).get("x")) is None  # a read is no change
    assert (replica.sv, replica.hash) == before


def test_write_captures_only_the_local_delta_not_the_whole_delete_set() -> None:
    replica = Replica("state/a", 0)
    peer = Replica("state/a", 0)
    # History: 500 keys added, then every other one deleted (a large delete set).
    peer.apply(replica.write(put(**{f"k{i}": i for i in range(500)})) or b"")
    peer.apply(replica.write(lambda d: [root(d).pop(f"k{i}") for i in range(0, 500, 2)]) or b"")
    assert content(peer) == content(replica)
    sv_before = replica.doc.get_state()
    delta = replica.write(put(new="value"))
    assert delta is not None
    # get_update(sv) would carry the whole delete set again; the captured delta does not.
    assert len(replica.doc.get_update(sv_before)) > 10 * len(delta)
    assert len(delta) < 64
    # And it is exactly what changed: the peer holding the earlier state ends up equal.
    assert peer.apply(delta)
    assert snapshot(peer)[:2] == snapshot(replica)[:2]


def test_write_delta_carries_its_own_deletions() -> None:
    replica = Replica("state/a", 0)
    peer = Replica("state/a", 0)
    peer.apply(replica.write(put(a=1, b=2, c=3)) or b"")
    delta = replica.write(lambda d: (root(d).pop("b"), root(d).__setitem__("d", 4)))
    assert delta is not None
    peer.apply(delta)
    assert content(peer) == {"a": 1, "c": 3, "d": 4}


def test_a_delete_only_write_is_a_visible_change() -> None:
    """Deleting only adds to the delete set, which the state vector does not reflect: the
    write must still move the replica's vector and hash, or anti-entropy (which compares
    vectors and hashes of vectors) could never tell a replica that missed the delete."""
    replica = Replica("state/a", 0)
    peer = Replica("state/a", 0)
    peer.apply(replica.write(put(a=1, b=2)) or b"")
    before = (dict(replica.vector), replica.hash)
    delta = replica.write(lambda d: root(d).pop("a"))
    assert delta is not None
    assert (replica.vector, replica.hash) != before
    assert vectors.has_news(replica.vector, peer.vector)
    assert peer.apply(delta) is True  # the peer learned something
    assert content(peer) == {"b": 2}
    assert peer.vector == replica.vector


def test_several_transactions_in_one_write_are_merged() -> None:
    replica = Replica("state/a", 0)

    def mutate(doc: Doc[Any]) -> None:
        root(doc)["a"] = 1
        with doc.transaction():  # nested: the same transaction
            root(doc)["b"] = 2

    delta = replica.write(mutate)
    other = Replica("state/a", 0)
    other.apply(delta or b"")
    assert content(other) == {"a": 1, "b": 2}


def test_remote_updates_are_not_captured_as_local_deltas() -> None:
    source = Replica("state/a", 0)
    replica = Replica("state/a", 0)
    replica.apply(source.write(put(remote=1)) or b"")
    delta = replica.write(put(local=2))
    fresh = Replica("state/a", 0)
    fresh.apply(delta or b"")
    # Only the local change travels; the remote one travels with its own delivery.
    assert content(fresh) == {"local": 2}
    fresh.apply(source.full_update())
    assert content(fresh) == {"remote": 1, "local": 2}


# ---------------------------------------------------------------------- apply


def test_apply_reports_changed_and_unchanged() -> None:
    source = Replica("state/a", 0)
    delta = source.write(put(x=1)) or b""
    replica = Replica("state/a", 0)
    assert replica.apply(delta) is True
    assert replica.apply(delta) is False  # a duplicate teaches nothing
    assert replica.apply(source.full_update()) is False
    assert replica.apply(b"\x00\x00") is False  # the empty update
    assert replica.vector == source.vector


def test_apply_of_an_update_with_a_gap_changes_nothing_until_the_gap_fills() -> None:
    source = Replica("state/a", 0)
    first = source.write(lambda d: d.get("t", type=Text).insert(0, "abc")) or b""
    second = source.write(lambda d: d.get("t", type=Text).insert(3, "def")) or b""
    replica = Replica("state/a", 0)
    assert replica.apply(second) is False  # pending: it builds on `first`
    assert str(replica.doc.get("t", type=Text)) == ""
    assert replica.vector == {}
    assert replica.apply(first) is True
    assert str(replica.doc.get("t", type=Text)) == "abcdef"
    assert replica.vector == source.vector


@pytest.mark.parametrize("seed", range(6))
def test_updates_arriving_in_any_order_all_integrate(seed: int) -> None:
    """Deltas that build on each other (one key overwritten and deleted, a text edited,
    a counter slot bumped), delivered in reverse or shuffled order: once the last gap is
    filled, every one of them is integrated."""
    source = Replica("state/a", 0, Doc(client_id=1000))
    deltas = [
        edit(source, [{"op": "set", "path": ["n"], "value": {"$counter": 0}}]),
        edit(source, [{"op": "set", "path": ["a"], "value": []}]),
        edit(source, [{"op": "set", "path": ["a"], "value": 0}]),
        edit(source, [{"op": "delete", "path": ["a"]}]),
        edit(source, [{"op": "set", "path": ["a"], "value": {"p": 0}}]),
        edit(source, [{"op": "incr", "path": ["n"]}]),
        edit(source, [{"op": "incr", "path": ["n"]}]),
        edit(source, [{"op": "set", "path": ["t"], "value": {"$text": "ab"}}]),
        edit(source, [{"op": "text_insert", "path": ["t"], "index": 1, "text": "é"}]),
        edit(source, [{"op": "text_delete", "path": ["t"], "index": 0, "length": 1}]),
    ]
    order = [d or b"" for d in deltas]
    if seed == 0:
        order.reverse()
    else:
        random.Random(seed).shuffle(order)
    replica = Replica("state/a", 0)
    for update in order:
        replica.apply(update)
    assert content(replica) == content(source) == {"a": {"p": 0}, "n": 2, "t": "éb"}
    assert replica.vector == source.vector


def malformed_updates() -> list[bytes]:
    source = Replica("state/a", 0)
    source.write(put(x=1, text=Text("hello"), list=Array([1, 2, 3])))
    good = source.full_update()
    noise = random.Random(5).randbytes(40)
    return [b"", b"\x00", b"\xff" * 12, good[: len(good) // 2], good[:-1], noise]


# Ids by position: the updates hold random client ids, which would differ between the
# processes of a parallel (pytest-xdist) run.
_MALFORMED = malformed_updates()


@pytest.mark.parametrize("bad", _MALFORMED, ids=[f"bad{i}" for i in range(len(_MALFORMED))])
def test_malformed_update_is_refused_and_the_document_untouched(bad: bytes) -> None:
    replica = Replica("state/a", 0)
    edit(replica, [{"op": "set", "path": ["k"], "value": {"n": 1, "t": {"$text": "abc"}}}])
    before = snapshot(replica)
    sv, digest = replica.sv, replica.hash
    with pytest.raises(UpdateRejected):
        replica.apply(bad)
    assert snapshot(replica) == before
    assert (replica.sv, replica.hash) == (sv, digest)


def test_update_rejected_is_a_value_error() -> None:
    assert issubclass(UpdateRejected, ValueError)


# ---------------------------------------------------------------------- missing_for


def test_missing_for() -> None:
    a = Replica("state/a", 0)
    b = Replica("state/a", 0)
    b.apply(a.write(put(x=1)) or b"")
    a.write(put(y=2))
    # a has news for b: exactly the missing part comes back.
    update = a.missing_for(b.vector, b.sv)
    assert update is not None
    assert b.apply(update)
    assert content(b) == content(a)
    # Nothing missing: None, both ways.
    assert a.missing_for(b.vector, b.sv) is None
    assert b.missing_for(a.vector, a.sv) is None
    # Concurrent changes: each has news for the other.
    a.write(put(p=1))
    b.write(put(q=2))
    ab = a.missing_for(b.vector, b.sv)
    ba = b.missing_for(a.vector, a.sv)
    assert ab is not None
    assert ba is not None
    b.apply(ab)
    a.apply(ba)
    assert content(a) == content(b) == {"x": 1, "y": 2, "p": 1, "q": 2}


def test_missing_for_an_empty_peer_is_everything() -> None:
    a = Replica("state/a", 0)
    a.write(put(x=1, y=[1, 2]))
    update = a.missing_for({}, b"\x00")
    assert update is not None
    fresh = Replica("state/a", 0)
    fresh.apply(update)
    assert content(fresh) == content(a)
    assert Replica("state/a", 0).missing_for({}, b"\x00") is None


def test_encoded_size_and_full_update() -> None:
    a = Replica("state/a", 0)
    assert a.encoded_size() == len(a.full_update())
    a.write(put(x="y" * 100))
    assert a.encoded_size() == len(a.full_update()) > 100


# ---------------------------------------------------------------------- DocStore digests

NAMES = [f"state/doc-{i}" for i in range(40)] + [f"reg/node-{i}" for i in range(10)]


def build_world(seed: int) -> dict[str, list[bytes]]:
    """Per document, a list of updates written by three different clients."""
    rng = random.Random(seed)
    world: dict[str, list[bytes]] = {}
    for name in NAMES:
        writers = [Replica(name, 0) for _ in range(3)]
        updates: list[bytes] = []
        for step in range(rng.randint(1, 4)):
            writer = rng.choice(writers)
            delta = writer.write(put(**{f"k{step}": rng.randint(0, 9)}))
            assert delta is not None
            updates.append(delta)
        world[name] = updates
    return world


def store_from(
    world: dict[str, list[bytes]], seed: int, epochs: dict[str, int] | None = None
) -> DocStore:
    """A store holding every document of ``world``, its updates applied in a random order."""
    rng = random.Random(seed)
    store = DocStore()
    names = list(world)
    rng.shuffle(names)
    for name in names:
        replica = Replica(name, (epochs or {}).get(name, 0))
        updates = list(world[name])
        rng.shuffle(updates)
        for _ in range(2):  # twice: whatever was pending the first time is applied now
            for update in updates:
                replica.apply(update)
        store.add(replica)
    return store


def from_scratch(store: DocStore) -> DocStore:
    """A new store with a copy of every replica (same name, epoch and content)."""
    fresh = DocStore()
    for replica in store:
        copy = Replica(replica.name, replica.epoch)
        copy.apply(replica.full_update())
        fresh.add(copy)
    return fresh


DIGEST_SIZE = FANOUT * 8


def differing_leaves(a: DocStore, b: DocStore) -> list[int]:
    """Descend both trees where they differ, down to the leaves (what a round does)."""
    frontier = [(0, 0)]
    leaves = []
    while frontier:
        level, index = frontier.pop()
        if a.node(level, index) == b.node(level, index):
            continue
        if level == LEAF_LEVEL:
            leaves.append(index)
        else:
            frontier.extend((level + 1, index * FANOUT + i) for i in range(FANOUT))
    return sorted(leaves)


def test_digest_shape_and_empty_store() -> None:
    store = DocStore()
    assert store.digest() == bytes(DIGEST_SIZE)
    assert len(store) == 0
    assert store.node(0, 0) == (0, 0)
    replica = Replica("state/a", 0)
    store.add(replica)
    assert len(store.digest()) == DIGEST_SIZE
    leaf = leaf_of("state/a")
    # Every node on the path from the root to the leaf counts it and carries its hash.
    for level in range(LEAF_LEVEL + 1):
        index = leaf >> (4 * (LEAF_LEVEL - level))
        assert store.node(level, index) == (replica.hash, 1)
    assert differing_leaves(store, DocStore()) == [leaf]


@pytest.mark.parametrize("seed", range(3))
def test_equal_stores_have_equal_digests(seed: int) -> None:
    """The same documents, their updates applied in different orders by different stores."""
    world = build_world(seed)
    a, b = store_from(world, seed * 10 + 1), store_from(world, seed * 10 + 2)
    for replica in a:
        other = b.get(replica.name)
        assert other is not None
        assert replica.vector == other.vector
        assert content(replica) == content(other)
    assert a.digest() == b.digest()
    assert differing_leaves(a, b) == []


def test_one_change_makes_exactly_one_leaf_differ() -> None:
    world = build_world(7)
    a, b = store_from(world, 1), store_from(world, 2)
    name = "state/doc-13"
    replica = b.get(name)
    assert replica is not None
    replica.write(put(extra=1))
    b.rehash(replica)
    assert differing_leaves(a, b) == [leaf_of(name)]
    assert differing_leaves(b, a) == [leaf_of(name)]
    assert name in {r.name for r in a.listing([(LEAF_LEVEL, leaf_of(name))])}
    assert a.node(0, 0)[1] == b.node(0, 0)[1] == len(a)  # counts agree, hashes do not
    assert a.node(0, 0)[0] != b.node(0, 0)[0]


def test_a_different_epoch_makes_its_leaf_differ() -> None:
    world = build_world(8)
    a = store_from(world, 1)
    b = store_from(world, 1, epochs={"state/doc-3": 1})
    assert differing_leaves(a, b) == [leaf_of("state/doc-3")]


def test_remove_add_and_rehash_keep_the_digest_consistent() -> None:
    world = build_world(9)
    store = store_from(world, 3)
    rng = random.Random(4)
    removed: dict[str, Replica] = {}
    for step in range(60):
        action = rng.choice(["remove", "add", "write", "replace"])
        names = sorted(r.name for r in store)
        if action == "remove" and names:
            name = rng.choice(names)
            gone = store.remove(name)
            assert gone is not None
            removed[name] = gone
            assert store.get(name) is None
            assert store.remove(name) is None
        elif action == "add" and removed:
            name = rng.choice(sorted(removed))
            copy = Replica(name, removed.pop(name).epoch)
            for update in world[name]:
                copy.apply(update)
            assert store.add(copy) is None
        elif action == "write" and names:
            replica = store.get(rng.choice(names))
            assert replica is not None
            replica.write(put(step=step))
            store.rehash(replica)
        elif action == "replace" and names:
            name = rng.choice(names)
            old = store.get(name)
            newer = Replica(name, (old.epoch if old else 0) + 1)
            newer.write(put(fresh=step))
            assert store.add(newer) is old
        scratch = from_scratch(store)
        assert store.digest() == scratch.digest(), (step, action)
        assert differing_leaves(store, scratch) == [], (step, action)
    assert len(store) == len(from_scratch(store))


def test_rehash_is_idempotent_and_unchanged_replicas_leave_digest_alone() -> None:
    store = store_from(build_world(1), 1)
    digest = store.digest()
    for replica in store:
        store.rehash(replica)
        store.rehash(replica)
    assert store.digest() == digest


def test_listing_is_in_key_order_within_the_ranges_and_resumes_after_a_key() -> None:
    store = DocStore()
    names = [f"state/d{i}" for i in range(3000)]
    for name in names:
        store.add(Replica(name, 0))
    ranges = [(1, 3), (2, 0x91), (3, 0x222)]  # disjoint subtrees
    spans = [span(level, index) for level, index in ranges]
    listed = [(r.leaf, r.name) for r in store.listing(ranges)]
    assert listed == sorted(listed)
    expected = {n for n in names if any(a <= leaf_of(n) < b for a, b in spans)}
    assert {name for _, name in listed} == expected
    # Resuming after any key lists exactly what follows it; an upper bound stops early.
    for cut in (0, 1, len(listed) // 2, len(listed) - 1):
        after = listed[cut]
        assert [(r.leaf, r.name) for r in store.listing(ranges, after)] == listed[cut + 1 :]
        assert [(r.leaf, r.name) for r in store.listing(ranges, None, after)] == listed[: cut + 1]


def test_listing_a_sparse_store_skips_empty_stretches_and_misses_nothing() -> None:
    store = DocStore()
    names = [f"state/s{i}" for i in range(40)] + ["reg/a", "reg/b"]
    for name in names:
        store.add(Replica(name, 0))
    store.remove("state/s3")
    store.add(Replica("state/s3", 0))  # a leaf emptied and filled again
    store.remove("state/s7")  # and one emptied for good
    everything = [(0, 0)]
    keys = [(r.leaf, r.name) for r in store.listing(everything)]
    assert keys == sorted((leaf_of(n), n) for n in names if n != "state/s7")
    for cut in range(0, len(keys), 7):
        assert [(r.leaf, r.name) for r in store.listing(everything, keys[cut])] == keys[cut + 1 :]
    assert store.kinds == {"state": 39, "reg": 2}
    for name in names:
        store.remove(name)
    assert list(store.listing(everything)) == [] and store.kinds == {}


def test_counts_follow_adds_and_removes_and_leaves_are_spread() -> None:
    store = DocStore()
    for i in range(500):
        store.add(Replica(f"state/{i}", 0))
    assert store.node(0, 0)[1] == 500
    assert sum(store.node(1, i)[1] for i in range(FANOUT)) == 500
    for i in range(0, 500, 2):
        store.remove(f"state/{i}")
    assert store.node(0, 0)[1] == 250
    assert sum(store.node(1, i)[1] for i in range(FANOUT)) == 250
    assert all(0 <= leaf_of(f"state/{i}") < LEAVES for i in range(2000))
    assert len({leaf_of(f"state/{i}") >> 12 for i in range(2000)}) == FANOUT


def test_state_vector_encoding_does_not_depend_on_arrival_order() -> None:
    """Replicas with the same vector must publish the same bytes: peers compare them
    (digests hash them, compaction's agreement check compares them)."""
    writers = [Replica("state/a", 0) for _ in range(30)]
    updates = [w.write(put(**{f"k{i}": i})) or b"" for i, w in enumerate(writers)]
    a, b = Replica("state/a", 0), Replica("state/a", 0)
    for update in updates:
        a.apply(update)
    b.apply(bytes(merge_updates(*reversed(updates))))
    assert a.vector == b.vector
    assert a.sv == b.sv
    assert a.hash == b.hash


def test_a_leaf_going_from_one_name_to_several_and_back_lists_and_counts_right() -> None:
    tree = DigestTree()
    tree.insert(7, "b", 1)
    tree.insert(7, "b", 1)  # a name already there changes nothing
    assert tree.node(LEAF_LEVEL, 7) == (1, 1)
    tree.insert(7, "a", 2)
    tree.insert(7, "c", 4)
    assert tree.node(LEAF_LEVEL, 7) == (7, 3)
    assert list(tree.keys([(LEAF_LEVEL, 7)])) == [(7, "a"), (7, "b"), (7, "c")]
    tree.delete(7, "a", 2)
    tree.delete(7, "c", 4)
    tree.delete(7, "c", 4)  # gone already: nothing to undo
    assert tree.node(LEAF_LEVEL, 7) == (1, 1)
    assert list(tree.keys([(LEAF_LEVEL, 7)])) == [(7, "b")]
    tree.delete(7, "b", 1)
    assert tree.node(LEAF_LEVEL, 7) == (0, 0) and list(tree.keys([(0, 0)])) == []
