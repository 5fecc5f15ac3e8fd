"""The daemon's cross-component rules, each on its own: who hears of a membership change, in
which order, and what a lost name conflict does."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from typing import Any

from meshd.membership.events import EventKind, MemberEvent, MemberView
from meshd.node.policy import ClusterPolicy
from meshd.registry.model import Entry
from meshd.registry.registry import RegistryEvent
from meshd.wire.membership import Status


def view(name: str, status: Status) -> MemberView:
    return MemberView(name, ("10.0.0.1", 7946), 0, status, {}, 0.0)


class Recorder:
    """Every collaborator at once: each call is written down, in order."""

    def __init__(self, members: list[MemberView], joined: bool = True) -> None:
        self.calls: list[tuple[str, Any]] = []
        self._members = members
        self.joined = joined
        self.peers: list[str] = [m.name for m in members if m.status.up]

    def members(self) -> list[MemberView]:
        return list(self._members)

    def set_members(self, live: Iterable[str], reference: Iterable[str] | None) -> None:
        ref = None if reference is None else sorted(reference)
        self.calls.append(("set_members", (sorted(live), ref)))

    def forget_peer(self, peer: str) -> None:
        self.calls.append(("forget_peer", peer))

    def request_sync(self, _now: float, peer: str) -> None:
        self.calls.append(("request_sync", peer))

    def close(self, peer: str) -> None:
        self.calls.append(("close", peer))

    def host_down(self, host: str) -> None:
        self.calls.append(("host_down", host))

    def host_up(self, host: str) -> None:
        self.calls.append(("host_up", host))

    def notify(self, name: str, notice: dict[str, Any]) -> bool:
        self.calls.append(("notify", (name, notice["type"])))
        return True

    def node_changed(self, node: str) -> None:
        self.calls.append(("node_changed", node))

    def unregister(self, _now: float, name: str) -> None:
        self.calls.append(("unregister", name))


class PlacementRecorder:
    def __init__(self, calls: list[tuple[str, Any]]) -> None:
        self.calls = calls

    def host_down(self, host: str) -> None:
        self.calls.append(("placement.host_down", host))


def policy(rec: Recorder, seed: int = 1) -> ClusterPolicy:
    return ClusterPolicy(
        node_name="a",
        membership=rec,
        replication=rec,
        links=(rec, rec),
        routing=rec,
        registry=rec,
        placement=PlacementRecorder(rec.calls),
        clock=lambda: 0.0,
        rng=random.Random(seed),
        log=logging.getLogger("test.policy"),
    )


def test_a_dead_host_is_let_go_everywhere_before_its_agents_are_placed_elsewhere() -> None:
    rec = Recorder([view("a", Status.ALIVE), view("b", Status.DEAD), view("c", Status.ALIVE)])
    p = policy(rec)
    p.on_member_event(MemberEvent(EventKind.DEAD, view("b", Status.DEAD), 1.0))
    assert rec.calls == [
        # The dead member still counts in the reference (until reaped or removed).
        ("set_members", (["a", "c"], ["a", "b", "c"])),
        ("close", "b"),
        ("close", "b"),
        ("forget_peer", "b"),
        ("host_down", "b"),
        ("node_changed", "b"),
        ("placement.host_down", "b"),
    ]


def test_a_member_that_joins_is_repaired_with_by_some_members() -> None:
    rec = Recorder([view("a", Status.ALIVE), view("b", Status.ALIVE)])
    p = policy(rec)
    p.on_member_event(MemberEvent(EventKind.JOIN, view("b", Status.ALIVE), 1.0))
    assert rec.calls[1:] == [("host_up", "b"), ("request_sync", "b"), ("node_changed", "b")]
    # In a large cluster only about 2/n of the members start a round with a newcomer.
    names = [f"n{i}" for i in range(50)]
    big = Recorder([view(n, Status.ALIVE) for n in ["a", *names]])
    q = policy(big, seed=7)
    for i in range(2500):
        q.on_member_event(MemberEvent(EventKind.ALIVE, view(names[i % 50], Status.ALIVE), 1.0))
    syncs = sum(1 for c in big.calls if c[0] == "request_sync")
    assert 60 < syncs < 140  # 2 in 50 of 2,500 events: about 100 (seeded)


def test_a_reaped_member_only_leaves_the_majority_and_self_events_change_nothing() -> None:
    rec = Recorder([view("a", Status.ALIVE), view("c", Status.ALIVE)])
    p = policy(rec)
    p.on_member_event(MemberEvent(EventKind.REAP, view("b", Status.DEAD), 1.0))
    assert rec.calls == [("set_members", (["a", "c"], ["a", "c"]))]
    rec.calls.clear()
    p.on_member_event(MemberEvent(EventKind.UPDATE, view("a", Status.ALIVE), 1.0))
    assert rec.calls == []


def test_no_majority_is_counted_before_the_first_join() -> None:
    rec = Recorder([view("a", Status.ALIVE)], joined=False)
    p = policy(rec)
    p.members_changed()
    assert rec.calls == [("set_members", (["a"], None))]
    rec.joined = True
    p.members_changed()
    rec.joined = False  # a later re-join (new seeds): the table stays the cluster's
    p.members_changed()
    assert rec.calls[1:] == [("set_members", (["a"], ["a"]))] * 2


def entry(name: str, node: str) -> Entry:
    return Entry(name, node, "", (), {}, 0, f"{node}/1/{name}")


def test_a_lost_conflict_tells_the_agent_and_withdraws_our_entry_only() -> None:
    rec = Recorder([view("a", Status.ALIVE)])
    p = policy(rec)
    ours, theirs = entry("x", "a"), entry("x", "b")
    p.on_registry_event(RegistryEvent("conflict", "x", ours, winner=theirs))
    assert rec.calls == [("notify", ("x", "name_conflict")), ("unregister", "x")]
    rec.calls.clear()
    p.on_registry_event(RegistryEvent("conflict", "x", theirs, winner=ours))
    p.on_registry_event(RegistryEvent("registered", "x", ours))
    assert rec.calls == []
