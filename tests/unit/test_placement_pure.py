"""The pure parts of placement: weighted rendezvous hashing, the keep_majority quorum, the
kinds a host advertises (KindInfo, KindTable) and agent-kind names.

Every daemon computes an agent's owner on its own from the replicated kinds table, so the
properties that matter are determinism (same inputs, any order, same owner), the weighting
(a host with twice the capacity gets twice the agents) and minimal disruption (a join or a
removal moves only the keys that host wins or loses).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples
from pycrdt import Array, Doc, Map

from meshd.placement import rendezvous
from meshd.placement.kinds import (
    MAX_KIND,
    KindInfo,
    KindTable,
    Strategy,
    check_kind,
    kind_of,
)
from meshd.placement.quorum import Quorum
from meshd_client.protocol import cbor, errors

KEYS = [f"counter/{i}" for i in range(20_000)]
hosts_st = st.dictionaries(
    st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=8),
    st.integers(min_value=1, max_value=1000).map(float),
    min_size=1,
    max_size=12,
)
key_st = st.text(min_size=1, max_size=40)


def shares(hosts: dict[str, float], keys: list[str] = KEYS) -> dict[str, int]:
    out = dict.fromkeys(hosts, 0)
    for key in keys:
        owner = rendezvous.owner(key, hosts)
        assert owner is not None
        out[owner] += 1
    return out


# ---------------------------------------------------------------------------- rendezvous


@settings(max_examples=examples(300), deadline=None)
@given(hosts=hosts_st, key=key_st, seed=st.integers(0, 2**32))
def test_owner_is_the_same_for_any_host_ordering(
    hosts: dict[str, float], key: str, seed: int
) -> None:
    items = list(hosts.items())
    random.Random(seed).shuffle(items)
    assert rendezvous.owner(key, dict(items)) == rendezvous.owner(key, hosts)
    assert rendezvous.ranked(key, dict(items)) == rendezvous.ranked(key, hosts)


@settings(max_examples=examples(300), deadline=None)
@given(hosts=hosts_st, key=key_st)
def test_ranked_is_best_first_and_starts_with_the_owner(hosts: dict[str, float], key: str) -> None:
    ranked = rendezvous.ranked(key, hosts)
    assert sorted(ranked) == sorted(hosts)
    assert ranked[0] == rendezvous.owner(key, hosts)
    scores = [rendezvous.score(key, h, hosts[h]) for h in ranked]
    assert scores == sorted(scores, reverse=True)
    # Failover falls through the ranking: without the owner, the runner-up owns the key.
    if len(ranked) > 1:
        rest = {h: w for h, w in hosts.items() if h != ranked[0]}
        assert rendezvous.owner(key, rest) == ranked[1]
        assert rendezvous.ranked(key, rest) == ranked[1:]


def test_unit_interval_is_open() -> None:
    for i in range(5000):
        u = rendezvous._unit(f"k{i}", "h")
        assert 0.0 < u < 1.0


def test_equal_weights_share_evenly() -> None:
    hosts = {f"h{i}": 10.0 for i in range(4)}
    counts = shares(hosts)
    for count in counts.values():
        assert abs(count - 5000) < 5000 * 0.06, counts


def test_twice_the_weight_gets_about_twice_the_keys() -> None:
    counts = shares({"a": 1.0, "b": 2.0})
    # Expected 6667 / 13333; the binomial standard deviation is ~67 keys.
    assert 1.9 < counts["b"] / counts["a"] < 2.1, counts
    assert abs(counts["b"] - 20_000 * 2 / 3) < 400, counts


def test_weights_are_proportional_across_several_hosts() -> None:
    hosts = {"a": 1.0, "b": 1.0, "c": 2.0, "d": 4.0}
    counts = shares(hosts)
    total = sum(hosts.values())
    for host, weight in hosts.items():
        expected = len(KEYS) * weight / total
        assert abs(counts[host] - expected) < expected * 0.06 + 50, (host, counts)


def test_only_the_ratio_of_weights_matters() -> None:
    a = {"x": 1.0, "y": 3.0, "z": 2.0}
    b = {h: w * 7.5 for h, w in a.items()}
    assert all(rendezvous.owner(k, a) == rendezvous.owner(k, b) for k in KEYS[:2000])


@pytest.mark.parametrize("n", [2, 3, 5, 9])
def test_a_join_moves_about_one_in_n_plus_one_and_only_to_the_new_host(n: int) -> None:
    before = {f"h{i}": 1.0 for i in range(n)}
    after = {**before, "new": 1.0}
    moved = 0
    for key in KEYS:
        old, new = rendezvous.owner(key, before), rendezvous.owner(key, after)
        if old != new:
            moved += 1
            assert new == "new", (key, old, new)
    ideal = 1 / (n + 1)
    assert abs(moved / len(KEYS) - ideal) < 0.015, (moved, ideal)
    assert rendezvous.moved_fraction(KEYS, before, after) == moved / len(KEYS)


def test_a_weighted_join_moves_its_weight_share() -> None:
    before = {"a": 1.0, "b": 1.0, "c": 1.0}
    after = {**before, "big": 3.0}  # half the total weight
    assert abs(rendezvous.moved_fraction(KEYS, before, after) - 0.5) < 0.02


@pytest.mark.parametrize("n", [2, 4, 7])
def test_a_removal_moves_only_the_removed_hosts_keys(n: int) -> None:
    before = {f"h{i}": float(1 + i % 3) for i in range(n)}
    gone = "h1"
    after = {h: w for h, w in before.items() if h != gone}
    lost = 0
    for key in KEYS:
        old, new = rendezvous.owner(key, before), rendezvous.owner(key, after)
        if old == gone:
            lost += 1
            assert new != gone
        else:
            assert new == old, key
    assert rendezvous.moved_fraction(KEYS, before, after) == lost / len(KEYS)


@settings(max_examples=examples(200), deadline=None)
@given(hosts=hosts_st, keys=st.lists(key_st, min_size=1, max_size=30), data=st.data())
def test_removal_and_join_are_minimal_for_any_hosts(
    hosts: dict[str, float], keys: list[str], data: st.DataObject
) -> None:
    gone = data.draw(st.sampled_from(sorted(hosts)))
    after = {h: w for h, w in hosts.items() if h != gone}
    for key in keys:
        old = rendezvous.owner(key, hosts)
        new = rendezvous.owner(key, after)
        if old != gone:
            assert new == old
        # ... and joining it back restores exactly the old owners.
        assert rendezvous.owner(key, {**after, gone: hosts[gone]}) == old


@pytest.mark.parametrize("bad", [0.0, -1.0, -1e9])
def test_zero_and_negative_weights_are_excluded(bad: float) -> None:
    hosts = {"good": 1.0, "bad": bad}
    assert all(rendezvous.owner(k, hosts) == "good" for k in KEYS[:500])
    assert rendezvous.ranked("k", hosts) == ["good"]
    assert rendezvous.owner("k", {"bad": bad}) is None
    assert rendezvous.ranked("k", {"bad": bad}) == []


def test_no_hosts_no_owner() -> None:
    assert rendezvous.owner("k", {}) is None
    assert rendezvous.ranked("k", {}) == []
    assert rendezvous.moved_fraction([], {"a": 1.0}, {}) == 0.0
    assert rendezvous.moved_fraction(["k"], {"a": 1.0}, {}) == 1.0


def test_owners_are_pinned_across_processes_and_versions() -> None:
    # blake2b, not Python's salted hash(): these values must never change between runs or
    # versions, or daemons of different versions would disagree on every owner.
    hosts = {"n1": 100.0, "n2": 100.0, "n3": 100.0}
    owners = [rendezvous.owner(f"counter/{i}", hosts) for i in range(8)]
    assert owners == ["n2", "n1", "n3", "n2", "n2", "n2", "n2", "n3"]
    assert rendezvous._unit("counter/7", "n1") == 0.35240974240401857
    assert rendezvous._unit("a", "b") != rendezvous._unit("b", "a")


# ---------------------------------------------------------------------------- quorum

FIVE = frozenset({"n1", "n2", "n3", "n4", "n5"})
SA = 5.0


def settled(members: frozenset[str], at: float = 0.0) -> Quorum:
    """A quorum whose stable view is ``members`` (observed at ``at``, evaluated later)."""
    q = Quorum(SA)
    q.observe(at, members)
    assert q.tick(at + SA)
    assert q.stable == members
    return q


def run(q: Quorum, view: frozenset[str], start: float, end: float, step: float = 0.1) -> None:
    """Observe ``view`` from ``start`` and tick every ``step`` until ``end``."""
    q.observe(start, view)
    for i in range(round((end - start) / step) + 1):
        q.tick(start + i * step)


def test_the_first_decision_is_immediate_later_starts_wait() -> None:
    q = Quorum(SA)
    assert not q.has_majority  # nothing runs before the first observation (the join)
    q.observe(0.0, frozenset({"n1", "n2"}), known=frozenset({"n1", "n2", "n3"}))
    assert q.tick(0.0)  # first decision: immediate
    q.observe(1.0, frozenset({"n1"}))
    assert not q.tick(1.0)  # stop fast
    q.observe(2.0, frozenset({"n1", "n2"}))
    assert not q.tick(2.0 + SA - 0.1)  # start slow
    assert q.tick(2.0 + SA)


def test_stopping_waits_out_a_brief_suspicion_but_not_a_lasting_one() -> None:
    q = Quorum(SA, stop_after=1.0)
    q.observe(0.0, FIVE)
    assert q.tick(0.0)
    q.observe(1.0, frozenset({"n1", "n2"}), known=FIVE)  # three suspected at once
    assert q.tick(1.5)  # within the grace: keeps running
    q.observe(1.8, FIVE)  # they refuted
    assert q.tick(2.5)
    q.observe(3.0, frozenset({"n1", "n2"}), known=FIVE)  # the grace starts anew
    assert q.tick(3.9)
    assert not q.tick(4.0)  # a lasting loss stops after stop_after
    q.observe(4.5, FIVE)
    assert not q.tick(4.5 + SA - 0.1)  # and the start stays slow
    assert q.tick(4.5 + SA)


def test_a_joined_node_in_a_minority_never_starts() -> None:
    q = Quorum(SA)
    q.observe(0.0, frozenset({"n4", "n5"}), known=FIVE)
    assert not q.tick(0.0)
    assert not q.tick(100.0)


def test_the_reference_is_every_member_known_and_not_left() -> None:
    q = Quorum(SA)
    q.observe(0.0, frozenset({"n1", "n2"}), known=FIVE)  # three known members are down
    assert not q.tick(100.0)
    assert q.stable == FIVE
    q.observe(200.0, frozenset({"n1", "n2"}), known=frozenset({"n1", "n2", "n3"}))
    assert not q.tick(200.0 + SA - 0.1)  # start slow ...
    assert q.tick(200.0 + SA)  # ... two of three (two members left gracefully)


def test_growing_extends_the_reference_and_keeps_running() -> None:
    q = settled(frozenset({"n1", "n2", "n3"}))
    run(q, FIVE, 10.0, 10.1)
    assert q.stable == FIVE and q.has_majority


def split(
    sides: list[frozenset[str]], at: float, until: float, step: float = 0.1
) -> dict[str, list[tuple[float, bool]]]:
    """Every member of every side starts from the settled full view, sees its own side from
    ``at``, and ticks until ``until``; returns each member's (time, has_majority) trace."""
    everyone = frozenset().union(*sides)
    quorums = {m: settled(everyone) for side in sides for m in side}
    traces: dict[str, list[tuple[float, bool]]] = {m: [] for m in quorums}
    for side in sides:
        for m in side:
            quorums[m].observe(at, side)
    for i in range(round((until - at) / step) + 1):
        t = at + i * step
        for m, q in quorums.items():
            traces[m].append((t, q.tick(t)))
    return traces


def test_three_two_split_the_three_keep_it_the_two_stop_at_once() -> None:
    big, small = frozenset({"n1", "n2", "n3"}), frozenset({"n4", "n5"})
    traces = split([big, small], at=10.0, until=20.0)
    for m in big:
        assert all(ok for _, ok in traces[m]), m
    for m in small:
        assert not any(ok for _, ok in traces[m]), m  # stop fast


def test_the_reference_does_not_follow_a_split() -> None:
    q = settled(FIVE)
    run(q, frozenset({"n1", "n2", "n3"}), 10.0, 16.0)
    assert q.stable == FIVE and q.has_majority
    q2 = settled(FIVE)
    run(q2, frozenset({"n4", "n5"}), 10.0, 16.0)
    assert q2.stable == FIVE and not q2.has_majority


@pytest.mark.parametrize("sides", [(2, 2), (3, 3), (1, 1), (2, 2, 2), (1, 2, 2)])
def test_no_strict_majority_anywhere_means_nobody(sides: tuple[int, ...]) -> None:
    names = iter(f"m{i}" for i in range(100))
    groups = [frozenset(next(names) for _ in range(n)) for n in sides]
    traces = split(groups, at=10.0, until=16.0)
    assert all(not trace[-1][1] for trace in traces.values())


def test_flapping_stops_at_once_and_restarts_only_when_stable() -> None:
    q = settled(FIVE)
    minority = frozenset({"n1", "n2"})
    t = 10.0
    for _ in range(30):  # the view changes every 2 s: never stable for 5 s
        q.observe(t, minority)
        assert not q.tick(t)  # stop fast
        t += 2.0
        q.observe(t, FIVE)
        for dt in (0.0, 1.0, 1.9):
            assert not q.tick(t + dt)  # start slow: never stable long enough
        t += 2.0
    run(q, FIVE, t, t + SA)
    assert q.has_majority


def test_heal_restores_the_majority_everywhere() -> None:
    groups = [frozenset({"n1", "n2", "n3"}), frozenset({"n4", "n5"})]
    quorums = {m: settled(FIVE) for g in groups for m in g}
    for g in groups:
        for m in g:
            run(quorums[m], g, 10.0, 16.0)
    assert [quorums[m].has_majority for m in sorted(quorums)] == [True, True, True, False, False]
    for q in quorums.values():
        run(q, FIVE, 20.0, 24.8)
    assert not quorums["n4"].has_majority  # not before the healed view is stable ...
    for q in quorums.values():
        run(q, FIVE, 25.0, 25.0)
    assert all(q.has_majority for q in quorums.values())  # ... then everywhere


def test_heal_after_an_even_split_restores_it() -> None:
    four = frozenset({"a", "b", "c", "d"})
    quorums = {m: settled(four) for m in four}
    for m in four:
        run(quorums[m], frozenset({"a", "b"}) if m in "ab" else frozenset({"c", "d"}), 10, 16)
    assert not any(q.has_majority for q in quorums.values())
    for q in quorums.values():
        run(q, four, 20.0, 25.0)
    assert all(q.has_majority for q in quorums.values())


def test_crashed_members_count_until_reaped() -> None:
    """A crash and a partition look the same from here: crashed members stay in the
    reference until membership forgets them (or they leave), so losing three of five stops
    the other two — until the dead are reaped."""
    q = settled(FIVE)
    alive = set(FIVE)
    t = 10.0
    for gone in ("n5", "n4"):
        alive.discard(gone)
        run(q, frozenset(alive), t, t + 1.0, step=0.5)
        assert q.has_majority, alive  # three of five: never interrupted
        t += 10.0
    alive.discard("n3")
    run(q, frozenset(alive), t, t + 1.0, step=0.5)
    assert not q.has_majority
    q.observe(t + 2.0, frozenset(alive), known=frozenset(alive))  # the dead were reaped
    assert q.tick(t + 2.0 + SA)


def test_crashes_all_at_once_beyond_half_stop_everyone() -> None:
    q = settled(FIVE)
    run(q, frozenset({"n1", "n2"}), 10.0, 30.0)
    assert not q.has_majority
    q = settled(FIVE)
    run(q, frozenset({"n1", "n2", "n3"}), 10.0, 30.0)
    assert q.has_majority


# ---------------------------------------------------------------------------- KindInfo


@given(
    capacity=st.integers(0, 2**40),
    active=st.integers(0, 2**40),
    strategy=st.sampled_from(list(Strategy)),
    draining=st.booleans(),
)
def test_kind_info_round_trips(
    capacity: int, active: int, strategy: Strategy, draining: bool
) -> None:
    info = KindInfo(capacity, active, strategy, draining)
    raw = info.encode()
    assert isinstance(raw, bytes)
    assert KindInfo.decode(raw) == info
    assert KindInfo.decode(bytearray(raw)) == info
    assert KindInfo.decode(memoryview(raw)) == info


def test_kind_info_accepts() -> None:
    assert KindInfo(2, 1, Strategy.KEEP_MAJORITY).accepts
    assert not KindInfo(2, 2, Strategy.KEEP_MAJORITY).accepts
    assert not KindInfo(2, 3, Strategy.KEEP_MAJORITY).accepts
    assert not KindInfo(2, 0, Strategy.KEEP_MAJORITY, draining=True).accepts
    assert not KindInfo(0, 0, Strategy.ALLOW_DUPLICATES).accepts


def test_kind_info_clamps_negative_numbers() -> None:
    raw = cbor.dumps([-5, -1, "allow_duplicates", False])
    assert KindInfo.decode(raw) == KindInfo(0, 0, Strategy.ALLOW_DUPLICATES, False)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xff",
        b"\x00" * 5,
        cbor.dumps([]),
        cbor.dumps([1, 2, "keep_majority"]),
        cbor.dumps([1, 2, "keep_majority", False, "extra"]),
        cbor.dumps(["1", 2, "keep_majority", False]),
        cbor.dumps([1, 2.0, "keep_majority", False]),
        cbor.dumps([True, 2, "keep_majority", False]),
        cbor.dumps([1, 2, "keep_majority", 0]),
        cbor.dumps([1, 2, "sometimes", False]),
        cbor.dumps([1, 2, None, False]),
        cbor.dumps([1, 2, ["keep_majority"], False]),
        cbor.dumps({"a": 1, "b": 2, "c": 3, "d": 4}),
        cbor.dumps("abcd"),
        cbor.dumps(7),
        cbor.dumps(None),
        b"\xc1\x00",  # a tag: refused by the safe decoder
        "a str",
        None,
        7,
        -1,
        True,
        [1, 2, "keep_majority", False],
        {"capacity": 1},
    ],
)
def test_malformed_kind_info_decodes_to_none(raw: Any) -> None:
    assert KindInfo.decode(raw) is None


def test_whatever_a_peer_document_holds_decodes_to_none_without_raising() -> None:
    # The kinds map of a peer's registry document holds whatever its daemon wrote. pycrdt
    # hands integers beyond 2**53 back as int: bytes(2**62) would try to allocate 4 EiB
    # (MemoryError inside the replication listener) instead of being refused.
    doc: Doc[Any] = Doc()
    kinds: Map[Any] = doc.get("kinds", type=Map)
    values: dict[str, Any] = {
        "big": 2**62,
        "bigger": 2**63 - 1,
        "float": 5,
        "bool": True,
        "str": "keep_majority",
        "none": None,
        "list": [1, 2, "keep_majority", False],
        "dict": {"capacity": 1},
        "map": Map({"x": 1}),
        "array": Array([1, 2, "keep_majority", False]),
        "ok": KindInfo(3, 1, Strategy.ALLOW_DUPLICATES).encode(),
    }
    for key, value in values.items():
        kinds[key] = value
    decoded = {key: KindInfo.decode(raw) for key, raw in kinds.items()}
    assert decoded.pop("ok") == KindInfo(3, 1, Strategy.ALLOW_DUPLICATES)
    assert decoded == dict.fromkeys(decoded)


@settings(max_examples=examples(500), deadline=None)
@given(raw=st.binary(max_size=64))
def test_decoding_arbitrary_bytes_never_raises(raw: bytes) -> None:
    info = KindInfo.decode(raw)
    assert info is None or isinstance(info, KindInfo)


# ---------------------------------------------------------------------------- KindTable

KM, AD = Strategy.KEEP_MAJORITY, Strategy.ALLOW_DUPLICATES


def test_kind_table_hosts_and_kinds() -> None:
    table = KindTable()
    table.set_host("a", {"counter": KindInfo(10, 1, KM), "cache": KindInfo(5, 0, AD)})
    table.set_host("b", {"counter": KindInfo(20, 3, KM)})
    assert table.kinds() == {"counter", "cache"}
    assert table.hosts("counter") == {"a": KindInfo(10, 1, KM), "b": KindInfo(20, 3, KM)}
    assert table.hosts("cache") == {"a": KindInfo(5, 0, AD)}
    assert table.hosts("nope") == {}
    assert table.info("a", "cache") == KindInfo(5, 0, AD)
    assert table.info("b", "cache") is None
    assert table.info("zzz", "cache") is None
    # Setting a host replaces its whole map; an empty map removes it.
    table.set_host("a", {"cache": KindInfo(6, 0, AD)})
    assert table.hosts("counter") == {"b": KindInfo(20, 3, KM)}
    table.set_host("b", {})
    assert table.kinds() == {"cache"}
    table.drop_host("a")
    table.drop_host("never-there")
    assert table.kinds() == set()
    assert table.hosts_snapshot() == frozenset()


@pytest.mark.parametrize(
    ("strategies", "expected"),
    [
        ([], None),
        ([KM], KM),
        ([AD], AD),
        ([AD, AD, AD], AD),
        ([AD, KM], KM),
        ([KM, AD, AD], KM),
        ([AD, AD, KM], KM),
    ],
)
def test_strategy_merge_keep_majority_wins_any_disagreement(
    strategies: list[Strategy], expected: Strategy | None
) -> None:
    for order in (strategies, list(reversed(strategies))):
        table = KindTable()
        for i, strategy in enumerate(order):
            table.set_host(f"h{i}", {"k": KindInfo(1, 0, strategy)})
        table.set_host("other", {"other-kind": KindInfo(1, 0, KM)})
        assert table.strategy("k") == expected


def test_hosts_snapshot_ignores_active_counts_only() -> None:
    table = KindTable()
    table.set_host("a", {"k": KindInfo(10, 0, KM)})
    table.set_host("b", {"k": KindInfo(10, 0, KM), "j": KindInfo(3, 0, AD)})
    before = table.hosts_snapshot()
    table.set_host("a", {"k": KindInfo(10, 9, KM)})
    table.set_host("b", {"k": KindInfo(10, 10, KM), "j": KindInfo(3, 3, AD)})
    assert table.hosts_snapshot() == before
    # What placement does depend on changes it: capacity, draining, who serves what.
    changes: list[Callable[[KindTable], None]] = [
        lambda t: t.set_host("a", {"k": KindInfo(11, 0, KM)}),
        lambda t: t.set_host("a", {"k": KindInfo(10, 0, KM, draining=True)}),
        lambda t: t.set_host("c", {"k": KindInfo(10, 0, KM)}),
        lambda t: t.drop_host("a"),
        lambda t: t.set_host("b", {"k": KindInfo(10, 0, KM)}),
    ]
    for change in changes:
        copy = KindTable()
        copy.set_host("a", {"k": KindInfo(10, 0, KM)})
        copy.set_host("b", {"k": KindInfo(10, 0, KM), "j": KindInfo(3, 0, AD)})
        change(copy)
        assert copy.hosts_snapshot() != before


def test_hosts_snapshot_is_independent_of_insertion_order() -> None:
    entries = [
        ("a", {"k": KindInfo(10, 0, KM), "j": KindInfo(1, 0, AD)}),
        ("b", {"j": KindInfo(2, 0, AD), "k": KindInfo(5, 0, KM)}),
        ("c", {"k": KindInfo(7, 0, KM, draining=True)}),
    ]
    one, two = KindTable(), KindTable()
    for host, kinds in entries:
        one.set_host(host, kinds)
    for host, kinds in reversed(entries):
        two.set_host(host, dict(reversed(list(kinds.items()))))
    assert one.hosts_snapshot() == two.hosts_snapshot()
    assert one.hosts("k") == two.hosts("k")


# ---------------------------------------------------------------------------- kind names


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("counter/7", "counter"),
        ("counter/a/b", "counter"),
        ("c/x", "c"),
        ("counter/", None),
        ("/7", None),
        ("/", None),
        ("counter", None),
        ("", None),
    ],
)
def test_kind_of(name: str, kind: str | None) -> None:
    assert kind_of(name) == kind


@pytest.mark.parametrize(
    "kind", ["counter", "c", "x" * MAX_KIND, "with space", "ünïcode", "a.b-c_d"]
)
def test_valid_kinds(kind: str) -> None:
    assert check_kind(kind) == kind


@pytest.mark.parametrize(
    "kind", ["", "x" * (MAX_KIND + 1), "a/b", "/", "tab\there", "nul\x00", "nl\n", None, 5, b"k"]
)
def test_invalid_kinds(kind: Any) -> None:
    with pytest.raises(errors.Invalid):
        check_kind(kind)


@given(name=st.text(max_size=60))
def test_kind_of_is_the_prefix_and_check_kind_decides_on_it_alone(name: str) -> None:
    kind = kind_of(name)
    head, sep, tail = name.partition("/")
    # A kind exactly when the name is <head>/<something> with a non-empty head.
    assert (kind is not None) == bool(sep and head and tail)
    if kind is None:
        return
    assert name == f"{kind}/{tail}" and "/" not in kind
    # check_kind accepts it exactly when it is short and printable (it never has a '/').
    acceptable = len(kind) <= MAX_KIND and kind.isprintable()
    try:
        assert check_kind(kind) == kind
        accepted = True
    except errors.Invalid:
        accepted = False
    assert accepted == acceptable
