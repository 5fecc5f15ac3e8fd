"""The registry and shared state at 200+ nodes, in virtual time.

Every node is the real sans-IO :class:`Replicator` with the daemon's default tuning (pushes
with fan-out and hops, anti-entropy every second) and a real :class:`Registry` on top, wired
as the daemon wires them. The network is simulated: every message crosses the real wire
format with a small random latency, and a partition drops what crosses it. Membership is each
node's own view, set by the test as the failure detector would (a partition makes each side
see the other as dead; a crash makes everyone see the node as dead). Seeded: every run is the
same.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable
from typing import Any

from fakes import StaticLiveness
from pycrdt import Map

from meshd.registry.registry import Registry, RegistryEvent
from meshd.replication import messages
from meshd.replication.core import ReplicationTuning, Replicator, Send
from meshd.state import values

N = 200
EPOCH = 1


class Cluster:
    def __init__(self, n: int = N, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.names = [f"n{i:03d}" for i in range(n)]
        self.cores: dict[str, Replicator] = {}
        self.regs: dict[str, Registry] = {}
        self.views: dict[str, StaticLiveness] = {}
        self.events: dict[str, list[RegistryEvent]] = {}
        self.crashed: set[str] = set()
        self.cut: Callable[[str, str], bool] = lambda _a, _b: False
        self._queue: list[tuple[float, int, str, str, bytes]] = []
        self._seq = 0
        self.delivered = 0
        for name in self.names:
            self._add(name)
        for name in self.names:
            self.cores[name].set_peers(p for p in self.names if p != name)
        self._collect()

    def _add(self, name: str) -> None:
        view = self.views[name] = StaticLiveness(self.names, EPOCH)
        core = Replicator(
            node=name,
            tuning=ReplicationTuning(),
            rng=random.Random(f"{name}/{self.rng.random()}"),
            now=self.now,
            # (the registry is built just below)
            accept=lambda doc, epoch: self.regs[name].accept(doc, epoch),  # noqa: PLW0108
        )
        reg = Registry(
            node=name,
            epoch=EPOCH,
            docs=core,
            liveness=view,
            wall_ms=lambda: int(self.now * 1000) + 1_000_000,
            reclaim_after=3600.0,
        )
        core.on_open = reg.on_open
        core.on_drop = reg.on_drop
        self.cores[name], self.regs[name], self.events[name] = core, reg, []
        reg.listeners.append(self.events[name].append)
        reg.listeners.append(lambda event: self._on_event(name, event))
        reg.open_own()

    def _on_event(self, node: str, event: RegistryEvent) -> None:
        # As the daemon does: a node whose entry lost a conflict removes it.
        if event.kind == "conflict" and event.entry.node == node:
            self.regs[node].unregister(self.now, event.name)

    # ------------------------------------------------------------------ the network

    def _collect(self) -> None:
        for name, core in self.cores.items():
            if name in self.crashed:
                core.take_outputs()
                continue
            for out in core.take_outputs():
                if isinstance(out, Send):
                    self._seq += 1
                    when = self.now + 0.0005 + self.rng.random() * 0.002
                    data = messages.encode(out.message)
                    heapq.heappush(self._queue, (when, self._seq, name, out.peer, data))

    def run(self, duration: float) -> None:
        """Advance virtual time, delivering messages and firing every core's timers."""
        until = self.now + duration
        while True:
            next_msg = self._queue[0][0] if self._queue else float("inf")
            live = [c for n, c in self.cores.items() if n not in self.crashed]
            next_timer = min(c.next_deadline() for c in live)
            when = min(next_msg, next_timer)
            if when > until:
                break
            self.now = max(self.now, when)
            if next_msg <= next_timer:
                _, _, src, dst, data = heapq.heappop(self._queue)
                if dst in self.crashed or src in self.crashed or self.cut(src, dst):
                    continue
                core = self.cores[dst]
                core.handle(self.now, src, messages.decode(data))
                while core.pending_work():
                    core.work(self.now)
                self.delivered += 1
            else:
                for name, core in self.cores.items():
                    if name not in self.crashed and core.next_deadline() <= self.now:
                        core.tick(self.now)
            self._collect()
        self.now = until

    def run_until(self, check: Callable[[], bool], limit: float, step: float = 0.25) -> float:
        """Run until ``check()`` holds; returns the virtual seconds it took (fails past
        ``limit``)."""
        start = self.now
        while not check():
            assert self.now - start < limit, f"not within {limit} virtual seconds"
            self.run(step)
        return self.now - start

    # ------------------------------------------------------------------ membership

    def declare_down(self, observers: Iterable[str], nodes: Iterable[str]) -> None:
        """``observers`` see ``nodes`` as dead (peers and registry follow)."""
        nodes = list(nodes)
        for observer in observers:
            view = self.views[observer]
            for node in nodes:
                view.set_down(node, self.now)
            self.cores[observer].set_peers(
                p for p in self.names if p != observer and view.up(p) and p not in self.crashed
            )
            for node in nodes:
                self.regs[observer].node_changed(node)
        self._collect()

    def declare_up(self, observers: Iterable[str], nodes: Iterable[str]) -> None:
        nodes = list(nodes)
        for observer in observers:
            view = self.views[observer]
            for node in nodes:
                view.down_since.pop(node, None)
            self.cores[observer].set_peers(
                p for p in self.names if p != observer and view.up(p) and p not in self.crashed
            )
            for node in nodes:
                self.regs[observer].node_changed(node)
                self.cores[observer].request_sync(self.now, node)  # as a rejoin triggers
        self._collect()

    def partition(self, side: list[str]) -> list[str]:
        """Split into ``side`` and the rest; each side sees the other as dead."""
        inside = set(side)
        other = [n for n in self.names if n not in inside and n not in self.crashed]
        self.cut = lambda a, b: (a in inside) != (b in inside)
        self.declare_down(side, other)
        self.declare_down(other, side)
        return other

    def heal(self, side: list[str], other: list[str]) -> None:
        self.cut = lambda _a, _b: False
        self.declare_up(side, other)
        self.declare_up(other, side)

    # ------------------------------------------------------------------ checks

    def live(self) -> list[str]:
        return [n for n in self.names if n not in self.crashed]

    def resolves(self, name: str, nodes: Iterable[str] | None = None) -> set[str | None]:
        """The entry ids that ``name`` resolves to on ``nodes`` (None: nothing)."""
        out: set[str | None] = set()
        for n in nodes or self.live():
            entry = self.regs[n].lookup(name)
            out.add(None if entry is None else entry.entry_id)
        return out

    def documents(self, node: str) -> dict[str, tuple[int, bytes]]:
        return {r.name: (r.epoch, r.sv) for r in self.cores[node].store}

    def identical(self, nodes: Iterable[str] | None = None) -> bool:
        nodes = list(nodes or self.live())
        first = self.documents(nodes[0])
        return all(self.documents(n) == first for n in nodes[1:])

    def write_state(self, node: str, doc: str, ops: list[dict[str, Any]]) -> None:
        core = self.cores[node]
        replica = core.store.get(doc)
        current = (
            values.to_plain(replica.doc.get(values.ROOT, type=Map), marked=True)
            if replica is not None
            else {}
        )
        checked = values.parse_ops(ops)
        values.dry_run(current, checked)
        core.write(self.now, doc, lambda d: values.apply_ops(d, checked))
        self._collect()


def converged_cluster(seed: int = 1) -> Cluster:
    cluster = Cluster(seed=seed)
    cluster.run_until(cluster.identical, limit=30.0)
    return cluster


def test_a_registration_reaches_every_one_of_200_nodes() -> None:
    c = converged_cluster()
    assert len(c.documents("n000")) == N  # every node's registry document, everywhere
    entry, _ = c.regs["n042"].register(c.now, "alpha", kind="worker", capabilities=["gpu"])
    c._collect()
    took = c.run_until(lambda: c.resolves("alpha") == {entry.entry_id}, limit=5.0, step=0.01)
    # Pushes (fan-out ⌈ln n⌉ + 3, three hops) carry it; anti-entropy runs once a second.
    assert took < 1.0, took
    for node in c.names:
        assert c.regs[node].entries(capability="gpu") == [entry]
        assert [e.kind for e in c.events[node] if e.name == "alpha"] == ["registered"]


def test_a_partition_with_writes_on_both_sides_heals_to_identical_state() -> None:
    c = converged_cluster(seed=2)
    side = c.names[:80]
    other = c.partition(side)
    a_entries = [c.regs[n].register(c.now, f"a-{n}")[0] for n in side[:20]]
    b_entries = [c.regs[n].register(c.now, f"b-{n}")[0] for n in other[:20]]
    c.write_state(side[0], "state/shared", [{"op": "set", "path": ["left"], "value": 1}])
    c.write_state(other[0], "state/shared", [{"op": "set", "path": ["right"], "value": 2}])
    c.write_state(side[1], "state/shared", [{"op": "incr", "path": ["hits"], "by": 3}])
    c.write_state(other[1], "state/shared", [{"op": "incr", "path": ["hits"], "by": 4}])
    c.run(5.0)
    # Each side works on its own: its registrations resolve there, the other side's do not.
    assert c.resolves(a_entries[0].name, side) == {a_entries[0].entry_id}
    assert c.resolves(a_entries[0].name, other) == {None}
    assert c.identical(side) and c.identical(other) and not c.identical()
    c.heal(side, other)
    c.run_until(c.identical, limit=30.0)
    for entry in a_entries + b_entries:
        assert c.resolves(entry.name) == {entry.entry_id}
    for n in c.names:
        replica = c.cores[n].store.get("state/shared")
        assert replica is not None
        assert values.read(replica.doc) == {"left": 1, "right": 2, "hits": 7}, n


def test_a_duplicate_name_is_resolved_the_same_everywhere_and_the_loser_told_once() -> None:
    c = converged_cluster(seed=3)
    side = c.names[:100]
    other = c.partition(side)
    first, _ = c.regs[side[7]].register(c.now, "leader")
    c.run(0.5)  # later wall clock on the other side: the first registration wins
    second, _ = c.regs[other[9]].register(c.now, "leader")
    c.run(3.0)
    assert c.resolves("leader", side) == {first.entry_id}
    assert c.resolves("leader", other) == {second.entry_id}
    for events in c.events.values():
        events.clear()
    c.heal(side, other)
    c.run_until(lambda: c.resolves("leader") == {first.entry_id} and c.identical(), limit=30.0)
    c.run(5.0)  # churn after the heal reports nothing twice
    for node in c.names:
        conflicts = [e for e in c.events[node] if e.kind == "conflict"]
        assert conflicts == [RegistryEvent("conflict", "leader", second, winner=first)], node
    assert c.regs[other[9]].holds("leader") is None  # the loser's node removed its entry


def test_the_entries_of_a_crashed_node_vanish_from_every_lookup_at_once() -> None:
    c = converged_cluster(seed=4)
    victim = "n123"
    entries = [c.regs[victim].register(c.now, f"v-{i}")[0] for i in range(5)]
    c.run(2.0)
    assert all(c.resolves(e.name) == {e.entry_id} for e in entries)
    c.crashed.add(victim)
    c.declare_down(c.live(), [victim])  # the failure detector's verdict reaches everyone
    for e in entries:
        assert c.resolves(e.name) == {None}  # no network round needed: at once
    for node in c.live():
        assert {ev.name for ev in c.events[node] if ev.kind == "unregistered"} >= {
            e.name for e in entries
        }
