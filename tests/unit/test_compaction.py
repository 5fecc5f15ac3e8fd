"""Coordinated compaction of state documents: candidates, agreement, new epochs, rebasing.

Each node is a Replicator with a Compactor wired as the daemon wires them: document events
and vector reports go to the compactor, ``on_replaced`` computes the rebase operations and the
"replaced" event applies them (see ``meshd/node/node.py``).
"""

from __future__ import annotations

from typing import Any

import pytest
from pycrdt import Map
from replication_helpers import Net, change, content, edit, vector

from meshd.replication.core import DocEvent, Output, VectorReport
from meshd.replication.messages import Push, Query, Vectors
from meshd.replication.replica import Replica
from meshd.state import values
from meshd.state.compaction import (
    BASE_EPOCH,
    BASE_SV,
    META,
    CompactionTuning,
    Compactor,
    Rebase,
    fresh_copy,
    rebase,
)

DOC = "state/doc"
TUNING = CompactionTuning(
    check_interval=60.0, min_bytes=8 * 1024, ratio=4.0, quiet=30.0, agree_timeout=10.0
)


def setk(key: str, value: Any) -> dict[str, Any]:
    return {"op": "set", "path": [key], "value": value}


def churn(core_or_replica: Any, now: float = 0.0, name: str = DOC, keys: int = 3000) -> None:
    """Add ``keys`` distinct keys, then delete them all (batches of at most 1000 ops)."""
    for verb in ("set", "delete"):
        for start in range(0, keys, 1000):
            ops = [
                {"op": verb, "path": [f"churn-{i}"], **({"value": i} if verb == "set" else {})}
                for i in range(start, min(keys, start + 1000))
            ]
            if isinstance(core_or_replica, Replica):
                edit(core_or_replica, ops)
            else:
                change(core_or_replica, now, name, ops)


class Cluster:
    def __init__(self, *names: str, tuning: CompactionTuning = TUNING) -> None:
        self.net = Net()
        self.live = set(names)
        self.compactors: dict[str, Compactor] = {}
        self.rebases: dict[str, dict[str, Rebase]] = {}
        self.rebased: dict[str, int] = {}
        for name in names:
            core = self.net.add(name)
            self.compactors[name] = Compactor(
                core, tuning, lambda name=name: name == min(self.live), "state/"
            )
            self.rebases[name] = {}
            self.rebased[name] = 0
            core.on_replaced = lambda old, new, name=name: self._replaced(name, old, new)
            self.net.listeners[name].append(lambda out, name=name: self._output(name, out))
        self.net.connect()

    def _replaced(self, node: str, old: Replica, new: Replica) -> None:
        found = rebase(old, new)
        if found is not None:
            self.rebases[node][new.name] = found

    def _output(self, node: str, out: Output) -> None:
        compactor = self.compactors[node]
        if isinstance(out, VectorReport):
            compactor.on_report(out, self.net.now)
        elif isinstance(out, DocEvent):
            compactor.on_doc_event(out, self.net.now)
            found = self.rebases[node].pop(out.name, None) if out.kind == "replaced" else None
            if found is not None:
                core = self.net[node]
                replica = core.store.get(out.name)
                epoch = replica.epoch if replica is not None else 0
                self.rebased[node] += 1
                core.write(self.net.now, out.name, found.apply, epoch=epoch)

    def __getitem__(self, name: str) -> Compactor:
        return self.compactors[name]

    def replica(self, node: str, name: str = DOC) -> Replica:
        replica = self.net[node].store.get(name)
        assert replica is not None
        return replica

    def settle(self) -> None:
        self.net.run(0.01)
        for a in sorted(self.net.nodes):
            for b in sorted(self.net.nodes):
                if a != b:
                    self.net.sync(a, b)

    def tick(self, node: str) -> None:
        self.compactors[node].tick(self.net.now)
        self.net.deliver()

    def agreed(self, name: str = DOC) -> bool:
        replicas = [self.replica(n, name) for n in self.net.nodes]
        first = replicas[0]
        return all(
            r.epoch == first.epoch and vector(r) == vector(first) and content(r) == content(first)
            for r in replicas
        )


# ---------------------------------------------------------------------- candidates


def test_a_churned_document_is_a_candidate_once_quiet() -> None:
    cluster = Cluster("a")
    core = cluster.net["a"]
    churn(core)
    change(core, 0.0, DOC, [setk("kept", 1)])
    cluster.net.collect()
    compactor = cluster["a"]
    replica = cluster.replica("a")
    assert replica.encoded_size() > 8 * 1024
    assert compactor.candidates(10.0) == []  # changed 10 s ago: not quiet yet
    assert compactor.candidates(31.0) == [replica]


def test_size_threshold() -> None:
    cluster = Cluster("a", tuning=CompactionTuning(min_bytes=10 << 20))
    churn(cluster.net["a"])
    cluster.net.collect()
    assert cluster["a"].candidates(100.0) == []


def test_ratio_threshold() -> None:
    """A large document with little history is not worth compacting."""
    cluster = Cluster("a")
    core = cluster.net["a"]
    for start in range(0, 3000, 1000):
        change(core, 0.0, DOC, [setk(f"k{i}", "v" * 10) for i in range(start, start + 1000)])
    cluster.net.collect()
    replica = cluster.replica("a")
    assert replica.encoded_size() > 8 * 1024
    assert cluster["a"].candidates(100.0) == []


def test_only_the_coordinator_tracks_changes_and_a_new_coordinator_seeds_with_all() -> None:
    cluster = Cluster("a", "b")
    churn(cluster.net["a"])
    cluster.settle()
    compactor = cluster["b"]  # "a" coordinates
    assert compactor.pending == 1
    cluster.tick("b")
    assert compactor.pending == 0 and compactor.last_change == {}
    compactor.on_doc_event(DocEvent("updated", DOC), cluster.net.now)
    assert compactor.pending == 0 and compactor.last_change == {}
    # "a" is gone: "b" coordinates, and examines every document it holds.
    compactor.is_coordinator = lambda: True
    cluster.net.run(100.0)
    assert [r.name for r in compactor.candidates(cluster.net.now)] == [DOC]


def test_only_documents_under_the_prefix() -> None:
    cluster = Cluster("a")
    churn(cluster.net["a"], name="other/doc")
    cluster.net.collect()
    assert cluster["a"].candidates(100.0) == []


def test_last_change_follows_events() -> None:
    cluster = Cluster("a")
    compactor = cluster["a"]
    compactor.on_doc_event(DocEvent("updated", DOC), 5.0)
    compactor.on_doc_event(DocEvent("updated", "reg/x"), 5.0)
    assert compactor.last_change == {DOC: 5.0}
    compactor.on_doc_event(DocEvent("dropped", DOC), 6.0)
    assert compactor.last_change == {}


# ---------------------------------------------------------------------- coordination


def test_only_the_coordinator_compacts() -> None:
    cluster = Cluster("a", "b")
    churn(cluster.net["b"])
    cluster.settle()
    cluster.net.run(100.0)
    cluster.net.delivered.clear()
    cluster.tick("b")
    assert cluster.net.sent(Query) == []
    assert cluster["b"].stats.checks == 0
    assert cluster.replica("b").epoch == 0


def test_a_lone_coordinator_compacts_without_asking() -> None:
    cluster = Cluster("a")
    churn(cluster.net["a"])
    change(cluster.net["a"], 0.0, DOC, [setk("kept", [1, 2])])
    cluster.net.collect()
    cluster.net.run(100.0)
    cluster.tick("a")
    replica = cluster.replica("a")
    assert replica.epoch == 1
    assert content(replica) == {"kept": [1, 2]}
    assert cluster["a"].stats.compactions == 1


def multi_writer_history(cluster: Cluster) -> None:
    """Every node writes; the updates reach the nodes in different orders."""
    names = sorted(cluster.net.nodes)
    churn(cluster.net[names[0]])
    cluster.net.run(0.01)
    for i, name in enumerate(names):
        change(cluster.net[name], cluster.net.now, DOC, [setk(f"from-{name}", i)])
        change(cluster.net[name], cluster.net.now, DOC, [{"op": "incr", "path": ["hits"]}])
        change(cluster.net[name], cluster.net.now, f"state/own-{name}", [setk("x", i)])
    cluster.settle()


def test_agreement_compacts_and_every_replica_switches() -> None:
    cluster = Cluster("a", "b", "c")
    multi_writer_history(cluster)
    assert cluster.agreed()
    before = cluster.replica("a").encoded_size()
    expected = content(cluster.replica("a"))
    cluster.net.run(100.0)
    cluster.net.delivered.clear()
    cluster.tick("a")
    queries = cluster.net.sent(Query, src="a")
    assert sorted(q.dst for q in queries) == ["b", "c"]
    assert len(cluster.net.sent(Vectors)) == 2
    assert cluster["a"].stats.checks == 1
    assert cluster["a"].stats.compactions == 1
    cluster.settle()
    for node in "abc":
        replica = cluster.replica(node)
        assert replica.epoch == 1, node
        assert content(replica) == expected
    assert cluster.agreed()
    assert cluster.replica("a").encoded_size() < before / 10
    # Small documents were not touched.
    assert cluster.replica("a", "state/own-b").epoch == 0
    assert sum(cluster.rebased.values()) == 0


def test_one_replica_that_disagrees_prevents_compaction() -> None:
    cluster = Cluster("a", "b", "c")
    multi_writer_history(cluster)
    # c holds a write nobody else has (its pushes are lost).
    cluster.net.drop = lambda src, _dst, m: src == "c" and isinstance(m, Push)
    change(cluster.net["c"], cluster.net.now, DOC, [setk("only-on-c", 1)])
    cluster.net.run(100.0)
    cluster.net.drop = None
    cluster.tick("a")
    assert cluster["a"].stats.checks == 1
    assert cluster["a"].stats.compactions == 0
    assert all(cluster.replica(n).epoch == 0 for n in "abc")
    # Once everyone holds the same again, the next check compacts.
    cluster.settle()
    cluster.net.run(100.0)
    cluster.tick("a")
    assert cluster["a"].stats.compactions == 1
    cluster.settle()
    assert cluster.agreed()
    assert content(cluster.replica("b"))["only-on-c"] == 1


def test_a_replica_that_does_not_answer_prevents_compaction() -> None:
    cluster = Cluster("a", "b", "c")
    multi_writer_history(cluster)
    cluster.net.run(100.0)
    cluster.net.drop = lambda src, _dst, m: src == "c" and isinstance(m, Vectors)
    cluster.tick("a")
    assert cluster["a"].stats.compactions == 0
    cluster.net.run(5.0)
    cluster.tick("a")  # still waiting
    cluster.net.run(6.0)
    cluster.tick("a")  # past agree_timeout: given up until the next interval
    cluster.net.drop = None
    cluster.tick("a")
    assert cluster["a"].stats.checks == 1
    assert cluster["a"].stats.compactions == 0
    assert cluster.replica("a").epoch == 0
    cluster.net.run(60.0)
    cluster.tick("a")
    assert cluster["a"].stats.checks == 2
    assert cluster["a"].stats.compactions == 1


def test_a_write_during_the_check_defers_compaction() -> None:
    cluster = Cluster("a", "b")
    churn(cluster.net["a"])
    cluster.settle()
    cluster.net.run(100.0)
    cluster.compactors["a"].tick(cluster.net.now)
    held = cluster.net.hold()  # the queries are under way ...
    change(cluster.net["a"], cluster.net.now, DOC, [setk("late", 1)])  # ... when a writes
    cluster.net.in_flight = held
    cluster.net.deliver()
    assert cluster["a"].stats.compactions == 0


# ---------------------------------------------------------------------- content of the new epoch


def test_fresh_copy_keeps_content_counters_and_text() -> None:
    a, b = Replica(DOC, 0), Replica(DOC, 0)
    edit(a, [setk("c", {"$counter": 1}), setk("t", {"$text": "hello"})])
    b.apply(a.full_update())
    edit(a, [{"op": "incr", "path": ["c"], "by": 10}])
    edit(b, [{"op": "incr", "path": ["c"], "by": 100}])  # another slot
    edit(b, [{"op": "text_insert", "path": ["t"], "index": 5, "text": " wörld"}])
    edit(a, [setk("m", {"l": [1, {"$counter": 4}, {"$text": "x"}], "f": 1.5, "n": None})])
    a.apply(b.full_update())
    fresh = Replica(DOC, 1, fresh_copy(a))
    assert (
        content(fresh)
        == content(a)
        == {
            "c": 111,
            "t": "hello wörld",
            "m": {"l": [1, 4, "x"], "f": 1.5, "n": None},
        }
    )
    meta = fresh.doc.get(META, type=Map)
    assert bytes(meta[BASE_SV]) == a.sv
    assert meta[BASE_EPOCH] == 0
    # Counters are still counters and texts still texts: later ops work and merge.
    other = Replica(DOC, 1)
    other.apply(fresh.full_update())
    edit(fresh, [{"op": "incr", "path": ["c"], "by": 1}])
    edit(other, [{"op": "incr", "path": ["c"], "by": 2}])
    edit(other, [{"op": "text_insert", "path": ["t"], "index": 0, "text": "¡"}])
    other.apply(fresh.full_update())
    fresh.apply(other.full_update())
    assert content(fresh) == content(other)
    assert content(fresh)["c"] == 114
    assert content(fresh)["t"] == "¡hello wörld"


def test_compaction_shrinks_a_churned_document() -> None:
    replica = Replica(DOC, 0)
    churn(replica)
    edit(replica, [setk("kept", "value")])
    before = replica.encoded_size()
    fresh = fresh_copy(replica)
    after = len(fresh.get_update())
    assert before > 20_000
    assert after < 200
    assert content(Replica(DOC, 1, fresh)) == {"kept": "value"}


def test_compacted_document_replaces_the_old_epoch_on_a_fresh_replica() -> None:
    cluster = Cluster("a", "b")
    churn(cluster.net["a"])
    change(cluster.net["a"], 0.0, DOC, [setk("kept", 1)])
    cluster.settle()
    cluster.net.run(100.0)
    cluster.tick("a")
    cluster.net.add("c")
    cluster.net.connect()
    cluster.net.sync("c", "a")
    assert cluster.replica("c").epoch == 1
    assert content(cluster.replica("c")) == {"kept": 1}


# ---------------------------------------------------------------------- rebasing racing writes


def race() -> tuple[Replica, Replica]:
    """b's old copy (with writes made after the snapshot) and the new epoch built from a."""
    a = Replica(DOC, 0)
    edit(a, [setk("k", 1), setk("gone", 1), setk("c", {"$counter": 5}), setk("same", "x")])
    b = Replica(DOC, 0)
    b.apply(a.full_update())
    new = Replica(DOC, 1, fresh_copy(a))  # the snapshot
    return b, new


def rebase_onto(old: Replica, new: Replica) -> Rebase | None:
    """Compute the rebase of ``old`` onto ``new`` and apply it there, as a node does."""
    found = rebase(old, new)
    if found is not None:
        new.write(found.apply)
    return found


def test_a_rebase_reapplies_writes_that_raced_the_compaction() -> None:
    old, new = race()
    edit(old, [setk("k", 2), setk("added", {"m": [1]})])
    edit(old, [{"op": "incr", "path": ["c"], "by": 3}])
    found = rebase_onto(old, new)
    assert found is not None
    assert sorted(found.sets) == ["added", "k"]  # the counter is carried, not set again
    assert list(found.slots) == [values.counter_names(old.doc.get(values.ROOT, type=Map)).pop()]
    assert content(new) == content(old)


def test_a_rebase_reapplies_deletes_that_raced_the_compaction() -> None:
    old, new = race()
    edit(old, [{"op": "delete", "path": ["gone"]}])
    found = rebase_onto(old, new)
    assert found is not None and found.deletes == ["gone"] and not found.sets
    assert content(new) == content(old)


def test_there_is_nothing_to_rebase_without_a_race() -> None:
    old, new = race()
    assert rebase(old, new) is None
    # Without a record of the snapshot's origin there is nothing to rebase either.
    plain = Replica(DOC, 1)
    edit(old, [setk("k", 5)])
    assert rebase(old, plain) is None
    garbage = Replica(DOC, 1)
    garbage.write(lambda d: d.get(META, type=Map).__setitem__(BASE_SV, b"\xff\xff"))
    assert rebase(old, garbage) is None


def test_a_write_racing_the_compaction_is_rebased_onto_the_new_epoch() -> None:
    cluster = Cluster("a", "b")
    churn(cluster.net["a"])
    change(
        cluster.net["a"],
        0.0,
        DOC,
        [setk("k", 1), setk("gone", True), setk("c", {"$counter": 5}), setk("t", {"$text": "ab"})],
    )
    cluster.settle()
    cluster.net.run(100.0)
    # The coordinator checks, everyone agrees, it compacts; its push of the new epoch is lost.
    cluster.net.drop = lambda src, _dst, m: src == "a" and isinstance(m, Push)
    cluster.tick("a")
    cluster.net.run(0.01)
    assert cluster["a"].stats.compactions == 1
    assert cluster.replica("a").epoch == 1
    assert cluster.replica("b").epoch == 0
    # Meanwhile b writes on the old epoch: a ignores that push (a stale epoch there).
    change(
        cluster.net["b"], cluster.net.now, DOC, [setk("k", 2), {"op": "delete", "path": ["gone"]}]
    )
    change(cluster.net["b"], cluster.net.now, DOC, [{"op": "incr", "path": ["c"], "by": 3}])
    cluster.net.run(0.01)
    assert cluster.net["a"].stats.stale_epochs >= 1
    assert content(cluster.replica("a")) == {"k": 1, "gone": True, "c": 5, "t": "ab"}
    # Now the new epoch reaches b: b re-applies its racing writes onto it.
    cluster.net.drop = None
    cluster.net.sync("b", "a")
    cluster.settle()
    assert cluster.rebased == {"a": 0, "b": 1}
    assert cluster.agreed()
    assert content(cluster.replica("a")) == {"k": 2, "c": 8, "t": "ab"}
    assert cluster.replica("b").epoch == 1


@pytest.mark.parametrize("increments", [1, 4])
def test_counters_add_the_increments_the_snapshot_missed(increments: int) -> None:
    old, new = race()
    for _ in range(increments):
        edit(old, [{"op": "incr", "path": ["c"], "by": 2}])
    rebase_onto(old, new)
    assert content(new)["c"] == 5 + 2 * increments
    # Applying the same rebase again changes nothing: carrying is idempotent.
    found = rebase(old, new)
    assert found is None or not found.slots
    assert content(new)["c"] == 5 + 2 * increments


def test_rebase_never_deletes_keys_written_on_the_new_epoch() -> None:
    old, new = race()
    edit(old, [{"op": "delete", "path": ["gone"]}])
    # Before the new epoch reached this replica, someone else wrote a new key on it.
    other = Replica(DOC, 1)
    other.apply(new.full_update())
    edit(other, [setk("newer", 1)])
    new.apply(other.full_update())
    found = rebase(old, new)
    assert found is None or "newer" not in found.deletes


def test_increments_made_on_the_new_epoch_before_the_rebase_are_kept() -> None:
    old, new = race()
    edit(old, [{"op": "incr", "path": ["c"], "by": 2}])
    edit(new, [{"op": "incr", "path": ["c"], "by": 10}])  # another replica, on the new epoch
    rebase_onto(old, new)
    assert content(new)["c"] == 5 + 2 + 10


def test_a_racing_increment_held_by_two_replicas_counts_once() -> None:
    b, new = race()
    edit(b, [{"op": "incr", "path": ["c"], "by": 3}])
    c = Replica(DOC, 0)
    c.apply(b.full_update())  # b's racing increment reached c on the old epoch
    new_b, new_c = Replica(DOC, 1), Replica(DOC, 1)
    new_b.apply(new.full_update())
    new_c.apply(new.full_update())
    rebase_onto(b, new_b)
    rebase_onto(c, new_c)
    new_b.apply(new_c.full_update())
    new_c.apply(new_b.full_update())
    assert content(new_b)["c"] == content(new_c)["c"] == 8


def test_a_replica_holding_more_of_a_writer_carries_the_newer_total() -> None:
    b, new = race()
    edit(b, [{"op": "incr", "path": ["c"], "by": 3}])
    c = Replica(DOC, 0)
    c.apply(b.full_update())  # c has b's first increment only
    edit(b, [{"op": "incr", "path": ["c"], "by": -1}])  # b's second: a decrement
    new_b, new_c = Replica(DOC, 1), Replica(DOC, 1)
    for replica in (new_b, new_c):
        replica.apply(new.full_update())
    rebase_onto(c, new_c)
    rebase_onto(b, new_b)
    for x, y in ((new_b, new_c), (new_c, new_b)):
        x.apply(y.full_update())
    assert content(new_b)["c"] == content(new_c)["c"] == 5 + 3 - 1


def test_a_counter_created_during_the_race_is_carried_with_its_slots() -> None:
    b, new = race()
    edit(b, [{"op": "incr", "path": ["fresh"], "by": 4}, setk("reset", {"$counter": 7})])
    c = Replica(DOC, 0)
    c.apply(b.full_update())
    new_b, new_c = Replica(DOC, 1), Replica(DOC, 1)
    for replica in (new_b, new_c):
        replica.apply(new.full_update())
    rebase_onto(b, new_b)
    rebase_onto(c, new_c)
    for x, y in ((new_b, new_c), (new_c, new_b)):
        x.apply(y.full_update())
    assert content(new_b) == content(new_c)
    assert content(new_b)["fresh"] == 4 and content(new_b)["reset"] == 7


def test_compaction_keeps_counts_texts_and_once_keys_across_epochs() -> None:
    a = Replica(DOC, 0)
    edit(a, [setk("c", {"$counter": 5}), setk("t", {"$text": "ab"}), setk("n", {"m": [1.0]})])
    a.write(lambda d: values.record_once(d, "key-1", 1))
    b = Replica(DOC, 0)
    b.apply(a.full_update())
    edit(b, [{"op": "incr", "path": ["c"], "by": 2}])
    a.apply(b.full_update())
    one = Replica(DOC, 1, fresh_copy(a))
    edit(one, [{"op": "incr", "path": ["c"], "by": 1}])
    two = Replica(DOC, 2, fresh_copy(one))  # a second compaction: carried slots carry again
    assert content(two) == content(a) | {"c": 8}
    assert values.applied_once(two.doc, "key-1")
    assert isinstance(
        values.to_plain(two.doc.get(values.ROOT, type=Map), marked=True)["t"], values.TextStr
    )


def test_a_check_examines_only_documents_changed_since_the_last_one() -> None:
    cluster = Cluster("a")
    core = cluster.net["a"]
    for i in range(50):
        change(core, 0.0, f"state/small-{i}", [setk("k", i)])
    cluster.net.collect()
    compactor = cluster["a"]
    assert compactor.pending == 50
    assert compactor.candidates(100.0) == []
    assert compactor.pending == 0  # examined: none is worth it, none is looked at again
    cluster.net.now = 200.0  # the time the compactor hears of the changes
    churn(core, 200.0)
    change(core, 200.0, DOC, [setk("kept", 1)])
    cluster.net.collect()
    assert compactor.pending == 1
    assert compactor.candidates(210.0) == []  # not quiet yet: still pending
    assert compactor.pending == 1
    assert compactor.candidates(231.0) == [cluster.replica("a")]
    assert compactor.pending == 1  # a candidate stays until compacted
