"""Hot and cold replicas (docs/replication.md#memory-model): a cold replica is its encoding
only, serves vectors, repairs and full updates from it, integrates remote updates by merging
encodings, and becomes a live Doc only when read or written; the store keeps a bounded hot
set and evicts the least recently used back to their encoding."""

from __future__ import annotations

import random
from typing import Any

import pytest
from pycrdt import Doc, Map, Text
from replication_helpers import Net, content, tuning

from meshd.config.model import ConfigError, StorageTuning
from meshd.replication.core import Persist
from meshd.replication.replica import (
    MIN_HOT,
    NORMALIZE_SLACK,
    DocStore,
    HotSet,
    Replica,
    UpdateRejected,
)


def put(**items: Any) -> Any:
    def mutate(doc: Doc[Any]) -> None:
        for key, value in items.items():
            doc.get("root", type=Map)[key] = value

    return mutate


def is_hot(replica: Replica) -> bool:
    return replica.hot


def source_with(n: int, client: int = 1) -> tuple[Replica, list[bytes]]:
    source = Replica("state/s", 0, Doc(client_id=client))
    deltas = [source.write(put(**{f"k{i}": "v" * 20 + str(i)})) or b"" for i in range(n)]
    return source, deltas


# ---------------------------------------------------------------------- cold replicas


def test_a_new_replica_is_cold_and_empty() -> None:
    replica = Replica("state/a", 0)
    assert not is_hot(replica)
    assert replica.sv == b"\x00" and replica.vector == {}
    assert replica.full_update() == b"\x00\x00"
    assert replica.missing_for({}, b"\x00") is None


def test_a_cold_replica_integrates_updates_without_a_doc() -> None:
    source, deltas = source_with(5)
    cold = Replica("state/s", 0)
    for delta in deltas:
        assert cold.apply(delta) is True
    assert not is_hot(cold)
    assert cold.apply(deltas[2]) is False  # a duplicate teaches nothing
    assert cold.apply(source.full_update()) is False
    assert not is_hot(cold)
    assert (cold.sv, cold.hash, cold.vector) == (source.sv, source.hash, source.vector)
    assert content(cold) == content(source)  # reading materializes it
    assert is_hot(cold)


def test_cold_and_hot_replicas_of_the_same_updates_digest_alike() -> None:
    _source, deltas = source_with(4)
    hot = Replica("state/s", 0, Doc())
    cold = Replica("state/s", 0)
    for delta in reversed(deltas):
        hot.apply(delta)
        cold.apply(delta)
    assert is_hot(hot) and not is_hot(cold)
    assert (cold.sv, cold.hash) == (hot.sv, hot.hash)


def test_a_cold_replica_serves_what_a_peer_lacks_from_its_encoding() -> None:
    source, deltas = source_with(3)
    cold = Replica("state/s", 0)
    cold.apply(source.full_update())
    peer = Replica("state/s", 0, Doc())
    peer.apply(deltas[0])
    missing = cold.missing_for(peer.vector, peer.sv)
    assert missing is not None and not is_hot(cold)
    peer.apply(missing)
    assert peer.vector == source.vector and content(peer) == content(source)
    assert cold.missing_for(peer.vector, peer.sv) is None


def test_a_cold_replica_with_a_gap_claims_nothing_beyond_it() -> None:
    source = Replica("state/a", 0, Doc())
    first = source.write(lambda d: d.get("t", type=Text).insert(0, "abc")) or b""
    second = source.write(lambda d: d.get("t", type=Text).insert(3, "def")) or b""
    cold = Replica("state/a", 0)
    assert cold.apply(second) is False  # held, but the vector stops at the gap
    assert cold.vector == {}
    assert cold.apply(first) is True
    assert cold.vector == source.vector
    assert str(cold.doc.get("t", type=Text)) == "abcdef"


def test_a_malformed_update_leaves_a_cold_replica_untouched() -> None:
    source, _deltas = source_with(2)
    cold = Replica("state/s", 0)
    cold.apply(source.full_update())
    before = (cold.full_update(), cold.sv, cold.hash)
    for bad in (b"\xff" * 12, source.full_update()[:-1]):
        with pytest.raises(UpdateRejected):
            cold.apply(bad)
        with pytest.raises(UpdateRejected):
            cold.apply(bad, checked=True)  # even when the caller claims it checked it
    assert (cold.full_update(), cold.sv, cold.hash) == before and not is_hot(cold)


def test_a_cold_replica_journals_what_changed_it_and_replaying_the_journal_restores_it() -> None:
    source, deltas = source_with(4)
    cold = Replica("state/s", 0)
    journal: list[bytes] = []
    cold.journal = lambda _replica, update: journal.append(update)
    for delta in deltas + deltas[:2]:
        cold.apply(delta)
    assert journal == deltas  # duplicates are not journaled
    replay = Replica("state/s", 0)
    for update in journal:
        replay.apply(update)
    assert replay.sv == source.sv and content(replay) == content(source)


def test_a_cold_replica_merging_many_overwrites_stays_bounded() -> None:
    source = Replica("state/s", 0, Doc())
    cold = Replica("state/s", 0)
    for i in range(400):
        cold.apply(source.write(put(k="x" * 100 + str(i))) or b"")
    assert not is_hot(cold)
    # Merging keeps the content of every overwritten value (400 × 100 bytes); the encoding
    # is re-encoded through a scratch Doc before it grows past twice its size plus the slack.
    assert len(cold.full_update()) <= 2 * len(source.full_update()) + 2 * NORMALIZE_SLACK
    assert content(cold) == content(source)


def test_eviction_keeps_content_vector_and_journal() -> None:
    replica = Replica("state/a", 0, Doc())
    journal: list[bytes] = []
    replica.journal = lambda _replica, update: journal.append(update)
    replica.write(put(a=1))
    sv, digest = replica.sv, replica.hash
    assert replica.evict() and not is_hot(replica)
    assert (replica.sv, replica.hash) == (sv, digest)
    assert replica.evict() is False  # cold already
    replica.write(put(b=2))  # materializes, and its change is journaled as before
    assert is_hot(replica) and len(journal) == 2
    assert content(replica) == {"a": 1, "b": 2}


def test_a_pinned_replica_is_never_evicted() -> None:
    replica = Replica("reg/n", 0)
    replica.pin()
    assert is_hot(replica) and replica.evict() is False and is_hot(replica)


# ---------------------------------------------------------------------- the hot set


def test_the_hot_set_has_a_floor() -> None:
    assert HotSet(1).limit == MIN_HOT


def test_the_store_keeps_at_most_hot_documents_hot_least_recently_used_out() -> None:
    store = DocStore(hot_documents=MIN_HOT)
    replicas = [Replica(f"state/d{i}", 0) for i in range(3 * MIN_HOT)]
    for i, replica in enumerate(replicas):
        store.add(replica)
        replica.write(put(i=i))
        if i == 0:
            first = replica
        else:
            first.doc  # noqa: B018 (keeps the first one recently used)
    hot = [r for r in replicas if is_hot(r)]
    assert len(hot) == len(store.hot) == MIN_HOT
    assert is_hot(first)
    assert hot[-1] is replicas[-1]
    for i, replica in enumerate(replicas):  # every one reads back, and the bound holds
        assert content(replica) == {"i": i}
        assert sum(is_hot(r) for r in replicas) <= MIN_HOT


def test_pinned_replicas_do_not_count_against_the_hot_set() -> None:
    store = DocStore(hot_documents=MIN_HOT)
    pinned = [Replica(f"reg/n{i}", 0) for i in range(MIN_HOT)]
    for replica in pinned:
        replica.pin()
        store.add(replica)
    for i in range(2 * MIN_HOT):
        replica = Replica(f"state/d{i}", 0)
        store.add(replica)
        replica.write(put(i=i))
    assert all(is_hot(r) for r in pinned)
    assert len(store.hot) == MIN_HOT


def test_a_removed_replica_leaves_the_hot_set() -> None:
    store = DocStore(hot_documents=MIN_HOT)
    replica = Replica("state/a", 0, Doc())
    store.add(replica)
    assert len(store.hot) == 1
    store.remove("state/a")
    assert len(store.hot) == 0 and replica.hot_set is None


# ---------------------------------------------------------------------- in the protocol


def test_a_replicator_fills_a_fresh_node_with_cold_documents_and_persists_them() -> None:
    net = Net()
    a = net.add("a", tuning(hot_documents=MIN_HOT))
    b = net.add("b", tuning(hot_documents=MIN_HOT))
    net.connect()
    for i in range(5 * MIN_HOT):
        a.write(net.now, f"state/d{i}", put(i=i))
    net.run_until(net.now + 1.0)
    assert len(b.store) == 5 * MIN_HOT
    assert sum(is_hot(r) for r in a.store) <= MIN_HOT
    assert not any(is_hot(r) for r in b.store)  # pushes merged into encodings
    persisted = [o for o in net.outputs["b"] if isinstance(o, Persist) and o.update]
    assert {p.doc for p in persisted} == {r.name for r in b.store}
    assert {r.name: content(r) for r in b.store} == {r.name: content(r) for r in a.store}
    assert sum(is_hot(r) for r in b.store) <= MIN_HOT


def test_a_fresh_node_is_repaired_from_cold_documents() -> None:
    net = Net()
    a = net.add("a", tuning(hot_documents=MIN_HOT))
    for i in range(4 * MIN_HOT):
        a.write(net.now, f"state/d{i}", put(i=i))
    for replica in a.store:
        replica.evict()
    b = net.add("b", tuning(hot_documents=MIN_HOT))
    net.connect()
    net.sync("b", "a")
    assert a.store.digest() == b.store.digest()
    assert not any(is_hot(r) for r in a.store) and not any(is_hot(r) for r in b.store)
    assert {r.name: r.vector for r in b.store} == {r.name: r.vector for r in a.store}


@pytest.mark.parametrize("seed", range(3))
def test_random_hot_and_cold_mixes_converge(seed: int) -> None:
    rng = random.Random(seed)
    net = Net()
    nodes = [net.add(n, tuning(hot_documents=MIN_HOT)) for n in ("a", "b", "c")]
    net.connect()
    for step in range(300):
        node = rng.choice(nodes)
        name = f"state/d{rng.randrange(40)}"
        node.write(net.now, name, put(**{f"k{rng.randrange(4)}": step}))
        if rng.random() < 0.2:
            for replica in rng.choice(nodes).store:
                if rng.random() < 0.5:
                    replica.evict()
    net.run_until(net.now + 1.0)
    for node in nodes[1:]:
        net.sync(node.node, "a")
    for node in nodes[1:]:
        net.sync("a", node.node)
    expected = {r.name: content(r) for r in nodes[0].store}
    for node in nodes:
        assert node.store.digest() == nodes[0].store.digest()
        assert {r.name: content(r) for r in node.store} == expected
        assert len(node.store.hot) <= MIN_HOT


def test_hot_documents_is_validated() -> None:
    StorageTuning(hot_documents=MIN_HOT).validate()
    with pytest.raises(ConfigError):
        StorageTuning(hot_documents=MIN_HOT - 1).validate()


# ---------------------------------------------------------------------- cheap checks


def test_checking_an_update_agrees_with_a_scratch_pycrdt_doc() -> None:
    from meshd.replication import replica as replica_module

    # With the pinned pycrdt the binding's document is used (about half the cost).
    assert replica_module._SCRATCH_APPLY is not replica_module._scratch_apply_public
    source, deltas = source_with(3)
    whole = source.full_update()
    rng = random.Random(7)
    cases = [whole, *deltas, b"\x00\x00", b"", b"\x01", whole[:-3], whole[: len(whole) // 2]]
    cases += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))) for _ in range(300)]
    cases += [
        bytes([b ^ (1 << rng.randrange(8)) if i == j else b for i, b in enumerate(whole)])
        for j in rng.sample(range(len(whole)), 20)
    ]
    for update in cases:
        try:
            replica_module._scratch_apply_public(update)
            expected = True
        except (ValueError, RuntimeError):
            expected = False
        assert replica_module.check_update(update) is expected, update


def test_a_one_writer_vector_is_canonical_as_pycrdt_writes_it() -> None:
    from meshd.replication import vectors

    source, _ = source_with(200, client=2**40 + 5)  # clock and client need several bytes
    raw = bytes(source.doc.get_state())
    assert raw[0] == 1
    assert source.sv == raw == vectors.encode(vectors.decode(raw))
    created = Replica("state/s", 0)
    created.install(source.full_update())
    assert (created.sv, created.hash) == (source.sv, source.hash)
    assert not created.hot
