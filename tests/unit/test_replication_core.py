"""The replication protocol, sans IO: fast path, anti-entropy, epochs, majority writes.

Every test drives a few :class:`Replicator` cores through the ``Net`` harness of
``replication_helpers``: outputs are encoded, decoded and handed to the peer they name, with
explicit time. Anti-entropy only runs when a test starts a round (``Net.sync``) unless the
test sets a real interval.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from pycrdt import Doc, Map
from replication_helpers import Net, change, content, tuning, vector

from meshd.replication.core import (
    DocEvent,
    Persist,
    RepairStalled,
    Replicator,
    Send,
    VectorReport,
    WriteDone,
)
from meshd.replication.messages import (
    Ack,
    DocUpdate,
    DocVector,
    ListRange,
    Message,
    Nodes,
    Page,
    Push,
    Query,
    Sync,
    Tree,
    TreeNode,
    Updates,
    Vectors,
)
from meshd.replication.replica import Replica

DOC = "state/doc"


def net_of(*names: str, **tune: Any) -> Net:
    net = Net()
    for name in names:
        net.add(name, tuning(**tune))
    net.connect()
    return net


def setk(key: str, value: Any) -> list[dict[str, Any]]:
    return [{"op": "set", "path": [key], "value": value}]


def delk(key: str) -> list[dict[str, Any]]:
    return [{"op": "delete", "path": [key]}]


def drop_kind(*kinds: type[Message]) -> Any:
    return lambda _src, _dst, message: isinstance(message, kinds)


def same(net: Net, name: str, *nodes: str) -> bool:
    replicas = [net[n].store.get(name) for n in nodes]
    if any(r is None for r in replicas):
        return False
    first = replicas[0]
    return all(
        content(r) == content(first) and vector(r) == vector(first) and r.epoch == first.epoch  # type: ignore[union-attr]
        for r in replicas
    )


def kinds_sent(net: Net) -> list[str]:
    return [type(d.message).__name__ for d in net.delivered]


# ---------------------------------------------------------------------- fast path


def test_local_write_is_pushed_after_the_coalescing_delay() -> None:
    net = net_of("a", "b", "c")
    assert change(net["a"], 0.0, DOC, setk("k", 1)) is None
    net.run_until(0.004)
    assert net.sent(Push) == []
    assert net["b"].store.get(DOC) is None
    net.run_until(0.006)
    pushes = net.sent(Push, src="a")
    assert sorted(p.dst for p in pushes) == ["b", "c"]
    # A small cluster: pushed to every peer directly, nothing to forward.
    assert all(p.message.hops == 0 and p.message.ack == 0 for p in pushes)  # type: ignore[union-attr]
    assert content(net["b"].store.get(DOC)) == {"k": 1}
    assert same(net, DOC, "a", "b", "c")
    assert net.events("a") == [
        DocEvent("opened", DOC, local=True),
        DocEvent("updated", DOC, local=True),
    ]
    assert net.events("b") == [DocEvent("opened", DOC)]


def test_several_local_writes_are_coalesced_into_one_push() -> None:
    net = net_of("a", "b", push_fanout=1)
    change(net["a"], 0.000, DOC, setk("x", 1))
    net.run_until(0.001)
    change(net["a"], 0.001, DOC, setk("y", 2))
    net.run_until(0.002)
    change(net["a"], 0.002, DOC, delk("x"))
    change(net["a"], 0.002, "state/other", setk("z", 3))
    net.run_until(0.01)
    pushes = net.sent(Push, src="a")
    # One push per document, each carrying every write made during the delay.
    assert sorted(p.message.doc for p in pushes) == [DOC, "state/other"]  # type: ignore[union-attr]
    assert net["a"].stats.pushes_sent == 2
    assert content(net["b"].store.get(DOC)) == {"y": 2}
    assert same(net, DOC, "a", "b")
    # A later write is a new push.
    change(net["a"], net.now, DOC, setk("w", 4))
    net.run(0.01)
    assert len(net.sent(Push, src="a")) == 3
    assert same(net, DOC, "a", "b")


def test_pushes_are_forwarded_within_the_hop_bound() -> None:
    names = [f"n{i}" for i in range(12)]
    net = net_of(*names, push_fanout=2, push_hops=2, push_all_up_to=0)
    change(net["n0"], 0.0, DOC, setk("k", 1))
    net.run(0.01)
    pushes = [d.message for d in net.sent(Push)]
    assert all(isinstance(p, Push) for p in pushes)
    hops = sorted((p.hops for p in pushes if isinstance(p, Push)), reverse=True)
    # The writer sends 2 pushes with 2 hops left; each receiver that learned something
    # forwards to 2 others with one hop less; nobody forwards a push with no hops left.
    assert hops.count(2) == 2
    assert hops.count(1) <= 4
    assert hops.count(0) <= 8
    # Every forward carries one hop less than a push its sender received before.
    received: dict[str, set[int]] = {}
    for delivered in net.sent(Push):
        push = delivered.message
        assert isinstance(push, Push)
        if delivered.src != "n0":
            assert push.hops + 1 in received.get(delivered.src, set()), delivered
        received.setdefault(delivered.dst, set()).add(push.hops)
    assert len(pushes) <= 2 + 4 + 8
    forwarded = sum(net[n].stats.pushes_forwarded for n in names)
    assert forwarded == len(pushes) - 2
    reached = [n for n in names if net[n].store.get(DOC) is not None]
    assert len(reached) > 3  # more than the writer's own fanout: forwarding happened
    # Nobody forwards to the peer it got the push from.
    for d in net.sent(Push):
        assert d.dst != d.src


def test_forwarding_reaches_everyone_with_enough_hops() -> None:
    names = [f"n{i}" for i in range(8)]
    net = net_of(*names, push_fanout=3, push_hops=3)
    change(net["n0"], 0.0, DOC, setk("k", 1))
    net.run(0.01)
    assert same(net, DOC, *names)


def test_no_forwarding_without_hops() -> None:
    names = [f"n{i}" for i in range(8)]
    net = net_of(*names, push_fanout=2, push_hops=0, push_all_up_to=0)
    change(net["n0"], 0.0, DOC, setk("k", 1))
    net.run(0.01)
    assert len(net.sent(Push)) == 2
    assert sum(net[n].store.get(DOC) is not None for n in names) == 3


def test_small_clusters_push_to_every_peer_in_one_hop() -> None:
    names = [f"n{i}" for i in range(10)]
    net = net_of(*names)
    change(net["n0"], 0.0, DOC, setk("k", 1))
    net.run(0.01)
    pushes = net.sent(Push)
    assert sorted(p.dst for p in pushes) == sorted(names[1:])
    assert all(p.message.hops == 0 for p in pushes)  # type: ignore[union-attr]
    assert same(net, DOC, *names)


def test_large_clusters_push_to_log_n_plus_three_with_forwarding() -> None:
    names = [f"n{i}" for i in range(40)]
    net = net_of(*names)
    change(net["n0"], 0.0, DOC, setk("k", 1))
    net.run_until(0.0051)
    first = net.sent(Push, src="n0")
    assert len(first) == 7  # ceil(ln 39) + 3
    assert all(p.message.hops == 3 for p in first)  # type: ignore[union-attr]


def test_a_push_that_teaches_nothing_is_not_forwarded() -> None:
    net = net_of("a", "b", "c")
    change(net["a"], 0.0, DOC, setk("k", 1))
    net.run(0.01)
    before = sum(net[n].stats.pushes_forwarded for n in "abc")
    replica = net["a"].store.get(DOC)
    assert replica is not None
    net.inject("a", "b", Push(DOC, 0, replica.full_update(), 0, 3))
    assert sum(net[n].stats.pushes_forwarded for n in "abc") == before
    assert net.hold() == []


def test_a_delete_is_pushed_and_forwarded_like_any_write() -> None:
    names = [f"n{i}" for i in range(8)]
    net = net_of(*names, push_fanout=3, push_hops=3)
    change(net["n0"], 0.0, DOC, setk("a", 1) + setk("b", 2))
    net.run(0.01)
    assert same(net, DOC, *names)
    change(net["n0"], net.now, DOC, delk("a"))
    net.run(0.01)
    assert same(net, DOC, *names)
    assert all(content(net[n].store.get(DOC)) == {"b": 2} for n in names)


# ---------------------------------------------------------------------- anti-entropy


def test_round_with_nothing_to_repair_costs_the_level_one_nodes_and_an_empty_reply() -> None:
    from meshd.replication import messages

    net = net_of("a", "b")
    for i in range(300):
        change(net["a"], 0.0, f"state/d{i}", setk("k", i))
    net.run(0.01)
    net.delivered.clear()
    net.sync("a", "b")
    assert kinds_sent(net) == ["Tree", "Nodes"]
    tree, nodes = (d.message for d in net.delivered)
    assert isinstance(tree, Tree)
    assert [(n.level, n.index) for n in tree.nodes] == [(1, i) for i in range(16)]
    assert isinstance(nodes, Nodes)
    assert nodes.nodes == ()
    assert len(messages.encode(tree)) + len(messages.encode(nodes)) < 400
    assert net["a"].stats.rounds_completed == 1


def test_anti_entropy_repairs_a_lost_push() -> None:
    net = net_of("a", "b")
    net.drop = drop_kind(Push)
    change(net["a"], 0.0, DOC, setk("k", 1))
    net.run(0.01)
    change(net["a"], net.now, DOC, setk("j", 2))
    net.run(0.01)
    assert net["b"].store.get(DOC) is None
    net.sync("a", "b")  # the writer initiates: it sends what b lacks in SYNC
    # nothing wanted: no UPDATES
    assert kinds_sent(net) == ["Tree", "Nodes", "ListRange", "Page", "Sync"]
    assert same(net, DOC, "a", "b")
    assert net["b"].stats.repair_updates_received == 1
    assert net["a"].stats.rounds_completed == 1
    # A healthy round is not counted as a rejection anywhere.
    assert net["a"].stats.rejected == {}
    assert net["b"].stats.rejected == {}


def test_anti_entropy_repairs_a_lost_delete() -> None:
    net = net_of("a", "b")
    change(net["a"], 0.0, DOC, setk("x", 1) + setk("y", 2))
    net.run(0.01)
    assert same(net, DOC, "a", "b")
    net.drop = drop_kind(Push)
    change(net["a"], net.now, DOC, delk("x"))
    net.run(0.01)
    assert content(net["b"].store.get(DOC)) == {"x": 1, "y": 2}
    net.sync("b", "a")
    assert content(net["b"].store.get(DOC)) == {"y": 2}
    assert same(net, DOC, "a", "b")


def test_a_doc_only_the_initiator_has() -> None:
    net = net_of("a", "b")
    net.drop = drop_kind(Push)
    change(net["a"], 0.0, DOC, setk("k", 1))
    net.run(0.01)
    net.drop = None
    net.sync("a", "b")
    sync = [d.message for d in net.sent(Sync)]
    assert len(sync) == 1
    assert isinstance(sync[0], Sync)
    assert [u.doc for u in sync[0].updates] == [DOC]
    assert sync[0].want == ()
    assert same(net, DOC, "a", "b")
    assert net.events("b") == [DocEvent("opened", DOC)]


def test_a_doc_only_the_responder_has() -> None:
    net = net_of("a", "b")
    net.drop = drop_kind(Push)
    change(net["a"], 0.0, DOC, setk("k", 1))
    net.run(0.01)
    net.drop = None
    net.sync("b", "a")  # b lacks the document: it asks for it
    assert kinds_sent(net) == ["Tree", "Nodes", "ListRange", "Page", "Sync", "Updates"]
    sync = net.sent(Sync)[0].message
    assert isinstance(sync, Sync)
    assert sync.updates == ()
    assert sync.want == (DocVector(DOC, 0, b"\x00"),)
    assert same(net, DOC, "a", "b")
    assert net["b"].stats.rounds_completed == 1


def test_two_way_repair_in_one_round() -> None:
    net = net_of("a", "b")
    change(net["a"], 0.0, DOC, setk("shared", 0))
    net.run(0.01)
    net.drop = drop_kind(Push)
    change(net["a"], net.now, DOC, setk("from_a", 1))
    change(net["b"], net.now, DOC, setk("from_b", 2))
    change(net["a"], net.now, "state/only-a", setk("x", 1))
    change(net["b"], net.now, "state/only-b", setk("y", 2))
    net.run(0.01)
    net.delivered.clear()
    net.sync("a", "b")
    assert kinds_sent(net) == ["Tree", "Nodes", "ListRange", "Page", "Sync", "Updates"]
    for name in (DOC, "state/only-a", "state/only-b"):
        assert same(net, name, "a", "b"), name
    assert content(net["a"].store.get(DOC)) == {"shared": 0, "from_a": 1, "from_b": 2}
    assert net["a"].store.digest() == net["b"].store.digest()


def test_many_nodes_converge_by_anti_entropy_alone() -> None:
    names = [f"n{i}" for i in range(5)]
    net = net_of(*names)
    net.drop = drop_kind(Push)
    for i, name in enumerate(names):
        change(net[name], 0.0, DOC, setk(f"k{i}", i))
        change(net[name], 0.0, f"state/{name}", setk("own", i))
    net.run(0.01)
    for a in names:
        for b in names:
            if a != b:
                net.sync(a, b)
    digests = {net[n].store.digest() for n in names}
    assert len(digests) == 1
    assert same(net, DOC, *names)
    assert content(net["n0"].store.get(DOC)) == {f"k{i}": i for i in range(5)}


def test_periodic_rounds_repair_without_being_asked() -> None:
    net = net_of("a", "b", "c", anti_entropy_interval=1.0)
    net.drop = drop_kind(Push)
    change(net["a"], 0.0, DOC, setk("k", 1))
    net.run(10.0)
    assert same(net, DOC, "a", "b", "c")
    started = [net[n].stats.rounds_started for n in "abc"]
    assert all(7 <= s <= 14 for s in started), started


def test_unanswered_rounds_time_out_and_back_off_logged_once() -> None:
    net = net_of("a", "b", anti_entropy_interval=1.0, round_timeout=3.0, repair_backoff_max=16.0)
    b = net.nodes.pop("b")  # b never answers (or refuses every message)
    net.run(120.0)
    a = net["a"]
    # Without backoff a round would start every ~4 s (one at a time, 3 s timeout): 30.
    assert 5 <= a.stats.rounds_started <= 12, a.stats.rounds_started
    assert a.stats.rounds_failed >= a.stats.rounds_started - 1
    assert len(a._rounds) <= 1  # one round of its own at a time
    stalled = [o for o in net.outputs["a"] if isinstance(o, RepairStalled)]
    assert stalled == [RepairStalled("b", 2.0)]  # said once, not per failed round
    # b answers again: the next round completes and the backoff is forgotten.
    net.nodes["b"] = b
    net.run(40.0)
    assert a.stats.rounds_completed >= 1
    assert "b" not in a._backoff


def test_request_sync_is_rate_limited_and_only_for_peers() -> None:
    net = net_of("a", "b", "c", anti_entropy_interval=4.0)
    net.delivered.clear()
    a = net["a"]
    started = a.stats.rounds_started
    a.request_sync(net.now, "b")
    a.request_sync(net.now + 0.1, "c")  # within a quarter interval: skipped
    a.request_sync(net.now, "stranger")
    assert a.stats.rounds_started == started + 1
    a.request_sync(net.now + 1.5, "c")
    assert a.stats.rounds_started == started + 2


# ---------------------------------------------------------------------- epochs & policy


def fresh_doc(**items: Any) -> Doc[Any]:
    doc: Doc[Any] = Doc()
    with doc.transaction():
        root = doc.get("root", type=Map)
        for key, value in items.items():
            root[key] = value
    return doc


@pytest.mark.parametrize("initiator", ["a", "b"])
def test_higher_epoch_replaces_through_anti_entropy(initiator: str) -> None:
    net = net_of("a", "b")
    change(net["a"], 0.0, DOC, setk("old", 1) + setk("history", 2))
    net.run(0.01)
    net.drop = drop_kind(Push)
    net["a"].replace(DOC, 1, fresh_doc(new=3))
    net.run(0.01)
    assert net["b"].store.get(DOC).epoch == 0  # type: ignore[union-attr]
    net.drop = None
    net.sync(initiator, "b" if initiator == "a" else "a")
    replica = net["b"].store.get(DOC)
    assert replica is not None
    assert replica.epoch == 1
    assert content(replica) == {"new": 3}
    assert same(net, DOC, "a", "b")
    assert net["b"].stats.docs_replaced == 1
    assert DocEvent("replaced", DOC) in net.events("b")


def test_higher_epoch_push_replaces_and_calls_on_replaced() -> None:
    net = net_of("a", "b")
    change(net["a"], 0.0, DOC, setk("old", 1))
    net.run(0.01)
    seen: list[tuple[int, int, Any]] = []
    net["b"].on_replaced = lambda old, new: seen.append((old.epoch, new.epoch, content(old)))
    net["a"].replace(DOC, 1, fresh_doc(new=2))
    net.run(0.01)
    assert seen == [(0, 1, {"old": 1})]
    assert same(net, DOC, "a", "b")


def test_stale_epoch_is_ignored_and_counted() -> None:
    net = net_of("a", "b")
    net["b"].replace(DOC, 2, fresh_doc(current=1))
    net.run(0.01)
    before = vector(net["b"].store.get(DOC))
    old = Replica(DOC, 1)
    update = old.write(lambda d: d.get("root", type=Map).__setitem__("stale", 1))
    assert update is not None
    net.inject("a", "b", Push(DOC, 1, update, ack=9))
    replica = net["b"].store.get(DOC)
    assert replica is not None
    assert replica.epoch == 2
    assert content(replica) == {"current": 1}
    assert vector(replica) == before
    assert net["b"].stats.stale_epochs == 1
    acks = [m for _, dst, m in held_messages(net) if dst == "a"]
    assert acks == [Ack(9, False, b"")]
    # Through anti-entropy too: the stale replica's update is not applied.
    net.inject("a", "b", Sync(12345, (DocUpdate(DOC, 1, update),), ()))
    assert net["b"].stats.stale_epochs == 2
    assert content(net["b"].store.get(DOC)) == {"current": 1}


def held_messages(net: Net) -> list[tuple[str, str, Message]]:
    from meshd.replication import messages

    return [(src, dst, messages.decode(frame)) for src, dst, frame in net.hold()]


def test_accept_policy_refusal_is_counted() -> None:
    net = Net()
    net.add("a")
    net.add("b", accept=lambda name, _epoch: name.startswith("state/"))
    net.connect()
    net.drop = drop_kind(Push)
    change(net["a"], 0.0, "junk/x", setk("k", 1))
    change(net["a"], 0.0, DOC, setk("k", 1))
    net.run(0.01)
    net.drop = None
    replica = net["a"].store.get("junk/x")
    assert replica is not None
    net.inject("a", "b", Push("junk/x", 0, replica.full_update()))
    assert net["b"].store.get("junk/x") is None
    assert net["b"].stats.rejected == {"doc_refused": 1}
    # b does not ask for it in its own rounds ...
    net.sync("b", "a")
    assert net["b"].store.get("junk/x") is None
    assert same(net, DOC, "a", "b")
    sync = net.sent(Sync, src="b")[0].message
    assert isinstance(sync, Sync)
    assert [w.doc for w in sync.want] == [DOC]
    # ... and refuses it when a offers it in a's rounds.
    net.sync("a", "b")
    assert net["b"].store.get("junk/x") is None
    assert net["b"].stats.rejected["doc_refused"] == 2


def test_accept_policy_also_guards_new_epochs() -> None:
    net = Net()
    net.add("a")
    net.add("b", accept=lambda _name, epoch: epoch < 5)
    net.connect()
    change(net["a"], 0.0, DOC, setk("k", 1))
    net.run(0.01)
    net["a"].replace(DOC, 5, fresh_doc(k=2))
    net.run(0.01)
    replica = net["b"].store.get(DOC)
    assert replica is not None
    assert replica.epoch == 0
    assert content(replica) == {"k": 1}
    assert net["b"].stats.rejected == {"doc_refused": 1}


# ---------------------------------------------------------------------- budget


@pytest.mark.parametrize("initiator", ["a", "b"])
def test_sync_messages_respect_the_budget_and_one_round_pages_through(initiator: str) -> None:
    net = net_of("a", "b", page_bytes=2000)
    net.drop = drop_kind(Push)
    for i in range(12):
        change(net["a"], 0.0, f"state/d{i}", setk("blob", "x" * 500))
    net.run(0.01)
    net.drop = None
    net.sync(initiator, "b" if initiator == "a" else "a")
    assert net["a"].store.digest() == net["b"].store.digest()
    assert net[initiator].stats.rounds_completed == 1
    # 12 × ~520 bytes do not fit in one 2,000-byte message: several, in one round.
    assert len(net.sent(Sync if initiator == "a" else Updates)) >= 3
    for d in net.delivered:
        if isinstance(d.message, Sync | Updates):
            assert sum(len(u.update) for u in d.message.updates) <= 2000
    for i in range(12):
        assert same(net, f"state/d{i}", "a", "b")


def test_a_document_larger_than_the_budget_still_travels() -> None:
    net = net_of("a", "b", page_bytes=1000)
    net.drop = drop_kind(Push)
    change(net["a"], 0.0, "state/big", setk("blob", "x" * 5000))
    change(net["a"], 0.0, "state/small", setk("k", 1))
    net.run(0.01)
    net.drop = None
    for initiator, responder in [("a", "b"), ("b", "a")] * 2:
        net.sync(initiator, responder)
    assert same(net, "state/big", "a", "b")
    assert same(net, "state/small", "a", "b")
    # Alone in its message: the budget still bounds everything else.
    for d in net.delivered:
        if isinstance(d.message, Sync | Updates) and len(d.message.updates) > 1:
            assert sum(len(u.update) for u in d.message.updates) <= 1000


# ---------------------------------------------------------------------- majority writes


def test_majority_write_completes_when_a_majority_holds_it() -> None:
    net = net_of("a", "b", "c", "d", "e")
    token = change(net["a"], 0.0, DOC, setk("k", 1), durability="majority")
    assert token is not None
    net.deliver()
    done = net.done("a")
    assert len(done) == 1
    assert done[0].token == token
    assert done[0].ok
    assert done[0].needed == 3
    assert done[0].total == 5
    assert len(done[0].acked) == 3
    assert done[0].acked[0] == "a"
    pushes = [d.message for d in net.sent(Push, src="a")]
    assert len(pushes) == 4  # every live peer, asking for an ack, no forwarding
    assert all(isinstance(p, Push) and p.ack == token and p.hops == 0 for p in pushes)
    assert net["a"].stats.majority_ok == 1
    assert same(net, DOC, "a", "b", "c", "d", "e")


def test_majority_of_one_completes_at_once() -> None:
    net = Net()
    net.add("a")
    token = change(net["a"], 0.0, DOC, setk("k", 1), durability="majority")
    net.collect()
    assert net.done("a") == [WriteDone(token or -1, True, ("a",), 1, 1)]
    assert net.sent(Push) == []


def test_majority_of_two_needs_the_peer() -> None:
    net = net_of("a", "b")
    token = change(net["a"], 0.0, DOC, setk("k", 1), durability="majority")
    held = net.hold()
    net.collect()
    assert net.done("a") == []
    net.in_flight = held
    net.deliver()
    assert net.done("a") == [WriteDone(token or -1, True, ("a", "b"), 2, 2)]


def test_majority_write_repairs_a_peer_that_missed_an_earlier_write() -> None:
    net = net_of("a", "b", "c")
    # c is cut off, and b misses an earlier local write of a (its push is lost).
    net.drop = lambda _s, dst, m: dst == "c" or isinstance(m, Push)
    change(net["a"], 0.0, DOC, setk("earlier", 1))
    net.run(0.01)
    assert net["b"].store.get(DOC) is None
    net.drop = lambda _s, dst, _m: dst == "c"
    token = change(net["a"], net.now, DOC, setk("later", 2), durability="majority")
    net.deliver()
    pushes = [d.message for d in net.sent(Push, src="a") if d.dst == "b"]
    assert len(pushes) == 2  # the write, then the repair of what b lacked
    assert all(isinstance(p, Push) and p.ack == token for p in pushes)
    acks = [d.message for d in net.sent(Ack, src="b")]
    assert len(acks) == 2
    assert net.done("a") == [WriteDone(token or -1, True, ("a", "b"), 2, 3)]
    assert content(net["b"].store.get(DOC)) == {"earlier": 1, "later": 2}


def test_majority_write_fails_at_the_deadline_naming_who_holds_it() -> None:
    net = net_of("a", "b", "c", "d", "e", majority_timeout=5.0)
    net.drop = lambda _s, dst, _m: dst in ("c", "d", "e")
    token = change(net["a"], 0.0, DOC, setk("k", 1), durability="majority")
    net.run_until(4.9)
    assert net.done("a") == []
    net.run_until(5.1)
    assert net.done("a") == [WriteDone(token or -1, False, ("a", "b"), 3, 5)]
    assert net["a"].stats.majority_failed == 1
    # The write stays applied locally (and on b).
    assert content(net["a"].store.get(DOC)) == {"k": 1}


def test_dead_members_still_count_and_one_that_comes_back_completes_the_write() -> None:
    net = net_of("a", "b", "c", "d", "e")
    net["a"].set_reference(["a", "b", "c", "d", "e"])
    token = change(net["a"], 0.0, DOC, setk("k", 1), durability="majority")
    held = net.hold()  # nothing answers yet
    net["a"].set_peers(["b"])  # c, d and e look dead: still 3 of 5 needed, nothing fails
    net.collect()
    assert net.done("a") == []
    net.in_flight = [d for d in held if d[1] == "b"]
    net.deliver()
    assert net.done("a") == []  # a and b: two of five
    net["a"].set_peers(["b", "c"])  # c is back before the deadline: it is sent the write
    net.deliver()
    assert net.done("a") == [WriteDone(token or -1, True, ("a", "b", "c"), 3, 5)]


def test_a_minority_that_declared_the_rest_dead_acknowledges_nothing() -> None:
    net = net_of("a", "b", "c", majority_timeout=5.0)
    net["c"].set_reference(["a", "b", "c"])
    net["c"].set_peers([])  # to c, a and b are dead (a partition, or SIGSTOP)
    token = change(net["c"], 0.0, DOC, setk("k", 1), durability="majority")
    net.run_until(5.1)
    assert net.done("c") == [WriteDone(token or -1, False, ("c",), 2, 3)]
    assert content(net["c"].store.get(DOC)) == {"k": 1}  # applied here; spreads on heal


def test_a_member_removed_from_the_reference_stops_counting() -> None:
    net = net_of("a", "b", "c", "d", "e")
    net["a"].set_reference(["a", "b", "c", "d", "e"])
    net["a"].set_peers(["b"])
    net.drop = lambda _s, dst, _m: dst in ("c", "d", "e")
    token = change(net["a"], 0.0, DOC, setk("k", 1), durability="majority")
    net.deliver()
    assert net.done("a") == []  # a and b of five
    # d and e are reaped, or removed by an operator: a and b are a majority of three.
    net["a"].set_reference(["a", "b", "c"])
    net.collect()
    assert net.done("a") == [WriteDone(token or -1, True, ("a", "b"), 2, 3)]
    # Members that join while a write waits do not raise the bar.
    token = change(net["a"], net.now, DOC, setk("k", 2), durability="majority")
    held = net.hold()
    net["a"].set_reference(["a", "b", "c", "x", "y", "z"])
    net.in_flight = held
    net.deliver()
    assert net.done("a")[-1] == WriteDone(token or -1, True, ("a", "b"), 2, 3)


def test_majority_write_without_a_known_cluster_fails_at_once() -> None:
    net = net_of("a", "b")
    net["a"].set_reference(None)
    token = change(net["a"], 0.0, DOC, setk("k", 1), durability="majority")
    net.collect()
    assert net.done("a") == [WriteDone(token or -1, False, ("a",), 1, 0)]
    net.run(0.1)
    assert content(net["b"].store.get(DOC)) == {"k": 1}  # still pushed as a local write


def test_majority_write_refused_by_peers_fails_early() -> None:
    net = Net()
    net.add("a")
    net.add("b", accept=lambda _n, _e: False)
    net.add("c", accept=lambda _n, _e: False)
    net.connect()
    token = change(net["a"], 0.0, DOC, setk("k", 1), durability="majority")
    net.deliver()
    assert net.done("a") == [WriteDone(token or -1, False, ("a",), 2, 3)]


def test_acks_for_unknown_writes_or_from_strangers_are_ignored() -> None:
    net = net_of("a", "b", "c")
    token = change(net["a"], 0.0, DOC, setk("k", 1), durability="majority")
    net.hold()
    replica = net["a"].store.get(DOC)
    assert replica is not None
    net.inject("x", "a", Ack(token or 0, True, replica.sv))  # not a peer it waits for
    net.inject("b", "a", Ack(999, True, replica.sv))  # no such write
    net.inject("b", "a", Ack(token or 0, True, b"\xff"))  # malformed vector: not counted
    assert net.done("a") == []
    net.inject("c", "a", Ack(token or 0, True, replica.sv))
    assert net.done("a") == [WriteDone(token or -1, True, ("a", "c"), 2, 3)]


# ---------------------------------------------------------------------- rounds


def test_a_page_for_an_unknown_round_is_rejected() -> None:
    net = net_of("a", "b")
    net.inject("b", "a", Page(424242, (DocVector(DOC, 0, b"\x00"),)))
    assert net["a"].stats.rejected == {"unexpected_round": 1}
    assert net.hold() == []


def test_round_messages_from_the_wrong_peer_are_rejected() -> None:
    net = net_of("a", "b", "c")
    net.drop = drop_kind(Push)
    change(net["b"], 0.0, DOC, setk("k", 1))
    net.run(0.01)
    net.drop = None
    net["a"].sync_with(net.now, "b")
    digest = held_messages(net)
    assert len(digest) == 1
    _, _, message = digest[0]
    assert isinstance(message, Tree)
    round_id = message.round
    # c answers a round a started with b: refused, and the round stays open for b.
    net.inject("c", "a", Nodes(round_id, ()))
    net.inject("c", "a", Updates(round_id, (DocUpdate(DOC, 0, b"\x00\x00"),)))
    assert net["a"].stats.rejected == {"unexpected_round": 2}
    net.inject("a", "b", message)
    net.deliver()
    assert same(net, DOC, "a", "b")
    assert net["a"].stats.rounds_completed == 1
    # A replayed UPDATES for the finished round is refused too.
    net.inject("b", "a", Updates(round_id, ()))
    assert net["a"].stats.rejected == {"unexpected_round": 3}


# ---------------------------------------------------------------------- queries


def test_query_and_vectors() -> None:
    net = net_of("a", "b", "c")
    change(net["b"], 0.0, DOC, setk("k", 1))
    net.run(0.01)
    query = net["a"].query([DOC, "state/missing"], ["b", "c"])
    net.deliver()
    queries = [d.message for d in net.sent(Query)]
    assert queries == [Query(query, (DOC, "state/missing"))] * 2
    reports = net.reports("a")
    assert {r.peer for r in reports} == {"b", "c"}
    for report in reports:
        replica = net[report.peer].store.get(DOC)
        assert replica is not None
        assert report == VectorReport(query, report.peer, {DOC: (replica.epoch, replica.sv)})
    assert net["a"].query([DOC], ["b"]) == query + 1
    # A VECTORS message nobody asked for is still reported (the caller matches query ids).
    net.inject("b", "a", Vectors(77, ()))
    assert net.reports("a")[-1] == VectorReport(77, "b", {})


# ---------------------------------------------------------------------- bad updates


def garbage() -> bytes:
    return b"\x05\xff\xfe\x00garbage"


def test_bad_update_for_an_existing_doc_is_counted_and_not_applied() -> None:
    net = net_of("a", "b")
    change(net["a"], 0.0, DOC, setk("k", 1))
    net.run(0.01)
    replica = net["b"].store.get(DOC)
    assert replica is not None
    before = (vector(replica), content(replica), replica.hash, net["b"].store.digest())
    events = len(net.events("b"))
    net.inject("a", "b", Push(DOC, 0, garbage(), ack=3, hops=3))
    after = net["b"].store.get(DOC)
    assert after is replica
    assert (vector(after), content(after), after.hash, net["b"].store.digest()) == before
    assert net["b"].stats.rejected == {"bad_update": 1}
    assert len(net.events("b")) == events
    assert [m for _, _, m in held_messages(net)] == [Ack(3, False, b"")]  # not forwarded


def test_bad_update_for_a_new_doc_creates_nothing() -> None:
    net = net_of("a", "b")
    opened: list[str] = []
    dropped: list[str] = []
    net["b"].on_open = lambda r: opened.append(r.name)
    net["b"].on_drop = dropped.append
    net.inject("a", "b", Push(DOC, 0, garbage()))
    net.inject("a", "b", Sync(1, (DocUpdate("state/other", 0, garbage()),), ()))
    assert net["b"].store.get(DOC) is None
    assert net["b"].store.get("state/other") is None
    assert net["b"].stats.rejected == {"bad_update": 2}
    assert net.events("b") == []
    assert dropped == []
    assert net["b"].store.digest() == bytes(len(net["b"].store.digest()))


def test_bad_update_with_a_higher_epoch_keeps_the_current_document() -> None:
    net = net_of("a", "b")
    change(net["a"], 0.0, DOC, setk("k", 1))
    net.run(0.01)
    replica = net["b"].store.get(DOC)
    assert replica is not None
    before = (vector(replica), content(replica), net["b"].store.digest())
    net.inject("a", "b", Push(DOC, 1, garbage()))
    current = net["b"].store.get(DOC)
    assert current is not None
    assert current.epoch == 0
    assert (vector(current), content(current), net["b"].store.digest()) == before
    assert net["b"].stats.rejected == {"bad_update": 1}
    assert net["b"].stats.docs_replaced == 0
    assert net.events("b") == [DocEvent("opened", DOC)]
    # The replica still works: later writes reach it and it still captures its own.
    change(net["a"], net.now, DOC, setk("j", 2))
    change(net["b"], net.now, DOC, setk("m", 3))
    net.run(0.01)
    assert same(net, DOC, "a", "b")


def test_bad_updates_in_repairs_are_counted_and_skipped() -> None:
    net = net_of("a", "b")
    good = Replica("state/good", 0)
    update = good.write(lambda d: d.get("root", type=Map).__setitem__("k", 1))
    assert update is not None
    net.inject(
        "a",
        "b",
        Sync(7, (DocUpdate("state/bad", 0, garbage()), DocUpdate("state/good", 0, update)), ()),
    )
    assert net["b"].stats.rejected == {"bad_update": 1}
    assert content(net["b"].store.get("state/good")) == {"k": 1}
    assert net["b"].store.get("state/bad") is None


def test_bad_vectors_are_counted() -> None:
    net = net_of("a", "b")
    change(net["a"], 0.0, DOC, setk("k", 1))
    net.run(0.01)
    net.inject("b", "a", Sync(5, (), (DocVector(DOC, 0, b"\x05\x01"),)))
    assert net["a"].stats.rejected == {"bad_vector": 1}
    net.hold()  # a's (empty) answer
    net["a"].sync_with(net.now, "b")
    ((_, _, tree),) = held_messages(net)
    assert isinstance(tree, Tree)
    # b claims every level-1 node differs and holds one document: a lists them all.
    net.inject("b", "a", Nodes(tree.round, tuple(TreeNode(1, i, 7, 1) for i in range(16))))
    ((_, _, listing),) = held_messages(net)
    assert isinstance(listing, ListRange)
    assert listing.ranges == tuple((1, i) for i in range(16))
    net.inject("b", "a", Page(tree.round, (DocVector(DOC, 0, b"\x01"),)))
    assert net["a"].stats.rejected == {"bad_vector": 2}


# ---------------------------------------------------------------------- documents


def test_open_drop_and_events() -> None:
    opened: list[tuple[str, int]] = []
    dropped: list[str] = []
    net = Net()
    a = net.add("a")
    a.on_open = lambda r: opened.append((r.name, r.epoch))
    a.on_drop = dropped.append
    replica = a.open(DOC)
    assert a.open(DOC) is replica
    assert a.open(DOC, 0) is replica
    newer = a.open(DOC, 3)
    assert newer.epoch == 3
    assert a.open(DOC, 1) is newer  # an older epoch never replaces a newer one
    a.drop(DOC)
    a.drop(DOC)  # nothing left to drop
    net.collect()
    assert opened == [(DOC, 0), (DOC, 3)]
    assert dropped == [DOC]
    assert net.events("a") == [
        DocEvent("opened", DOC, local=True),
        DocEvent("replaced", DOC, local=True),
        DocEvent("dropped", DOC),
    ]


def test_drop_cancels_a_pending_push() -> None:
    net = net_of("a", "b")
    change(net["a"], 0.0, DOC, setk("k", 1))
    net["a"].drop(DOC)
    net.run(0.01)
    assert net.sent(Push) == []
    assert net["b"].store.get(DOC) is None


def test_remote_events_opened_updated_and_nothing_for_duplicates() -> None:
    net = net_of("a", "b")
    change(net["a"], 0.0, DOC, setk("k", 1))
    net.run(0.01)
    change(net["a"], net.now, DOC, setk("k", 2))
    net.run(0.01)
    replica = net["a"].store.get(DOC)
    assert replica is not None
    net.inject("a", "b", Push(DOC, 0, replica.full_update()))
    assert net.events("b") == [DocEvent("opened", DOC), DocEvent("updated", DOC)]
    assert net["b"].stats.deltas_applied == 2


def test_next_deadline_and_tick() -> None:
    a = Replicator(
        node="a",
        tuning=tuning(anti_entropy_interval=1.0),
        rng=random.Random(1),
        now=100.0,
    )
    assert 100.0 <= a.next_deadline() <= 101.0
    a.set_peers(["b"])
    a.tick(a.next_deadline())
    out = a.take_outputs()
    assert len(out) == 1
    assert isinstance(out[0].message, Tree)  # type: ignore[union-attr]
    assert a.peers == ["b"]
    a.set_peers(["a", "b", "b", "c"])  # itself and duplicates are ignored
    assert a.peers == ["b", "c"]


def test_a_delta_queued_before_a_remote_new_epoch_is_not_pushed_under_it() -> None:
    net = net_of("a", "b")
    change(net["a"], 0.0, DOC, setk("k", 1))
    net.run(0.01)
    # a writes on epoch 0; before its push leaves, b's epoch 1 arrives at a.
    change(net["a"], net.now, DOC, setk("stale", 1))
    net["b"].replace(DOC, 1, fresh_doc(fresh=1))
    net.run(0.01)
    for node in "ab":
        replica = net[node].store.get(DOC)
        assert replica is not None
        assert replica.epoch == 1
        assert content(replica) == {"fresh": 1}, node
    assert same(net, DOC, "a", "b")
    # Nothing of epoch 0 was sent labelled with epoch 1.
    for d in net.sent(Push, src="a"):
        assert isinstance(d.message, Push)
        if d.message.epoch == 1:
            probe = Replica(DOC, 1)
            probe.apply(d.message.update)
            assert "stale" not in content(probe)


def test_a_local_compaction_does_not_merge_older_deltas_into_its_push() -> None:
    net = net_of("a", "b")
    change(net["a"], 0.0, DOC, setk("k", 1))
    net.run(0.01)
    change(net["a"], net.now, DOC, setk("j", 2))  # still waiting for the coalescing delay
    net["a"].replace(DOC, 1, fresh_doc(k=1, j=2))
    net.run(0.01)
    assert same(net, DOC, "a", "b")
    assert content(net["b"].store.get(DOC)) == {"k": 1, "j": 2}
    pushes = [d.message for d in net.sent(Push, src="a") if d.message.epoch == 1]  # type: ignore[union-attr]
    assert len(pushes) == 1


# ---------------------------------------------------------------------- the journal


def persisted(net: Net, name: str) -> list[Persist]:
    return [o for o in net.outputs[name] if isinstance(o, Persist)]


def test_every_integrated_change_is_persisted_in_order_and_nothing_else() -> None:
    net = net_of("a", "b")
    change(net["a"], 0.0, DOC, setk("x", 1))
    change(net["a"], 0.0, DOC, setk("y", 2))
    net.run(0.1)
    mine = persisted(net, "a")
    # The epoch first (no content), then one record per transaction, in order.
    assert mine[0] == Persist(DOC, 0, b"")
    assert len(mine) == 3 and all(p.update for p in mine[1:])
    replayed = Replica(DOC, 0)
    for p in mine:
        if p.update:
            replayed.apply(p.update)
    assert content(replayed) == {"x": 1, "y": 2}
    # The receiver persists what it integrated (a document a push creates: its epoch and
    # first content in one record); a repeat of known changes adds nothing.
    theirs = persisted(net, "b")
    assert theirs[0].doc == DOC and theirs[0].epoch == 0 and theirs[0].update
    again = Replica(DOC, 0)
    for p in theirs:
        if p.update:
            again.apply(p.update)
    assert content(again) == {"x": 1, "y": 2}
    before = len(persisted(net, "b"))
    replica = net["a"].store.get(DOC)
    assert replica is not None
    net.inject("a", "b", Push(DOC, 0, replica.full_update(), 0, 0))
    net.collect()
    assert len(persisted(net, "b")) == before
    net["b"].drop(DOC)
    net.collect()
    assert persisted(net, "b")[-1] == Persist(DOC, 0, None)


def test_an_ack_waits_for_the_disk_and_a_refusal_does_not() -> None:
    net = Net()
    net.add("a")
    net.add("b")
    net.add("c", accept=lambda _n, _e: False)
    net.connect()
    core_b = net["b"]
    replica = Replica(DOC, 0)
    update = replica.write(lambda d: d.get("root", type=Map).__setitem__("k", 1))
    assert update is not None
    core_b.handle(0.0, "a", Push(DOC, 0, update, 7, 0))
    sends = [o for o in core_b.take_outputs() if isinstance(o, Send)]
    assert [(s.message.ack, s.durable) for s in sends] == [(7, True)]  # type: ignore[union-attr]
    net["c"].handle(0.0, "a", Push(DOC, 0, update, 8, 0))
    sends = [o for o in net["c"].take_outputs() if isinstance(o, Send)]
    assert [(s.message.ok, s.durable) for s in sends] == [(False, False)]  # type: ignore[union-attr]


def test_load_installs_a_stored_document_without_persisting_or_pushing_it() -> None:
    source = Replica(DOC, 3)
    first = source.write(lambda d: d.get("root", type=Map).__setitem__("a", 1))
    second = source.write(lambda d: d.get("root", type=Map).__setitem__("b", 2))
    assert first is not None and second is not None
    core = Replicator(node="a", tuning=tuning(), rng=random.Random(1), now=0.0)
    core.set_peers(["b"])
    loaded = core.load(DOC, 3, [first, second])
    assert loaded is not None and loaded.epoch == 3 and content(loaded) == {"a": 1, "b": 2}
    outputs = core.take_outputs()
    assert outputs == [DocEvent("opened", DOC)]
    assert core.load("state/bad", 0, [b"\xff\xfe"]) is None
    assert core.stats.rejected == {"bad_stored_update": 1}
    # Changes after the load are journaled.
    change(core, 0.0, DOC, setk("c", 3))
    assert any(isinstance(o, Persist) and o.update for o in core.take_outputs())


# ---------------------------------------------------------------------- membership first


def test_work_stops_when_the_time_slice_is_spent() -> None:
    net = net_of("a", "b")
    for i in range(20):
        change(net["a"], 0.0, f"state/d{i}", setk("k", i))
    net.hold()  # pushes lost
    b = net["b"]
    b.handle(net.now, "a", Sync(1, tuple(_full(net["a"], f"state/d{i}") for i in range(20)), ()))
    calls = 0

    def spent() -> bool:
        nonlocal calls
        calls += 1
        return calls % 3 == 0  # every third update uses the slice up

    steps = 0
    while b.pending_work():
        b.work(net.now, spent)
        steps += 1
    assert steps == 7  # ⌈20 / 3⌉: the caller yields between them
    assert len(b.store) == 20


def _full(core: Replicator, name: str) -> DocUpdate:
    replica = core.store.get(name)
    assert replica is not None
    return DocUpdate(name, replica.epoch, replica.full_update())


def test_a_dropped_frame_is_counted_and_its_peer_repaired_first() -> None:
    net = net_of("a", "b", "c", "d", anti_entropy_interval=1.0)
    net.run(5.0)
    for _ in range(5):
        net["a"].frame_dropped(net.now, "c")
        assert net["a"].stats.frames_dropped >= 1
        before = {p: net.sent(Tree, "a") for p in "bcd"}
        net.run(1.3)  # the next tick
        trees = [d for d in net.sent(Tree, "a") if d not in before["b"]]
        assert trees and trees[0].dst == "c"
    assert net["a"].stats.frames_dropped == 5
    # A round of a's with c under way when a frame to c is dropped is abandoned at once.
    net["a"].sync_with(net.now, "c")
    net.hold()
    assert net["a"]._rounds
    net["a"].frame_dropped(net.now, "c")
    assert net["a"]._rounds == {}
    assert net["a"].stats.rounds_failed == 0


def test_a_round_gone_quiet_does_not_hold_back_rounds_with_others() -> None:
    net = net_of("a", "b", "c", anti_entropy_interval=1.0, round_timeout=30.0)
    b = net.nodes.pop("b")  # b restarts: what a sent it is lost
    net["a"].sync_with(net.now, "b")
    net.run(5.0)
    # Well within the round timeout, a went on with c (and never two rounds with b).
    assert net.sent(Nodes, "c")
    assert [r.peer for r in net["a"]._rounds.values()].count("b") <= 1
    net.nodes["b"] = b
