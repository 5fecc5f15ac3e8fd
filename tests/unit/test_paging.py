"""Paging of repair: bounded pages that resume where they stopped, tampered and truncated
pages, and whole rounds on the sans-IO cores with a lowered per-message limit."""

from __future__ import annotations

from typing import Any

from replication_helpers import Net, change, content, tuning, vector

from meshd.replication import messages, paging
from meshd.replication.messages import (
    DocVector,
    ListRange,
    Nodes,
    Page,
    Push,
    Sync,
    Tree,
    TreeNode,
    Updates,
)
from meshd.replication.replica import DocStore, Replica
from meshd.replication.tree import FANOUT, leaf_of

ALL = [(1, i) for i in range(FANOUT)]
LIMITS = paging.Limits(docs=7, bytes=1 << 20)


def setk(key: str, value: Any) -> list[dict[str, Any]]:
    return [{"op": "set", "path": [key], "value": value}]


def filled(count: int, prefix: str = "state/d") -> DocStore:
    store = DocStore()
    for i in range(count):
        replica = Replica(f"{prefix}{i}", 0)
        replica.write(lambda d, i=i: d.get("root", type=__import__("pycrdt").Map).update({"i": i}))
        store.add(replica)
    return store


def copy_of(store: DocStore) -> DocStore:
    copy = DocStore()
    for replica in store:
        twin = Replica(replica.name, replica.epoch)
        twin.apply(replica.full_update())
        copy.add(twin)
    return copy


def key(name: str) -> tuple[int, str]:
    return leaf_of(name), name


def test_pages_are_bounded_and_resume_to_list_everything_once_in_order() -> None:
    store = filled(50)
    listed: list[str] = []
    after = None
    pages = 0
    while True:
        docs, end = paging.page(store, ALL, after, LIMITS)
        pages += 1
        assert 1 <= len(docs) <= LIMITS.docs
        listed += [d.doc for d in docs]
        if end is None:
            break
        assert end == key(docs[-1].doc)
        after = end
    assert pages == 8  # ⌈50 / 7⌉
    assert sorted(listed) == sorted(r.name for r in store)
    assert [key(n) for n in listed] == sorted(key(n) for n in listed)


def test_pages_are_bounded_in_bytes_too() -> None:
    store = filled(40)
    docs, end = paging.page(store, ALL, None, paging.Limits(docs=1000, bytes=200))
    assert end is not None
    size = sum(len(d.doc) + len(d.sv) + paging.VECTOR_OVERHEAD for d in docs)
    assert size <= 200 and len(docs) >= 2


def test_compare_finds_both_directions_within_the_page_interval() -> None:
    mine = filled(30)
    theirs = copy_of(mine)
    extra = Replica("state/only-mine", 0)
    extra.write(lambda d: d.get("root", type=__import__("pycrdt").Map).update({"x": 1}))
    mine.add(extra)
    theirs.remove("state/d3")
    docs, end = paging.page(theirs, ALL, None, paging.Limits(1000, 1 << 20))
    assert end is None
    result = paging.compare(mine, ALL, None, tuple(docs), end, LIMITS, lambda _n, _e: True)
    assert {u.doc for u in result.updates} == {"state/d3", "state/only-mine"}
    assert result.want == [] and result.refused == [] and result.next is None


def test_a_tampered_page_listing_documents_outside_its_interval_is_refused() -> None:
    mine = filled(30)
    ranges = [(1, leaf_of("state/d5") >> 12)]
    outside = next(
        f"state/x{i}" for i in range(100) if leaf_of(f"state/x{i}") >> 12 != ranges[0][1]
    )
    inside_but_after_end = "state/d5"
    end = (leaf_of("state/d5"), "state/d4")  # before state/d5 in key order
    page = (
        DocVector(outside, 0, b"\x00"),
        DocVector(inside_but_after_end, 0, b"\x00"),
    )
    result = paging.compare(mine, ranges, None, page, end, LIMITS, lambda _n, _e: True)
    assert sorted(result.refused) == sorted([outside, inside_but_after_end])
    assert all(w.doc not in (outside, inside_but_after_end) for w in result.want)


def test_a_truncated_page_costs_updates_not_correctness() -> None:
    """A page that lists fewer documents than the responder holds in its interval (cut in
    transit or by a faulty peer): the initiator sends the unlisted documents whole, which a
    CRDT merges harmlessly."""
    mine = filled(20)
    theirs = copy_of(mine)
    docs, end = paging.page(theirs, ALL, None, paging.Limits(1000, 1 << 20))
    cut = tuple(docs[:5])
    result = paging.compare(
        mine, ALL, None, cut, end, paging.Limits(1000, 1 << 20), lambda *_: True
    )
    assert {u.doc for u in result.updates} == {d.doc for d in docs[5:]}
    for u in result.updates:
        copy = theirs.get(u.doc)
        assert copy is not None
        before = copy.sv
        copy.apply(u.update)
        assert copy.sv == before  # nothing new: merging it is a no-op


def test_compare_stops_at_its_update_budget_and_says_where_to_resume() -> None:
    mine = filled(20)
    empty = DocStore()
    result = paging.compare(mine, ALL, None, (), None, paging.Limits(6, 1 << 20), lambda *_: True)
    assert len(result.updates) == 6
    assert result.next == key(result.updates[-1].doc)
    # Resuming there covers the rest, and nothing twice.
    rest = paging.compare(
        mine, ALL, result.next, (), None, paging.Limits(100, 1 << 20), lambda *_: True
    )
    names = [u.doc for u in result.updates + rest.updates]
    assert sorted(names) == sorted(r.name for r in mine) and len(set(names)) == 20
    assert len(empty) == 0


def test_answer_stays_within_its_limits() -> None:
    store = filled(30)
    want = tuple(DocVector(r.name, 0, b"\x00") for r in store)
    replies, bad = paging.answer(store, want, paging.Limits(10, 1 << 20))
    assert len(replies) == 10 and bad == 0
    small = paging.Limits(1000, 100)
    replies, _ = paging.answer(store, want, small)
    assert len(replies) >= 1 and sum(len(u.update) for u in replies[1:]) <= 100


# ---------------------------------------------------------------------- whole rounds


def cluster(count: int, docs: int, **tune: Any) -> Net:
    net = Net()
    names = [chr(ord("a") + i) for i in range(count)]
    for name in names:
        net.add(name, tuning(**tune))
    net.connect(names)
    for i in range(docs):
        change(net["a"], 0.0, f"state/d{i:04d}", setk("v", "x" * 20))
    net.run(0.01)
    return net


def join(net: Net, name: str) -> None:
    net.add(name, net["a"].tuning)
    net.connect()


def test_a_fresh_node_is_filled_beyond_the_per_message_limit_in_one_round() -> None:
    net = cluster(2, 120, page_docs=10, max_docs_per_message=10)
    join(net, "z")
    net.delivered.clear()
    net.sync("z", "a")
    assert len(net["z"].store) == 120
    assert net["z"].stats.rounds_completed == 1
    for d in net.delivered:
        encoded = messages.encode(d.message)
        messages.decode(encoded, max_docs=10)  # the receiver's lowered bound holds
        if isinstance(d.message, Page):
            assert len(d.message.docs) <= 10
        if isinstance(d.message, Sync | Updates):
            assert len(d.message.updates) <= 10
    assert len([d for d in net.delivered if isinstance(d.message, Page)]) >= 12


def test_a_fresh_node_is_filled_once_not_by_every_peer_at_once() -> None:
    net = cluster(3, 200, page_docs=10)
    join(net, "z")
    for peer in "abc":  # every peer sees the join and starts a round with it at once
        net[peer].sync_with(net.now, "z")
    net["z"].sync_with(net.now, "a")  # and z with one of them
    net.deliver()
    z = net["z"]
    assert len(z.store) == 200
    # One peer streams everything; the three other rounds that started at the same moment
    # got in at most one page each before the fill held z.
    assert z.stats.repair_updates_received <= 200 + 3 * 10, z.stats.repair_updates_received
    assert sum(net[p].stats.rounds_busy for p in "abc") >= 1
    # Every replica is the same.
    for i in range(200):
        name = f"state/d{i:04d}"
        assert vector(z.store.get(name)) == vector(net["a"].store.get(name))
        assert content(z.store.get(name)) == content(net["a"].store.get(name))


def test_a_page_that_does_not_move_forward_fails_the_round() -> None:
    net = cluster(2, 30, page_docs=5)
    net.drop = lambda _s, _d, m: isinstance(m, Push)
    join(net, "z")
    net["z"].sync_with(net.now, "a")
    held = net.hold()
    tree = messages.decode(held[0][2])
    assert isinstance(tree, Tree)
    net.inject("a", "z", Nodes(tree.round, tuple(TreeNode(1, i, 9, 30) for i in range(16))))
    (listing,) = [messages.decode(f) for _s, _d, f in net.hold()]
    assert isinstance(listing, ListRange) and listing.after is None
    first = max(net["a"].store, key=lambda r: (r.leaf, r.name))
    net.inject("a", "z", Page(tree.round, (), (first.leaf, first.name)))
    (again,) = [messages.decode(f) for _s, _d, f in net.hold()]
    assert isinstance(again, ListRange) and again.after == (first.leaf, first.name)
    # A page ending where the listing already was: refused, and the round ends (no loop).
    net.inject("a", "z", Page(tree.round, (), (0, "state/a")))
    assert net["z"].stats.rejected == {"page_no_progress": 1}
    assert net.hold() == []
    assert net["z"]._rounds == {}
