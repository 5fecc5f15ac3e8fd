"""The registry: index and lookups, the duplicate-name rule, events, liveness and epochs.

Each node is a :class:`Registry` on its own :class:`Replicator`, wired as the daemon wires
them (accept policy, on_open, on_drop); the replicators talk through the ``Net`` harness.
Membership is a :class:`StaticLiveness`: a plain object the test sets by hand.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from fakes import StaticLiveness
from pycrdt import Doc, Map
from replication_helpers import Net

from meshd.registry.model import Entry
from meshd.registry.registry import DOC_PREFIX, ROOT, Registry, RegistryEvent, doc_name
from meshd.registry.resolve import order_key, winner
from meshd.replication.messages import Push
from meshd_client.protocol import cbor, errors


class World:
    def __init__(self, *names: str, epoch: int = 1) -> None:
        self.net = Net()
        self.liveness = StaticLiveness()
        self.regs: dict[str, Registry] = {}
        self.events: dict[str, list[RegistryEvent]] = {}
        self.wall = 1_000_000
        for name in names:
            self.add(name, epoch)
        self.net.connect()
        self.settle()

    def add(self, name: str, epoch: int = 1) -> Registry:
        def accept(doc: str, epoch: int) -> bool:  # the registry is built just below
            return self.regs[name].accept(doc, epoch)

        core = self.net.add(name, accept=accept)
        reg = Registry(
            node=name,
            epoch=epoch,
            docs=core,
            liveness=self.liveness,
            wall_ms=lambda: self.wall,
            reclaim_after=3600.0,
        )
        core.on_open = reg.on_open
        core.on_drop = reg.on_drop
        self.regs[name] = reg
        self.events[name] = []
        reg.listeners.append(self.events[name].append)
        self.liveness.set_up(name, epoch)
        reg.open_own()
        return reg

    def __getitem__(self, name: str) -> Registry:
        return self.regs[name]

    def settle(self) -> None:
        """Let pushes travel, then one anti-entropy round between every pair."""
        self.net.run(0.01)
        names = sorted(self.net.nodes)
        for a, b in itertools.permutations(names, 2):
            self.net.sync(a, b)

    def register(self, node: str, name: str, **kwargs: Any) -> Entry:
        self.wall += 1
        entry, _ = self.regs[node].register(self.net.now, name, **kwargs)
        return entry

    def kill(self, node: str) -> None:
        """``node`` is declared dead: it leaves the network and every survivor hears of it."""
        self.liveness.set_down(node, self.net.now)
        self.net.nodes.pop(node)
        self.regs.pop(node)
        for reg in self.regs.values():
            reg.node_changed(node)
        self.net.connect()

    def kinds(self, node: str, name: str | None = None) -> list[str]:
        return [e.kind for e in self.events[node] if name is None or e.name == name]

    def clear_events(self) -> None:
        for events in self.events.values():
            events.clear()


def entry(name: str, node: str, at: int, eid: str | None = None, **kw: Any) -> Entry:
    return Entry(
        name=name,
        node=node,
        kind=kw.get("kind", ""),
        capabilities=tuple(kw.get("capabilities", ())),
        metadata=kw.get("metadata", {}),
        registered_at=at,
        entry_id=eid or f"{node}/1/{at}",
    )


# ---------------------------------------------------------------------- the rule, pure


def test_winner_of_nothing() -> None:
    assert winner([]) is None


def test_earliest_registration_wins() -> None:
    early, late = entry("x", "zed", 10), entry("x", "alpha", 20)
    assert winner([late, early]) == early
    assert winner([early, late]) == early


def test_equal_times_fall_back_to_node_then_entry_id() -> None:
    a, b = entry("x", "a", 10, "a/1/5"), entry("x", "b", 10, "b/1/1")
    assert winner([b, a]) == a
    a2 = entry("x", "a", 10, "a/1/4")
    assert winner([a, b, a2]) == a2
    assert order_key(a2) < order_key(a) < order_key(b)


def test_the_rule_is_a_total_order_independent_of_input_order() -> None:
    candidates = [
        entry("x", node, at, f"{node}/{i}")
        for i, (node, at) in enumerate(itertools.product("cab", (30, 10, 20)))
    ]
    expected = min(candidates, key=order_key)
    for perm in itertools.permutations(candidates[:6]):
        assert winner(perm) == min(perm, key=order_key)
    assert winner(reversed(candidates)) == expected
    assert winner(iter(candidates)) == expected  # any iterable


# ---------------------------------------------------------------------- registration & lookups


def test_registration_is_visible_everywhere() -> None:
    w = World("a", "b", "c")
    e = w.register(
        "a", "alpha", kind="worker", capabilities=["gpu", "gpu", "cpu"], metadata={"v": 1}
    )
    assert e.node == "a"
    assert e.capabilities == ("gpu", "cpu")
    assert e.entry_id == "a/1/1"
    assert e.registered_at == w.wall
    w.settle()
    for node in "abc":
        assert w[node].lookup("alpha") == e
        assert len(w[node]) == 1
        assert w.events[node] == [RegistryEvent("registered", "alpha", e)]
    assert w["a"].holds("alpha") == e
    assert w["b"].holds("alpha") is None


def test_a_node_that_joins_later_indexes_what_a_repair_brings() -> None:
    """The registry document of another node reaches a newcomer by anti-entropy, which
    creates it there holding its content: the index must hear of that content too."""
    w = World("a", "b")
    e = w.register("a", "alpha", kind="worker")
    w.settle()
    w.add("c")
    w.net.connect()
    w.net.sync("c", "a")  # a fresh node fills itself from one peer
    assert w["c"].lookup("alpha") == e
    assert w.events["c"] == [RegistryEvent("registered", "alpha", e)]


def test_index_filters() -> None:
    w = World("a", "b")
    w.register("a", "w1", kind="worker", capabilities=["gpu"])
    w.register("a", "w2", kind="worker", capabilities=["cpu"])
    w.register("b", "w3", kind="worker", capabilities=["gpu", "cpu"])
    w.register("b", "s1", kind="store", capabilities=["disk"])
    w.settle()
    for node in "ab":
        reg = w[node]

        def names(**kw: Any) -> list[str]:
            return [e.name for e in reg.entries(**kw)]  # noqa: B023

        assert names() == ["s1", "w1", "w2", "w3"]
        assert names(kind="worker") == ["w1", "w2", "w3"]
        assert names(kind="store") == ["s1"]
        assert names(kind="nothing") == []
        assert names(capability="gpu") == ["w1", "w3"]
        assert names(capability="cpu", kind="worker") == ["w2", "w3"]
        assert names(capability="gpu", node="b") == ["w3"]
        assert names(node="a") == ["w1", "w2"]
        assert names(node="b", kind="store") == ["s1"]
        assert names(node="nobody") == []
    # Unregistering removes a name from every index.
    w["a"].unregister(w.net.now, "w1")
    w.settle()
    for node in "ab":
        assert [e.name for e in w[node].entries(capability="gpu")] == ["w3"]
        assert [e.name for e in w[node].entries(node="a")] == ["w2"]


def test_indexes_only_list_winners() -> None:
    w = World("a", "b")
    w.net.drop = lambda *_: True  # partitioned: both register "x"
    first = w.register("a", "x", kind="first", capabilities=["one"])
    w.register("b", "x", kind="second", capabilities=["two"])
    w.net.run(0.01)
    w.net.drop = None
    w.settle()
    for node in "ab":
        assert w[node].lookup("x") == first
        assert w[node].entries(kind="second") == []
        assert w[node].entries(capability="two") == []
        assert w[node].entries(node="b") == []
        assert w[node].entries(kind="first") == [first]


def test_unregister() -> None:
    w = World("a", "b")
    e = w.register("a", "alpha")
    w.settle()
    assert w["b"].unregister(w.net.now, "alpha") == (False, None)  # b holds no such entry
    assert w["a"].unregister(w.net.now, "nothing") == (False, None)
    ok, token = w["a"].unregister(w.net.now, "alpha")
    assert ok
    assert token is None
    w.settle()
    for node in "ab":
        assert w[node].lookup("alpha") is None
        assert w.kinds(node) == ["registered", "unregistered"]
        assert w.events[node][-1] == RegistryEvent("unregistered", "alpha", e)
    assert w["a"].stats.registrations == 1
    assert w["a"].stats.unregistrations == 1


def test_an_unregistration_whose_push_was_lost_is_repaired() -> None:
    w = World("a", "b")
    w.register("a", "alpha")
    w.settle()
    w.net.drop = lambda _s, _d, m: isinstance(m, Push)
    w["a"].unregister(w.net.now, "alpha")
    w.net.run(0.01)
    assert w["b"].lookup("alpha") is not None
    w.net.drop = None
    w.net.sync("b", "a")
    assert w["b"].lookup("alpha") is None
    assert w.kinds("b") == ["registered", "unregistered"]


def test_register_validates_its_arguments() -> None:
    w = World("a")
    bad: list[dict[str, Any]] = [
        {"name": ""},
        {"name": "x" * 257},
        {"name": "a\nb"},
        {"name": "ok", "kind": "k" * 129},
        {"name": "ok", "capabilities": ["c" * 129]},
        {"name": "ok", "capabilities": [""]},
        {"name": "ok", "capabilities": [1]},
        {"name": "ok", "metadata": {"nested": {"a": 1}}},
        {"name": "ok", "metadata": {"big": "x" * 5000}},
    ]
    for kwargs in bad:
        with pytest.raises(errors.Invalid):
            w["a"].register(0.0, **kwargs)
    assert len(w["a"]) == 0


def test_register_refuses_a_name_held_by_a_live_entry() -> None:
    w = World("a", "b")
    held = w.register("a", "alpha")
    w.settle()
    with pytest.raises(errors.Conflict) as info:
        w.register("b", "alpha")
    assert info.value.detail == {"holder": held.to_dict()}
    with pytest.raises(errors.Conflict):
        w.register("a", "alpha")  # its own node too
    # Once the holder's node is dead the name is free.
    w.kill("a")
    again = w.register("b", "alpha")
    assert w["b"].lookup("alpha") == again


# ---------------------------------------------------------------------- liveness & events


def test_entries_of_a_dead_node_stop_resolving_everywhere() -> None:
    w = World("a", "b", "c")
    e = w.register("a", "alpha")
    w.register("b", "beta")
    w.settle()
    w.clear_events()
    w.kill("a")
    for node in "bc":
        assert w[node].lookup("alpha") is None
        assert w[node].lookup("beta") is not None
        assert w.events[node] == [RegistryEvent("unregistered", "alpha", e)]


def test_a_node_always_resolves_its_own_entries() -> None:
    w = World("a", "b")
    e = w.register("a", "alpha")
    w.liveness.set_down("a", 0.0)  # whatever membership thinks of itself
    w["a"].node_changed("a")
    assert w["a"].lookup("alpha") == e


def test_a_node_that_comes_back_resolves_again() -> None:
    w = World("a", "b")
    e = w.register("a", "alpha")
    w.settle()
    w.liveness.set_down("a", 0.0)
    w["b"].node_changed("a")
    assert w["b"].lookup("alpha") is None
    w.liveness.set_up("a", 1)
    w["b"].node_changed("a")
    assert w["b"].lookup("alpha") == e
    assert w.kinds("b") == ["registered", "unregistered", "registered"]


def test_moved_when_the_winner_goes_away() -> None:
    w = World("a", "b", "c")
    w.net.drop = lambda *_: True
    first = w.register("a", "x")
    second = w.register("b", "x")
    w.net.run(0.01)
    w.net.drop = None
    w.settle()
    w.clear_events()
    w.kill("a")
    for node in "bc":
        assert w[node].lookup("x") == second
        assert w.events[node] == [RegistryEvent("moved", "x", second, previous=first)]


def test_moved_when_the_winner_unregisters() -> None:
    w = World("a", "b", "c")
    w.net.drop = lambda *_: True
    first = w.register("a", "x")
    second = w.register("b", "x")
    w.net.run(0.01)
    w.net.drop = None
    w.settle()
    w.clear_events()
    w["a"].unregister(w.net.now, "x")
    w.settle()
    for node in "abc":
        assert w.events[node] == [RegistryEvent("moved", "x", second, previous=first)], node


def test_conflict_is_reported_exactly_once_per_losing_entry_on_every_node() -> None:
    w = World("a", "b", "c")
    # A partition: a alone, b and c together. Both sides register "x"; a's is earlier.
    w.net.drop = lambda src, dst, _m: (src == "a") != (dst == "a")
    first = w.register("a", "x")
    second = w.register("b", "x")
    w.settle()
    assert w["c"].lookup("x") == second
    w.net.drop = None
    w.settle()
    for node in "abc":
        assert w[node].lookup("x") == first
        conflicts = [e for e in w.events[node] if e.kind == "conflict"]
        assert conflicts == [RegistryEvent("conflict", "x", second, winner=first)], node
        assert w[node].stats.conflicts == 1
    # More churn recomputes "x" again and again: no second report.
    for node in "abc":
        for other in "abc":
            w[node].node_changed(other)
    w.register("c", "y")
    w.settle()
    for node in "abc":
        assert [e.kind for e in w.events[node]].count("conflict") == 1
    # The loser's node removes its entry (as the daemon does): nothing else changes.
    w.clear_events()
    w["b"].unregister(w.net.now, "x")
    w.settle()
    for node in "abc":
        assert w.events[node] == []
        assert w[node].lookup("x") == first


def test_conflict_with_equal_times_is_decided_by_node_name() -> None:
    w = World("a", "b")
    w.net.drop = lambda *_: True
    w.wall = 5_000
    ea, _ = w["a"].register(0.0, "x")
    eb, _ = w["b"].register(0.0, "x")
    assert ea.registered_at == eb.registered_at
    w.net.run(0.01)
    w.net.drop = None
    w.settle()
    for node in "ab":
        assert w[node].lookup("x") == ea
        assert [e for e in w.events[node] if e.kind == "conflict"] == [
            RegistryEvent("conflict", "x", eb, winner=ea)
        ]


def test_a_dead_loser_is_no_conflict() -> None:
    w = World("a", "b")
    w.net.drop = lambda *_: True
    w.register("a", "x")
    w.register("b", "x")
    w.net.run(0.01)
    w.liveness.set_down("b", 0.0)  # b dies before its entry reaches a
    w["a"].node_changed("b")
    w.net.drop = None
    w.net.sync("b", "a")
    assert "conflict" not in w.kinds("a")


# ---------------------------------------------------------------------- epochs


def test_entries_of_a_superseded_epoch_stop_resolving() -> None:
    w = World("a", "b")
    old = w.register("b", "beta")
    w.settle()
    w.clear_events()
    w.liveness.set_up("b", 2)  # b restarted: membership gossips its new boot epoch
    w["a"].node_changed("b")
    assert w["a"].lookup("beta") is None
    assert w.events["a"] == [RegistryEvent("unregistered", "beta", old)]


def test_a_restarted_node_supersedes_its_old_document() -> None:
    w = World("a", "b")
    w.register("b", "beta")
    w.register("b", "gamma")
    w.settle()
    # b restarts: a fresh process with a new epoch and an empty document.
    w.net.nodes.pop("b")
    w.regs.pop("b")
    w.liveness.set_up("b", 2)
    w["a"].node_changed("b")
    reborn = w.add("b", epoch=2)
    w.net.connect()
    again = w.register("b", "beta")
    assert again.entry_id == "b/2/1"
    w.settle()
    for node in "ab":
        assert w[node].lookup("beta") == again
        assert w[node].lookup("gamma") is None
        replica = w.net[node].store.get(doc_name("b"))
        assert replica is not None
        assert replica.epoch == 2
    assert reborn.holds("gamma") is None
    # The restarted node never takes back its previous document.
    assert w.net["b"].stats.rejected.get("doc_refused", 0) == 0
    assert w.net["a"].stats.docs_replaced == 1


def test_new_epoch_document_waits_for_membership_to_know_the_epoch() -> None:
    """Entries resolve only when the document's epoch is the node's current one."""
    w = World("a", "b")
    w.net.nodes.pop("b")
    w.regs.pop("b")
    w.add("b", epoch=2)
    w.liveness.set_up("b", 1)  # a has not heard of the restart yet
    w.net.connect()
    e = w.register("b", "beta")
    w.settle()
    assert w["a"].lookup("beta") is None
    w.liveness.set_up("b", 2)
    w["a"].node_changed("b")
    assert w["a"].lookup("beta") == e


def test_accept_policy() -> None:
    w = World("a", "b", epoch=5)
    a = w["a"]
    # Its own document has one writer: this very process.
    assert a.accept(doc_name("a"), 5)
    assert not a.accept(doc_name("a"), 4)
    assert not a.accept(doc_name("a"), 6)
    # Another node's: its current epoch or newer, or any epoch while it is unknown.
    assert a.accept(doc_name("b"), 5)
    assert a.accept(doc_name("b"), 6)
    assert not a.accept(doc_name("b"), 4)
    assert a.accept(doc_name("stranger"), 0)


def test_old_epoch_documents_are_refused_by_replication() -> None:
    w = World("a", "b", epoch=5)
    stale: Doc[Any] = Doc()
    with stale.transaction():
        stale.get(ROOT, type=Map)["x"] = entry("x", "b", 1, "b/4/1").encode()
    w.liveness.set_up("c", 5)  # c runs epoch 5; a holds no document of c yet
    w.net.inject("b", "a", Push(doc_name("c"), 4, stale.get_update()))  # c's previous life
    w.net.inject("b", "a", Push(doc_name("a"), 6, stale.get_update()))  # a's own, not this a
    assert w.net["a"].stats.rejected == {"doc_refused": 2}
    assert w.net["a"].store.get(doc_name("c")) is None
    assert w.net["a"].store.get(doc_name("a")).epoch == 5  # type: ignore[union-attr]
    # Older than the documents held: plain stale epochs.
    w.net.inject("b", "a", Push(doc_name("b"), 4, stale.get_update()))
    w.net.inject("b", "a", Push(doc_name("a"), 4, stale.get_update()))
    assert w.net["a"].stats.stale_epochs == 2
    assert w["a"].lookup("x") is None


# ---------------------------------------------------------------------- reclaiming documents


def test_tick_drops_documents_of_long_gone_nodes() -> None:
    w = World("a", "b", "c")
    w.register("b", "beta")
    w.settle()
    w.kill("b")
    w["a"].tick(w.net.now + 3000.0)
    assert w.net["a"].store.get(doc_name("b")) is not None
    assert w["a"].stats.docs_reclaimed == 0
    w["a"].tick(w.net.now + 3601.0)
    assert w.net["a"].store.get(doc_name("b")) is None
    assert w["a"].stats.docs_reclaimed == 1
    # A later tick has nothing more to do, and its own document is never dropped.
    w["a"].tick(w.net.now + 10_000.0)
    assert w["a"].stats.docs_reclaimed == 1
    assert w.net["a"].store.get(doc_name("a")) is not None


def test_tick_drops_documents_of_superseded_epochs() -> None:
    w = World("a", "b")
    w.register("b", "beta")
    w.settle()
    w.liveness.set_up("b", 7)
    w["a"].tick(w.net.now)
    assert w.net["a"].store.get(doc_name("b")) is None
    assert w["a"].lookup("beta") is None
    assert w["a"].stats.docs_reclaimed == 1
    # And the old document is not taken back from a peer that still holds it.
    w.net.sync("a", "b")
    assert w.net["a"].store.get(doc_name("b")) is None


def test_own_document_survives_tick() -> None:
    w = World("a")
    w.register("a", "alpha")
    w.liveness.set_up("a", 99)
    w.liveness.set_down("a", 0.0)
    w["a"].tick(1e9)
    assert w.net["a"].store.get(doc_name("a")) is not None
    assert w["a"].lookup("alpha") is not None


# ---------------------------------------------------------------------- malformed documents


def foreign_doc(items: dict[str, Any]) -> bytes:
    doc: Doc[Any] = Doc()
    with doc.transaction():
        agents = doc.get(ROOT, type=Map)
        for key, value in items.items():
            agents[key] = value
    return doc.get_update()


def test_malformed_entries_are_counted_and_ignored() -> None:
    w = World("a", "b")
    good = entry("good", "b", 5, "b/1/1", kind="k")
    items: dict[str, Any] = {
        "good": good.encode(),
        "garbage": b"\xff\xfe\x00",
        "not-bytes": "a string",
        "a-number": 42,
        "wrong-shape": cbor.dumps([1, 2, 3]),
        "other-node": entry("other-node", "c", 5).encode(),
        "negative-time": cbor.dumps(["b", "", [], {}, -1, "b/1/2"]),
        "bool-time": cbor.dumps(["b", "", [], {}, True, "b/1/3"]),
        "bad-caps": cbor.dumps(["b", "", "gpu", {}, 5, "b/1/4"]),
        "bad-metadata": cbor.dumps(["b", "", [], {"m": [1]}, 5, "b/1/5"]),
        "empty-id": cbor.dumps(["b", "", [], {}, 5, ""]),
        "x" * 300: entry("x" * 300, "b", 5).encode(),
        "nested": Map({"a": 1}),
    }
    w.net.inject("b", "a", Push(doc_name("b"), 1, foreign_doc(items)))
    assert w["a"].lookup("good") == good
    assert [e.name for e in w["a"].entries()] == ["good"]
    assert w["a"].stats.bad_entries == len(items) - 1
    assert w.kinds("a") == ["registered"]


def test_garbage_written_into_a_replica_directly() -> None:
    w = World("a", "b")
    w.register("b", "beta")
    w.settle()
    replica = w.net["a"].store.get(doc_name("b"))
    assert replica is not None
    agents = replica.doc.get(ROOT, type=Map)
    with replica.doc.transaction():
        agents["beta"] = b"\x00garbage"  # overwrites a good entry
        agents["junk"] = b"\x01"
    assert w["a"].lookup("beta") is None
    assert w["a"].lookup("junk") is None
    assert w["a"].stats.bad_entries == 2
    assert w.kinds("a") == ["registered", "unregistered"]


def test_documents_outside_the_registry_are_not_indexed() -> None:
    w = World("a")
    w.net["a"].write(0.0, "state/x", lambda d: d.get(ROOT, type=Map).__setitem__("n", b"x"))
    assert len(w["a"]) == 0
    assert w["a"].stats.bad_entries == 0
    assert DOC_PREFIX == "reg/"
