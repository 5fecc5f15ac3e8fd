"""Anti-entropy at scale in virtual time: what a round costs, and convergence through churn
and partitions.

Every node is the real :class:`Replicator`; messages cross the real wire format with random
latency (1-5 ms), partitions drop them, a crashed node is gone and comes back empty (a fresh
disk). Pushes are the fast path's business; here many of them are lost on purpose, so
anti-entropy has to repair. Seeded: every run is the same.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable

import pytest
from pycrdt import Map

from meshd.replication import messages
from meshd.replication.core import ReplicationTuning, Replicator, Send
from meshd.replication.messages import ListRange, Nodes, Page, Push, Sync, Tree, Updates

ROUND_KINDS = (Tree, Nodes, ListRange, Page, Sync, Updates)
TUNING = ReplicationTuning(anti_entropy_interval=1.0, page_docs=200)


class Sim:
    def __init__(self, names: list[str], seed: int, tuning: ReplicationTuning = TUNING) -> None:
        self.rng = random.Random(seed)
        self.tuning = tuning
        self.now = 0.0
        self.nodes: dict[str, Replicator] = {}
        self.cut: set[frozenset[str]] = set()
        self.push_loss = 0.0
        self.round_bytes = 0
        self._queue: list[tuple[float, int, str, str, bytes]] = []
        self._seq = 0
        for name in names:
            self.boot(name)
        self.connect()

    def boot(self, name: str) -> Replicator:
        core = Replicator(
            node=name,
            tuning=self.tuning,
            rng=random.Random(f"{name}/{self.rng.random()}"),
            now=self.now,
        )
        self.nodes[name] = core
        return core

    def connect(self) -> None:
        for name, core in self.nodes.items():
            core.set_peers(
                p for p in self.nodes if p != name and frozenset((name, p)) not in self.cut
            )
        self.collect()

    def crash(self, name: str) -> None:
        del self.nodes[name]
        self.connect()

    def partition(self, side: list[str]) -> None:
        other = [n for n in self.nodes if n not in side]
        self.cut = {frozenset((a, b)) for a in side for b in other}
        self.connect()

    def heal(self) -> None:
        self.cut = set()
        self.connect()
        for _name, core in self.nodes.items():  # membership's "alive again"
            for peer in core.peers[:1]:
                core.request_sync(self.now, peer)
        self.collect()

    def collect(self) -> None:
        for name, core in list(self.nodes.items()):
            for out in core.take_outputs():
                if not isinstance(out, Send):
                    continue
                if isinstance(out.message, Push) and self.rng.random() < self.push_loss:
                    continue
                frame = messages.encode(out.message)
                if isinstance(out.message, ROUND_KINDS):
                    self.round_bytes += len(frame)
                self._seq += 1
                latency = 0.001 + 0.004 * self.rng.random()
                heapq.heappush(self._queue, (self.now + latency, self._seq, name, out.peer, frame))

    def run(self, duration: float, until: Callable[[], bool] | None = None) -> None:
        end = self.now + duration
        while self.now < end:
            if until is not None and until():
                return
            nxt = min([c.next_deadline() for c in self.nodes.values()] + [end])
            if self._queue and self._queue[0][0] <= nxt:
                at, _, src, dst, frame = heapq.heappop(self._queue)
                self.now = max(self.now, at)
                core = self.nodes.get(dst)
                if core is None or frozenset((src, dst)) in self.cut:
                    continue
                core.handle(self.now, src, messages.decode(frame))
                while core.pending_work():
                    core.work(self.now)
            else:
                self.now = nxt
                for core in list(self.nodes.values()):
                    core.tick(self.now)
            self.collect()
        self.now = end

    def write(self, name: str, doc: str, value: object) -> None:
        self.nodes[name].write(
            self.now, doc, lambda d: d.get("root", type=Map).update({"v": value})
        )
        self.collect()

    def converged(self) -> bool:
        digests = {c.store.digest() for c in self.nodes.values()}
        counts = {len(c.store) for c in self.nodes.values()}
        return len(digests) == 1 and len(counts) == 1


def loaded(names: list[str], docs: int, seed: int) -> Sim:
    """``docs`` documents written on the first node and installed everywhere (as read back
    from disk), so the test starts in agreement without replaying the writes."""
    sim = Sim(names, seed)
    first = sim.nodes[names[0]]
    for i in range(docs):
        first.write(0.0, f"state/d{i:05d}", lambda d, i=i: d.get("root", type=Map).update({"v": i}))
    first.take_outputs()
    for name in names[1:]:
        core = sim.nodes[name]
        for replica in first.store:
            core.load(replica.name, replica.epoch, [replica.full_update()])
        core.take_outputs()
    assert sim.converged()
    return sim


def one_round(sim: Sim, initiator: str, responder: str) -> int:
    before = sim.round_bytes
    sim.nodes[initiator].sync_with(sim.now, responder)
    sim.collect()
    sim.run(0.5)
    return sim.round_bytes - before


def quiet(sim: Sim) -> None:
    """No periodic rounds: the test starts them."""
    for core in sim.nodes.values():
        core._timers = type(core._timers)()


def test_a_round_between_nodes_in_agreement_costs_the_same_whatever_the_number_of_documents() -> (
    None
):
    costs = {}
    for docs in (10, 1_000, 10_000):
        sim = loaded(["a", "b"], docs, seed=docs)
        quiet(sim)
        costs[docs] = one_round(sim, "a", "b")
    # 16 level-1 nodes and an empty answer: only the CBOR width of the counts varies (a
    # count below 2^32 takes at most 5 bytes), so no number of documents costs more.
    assert all(cost <= 16 * (1 + 2 + 1 + 9 + 5) + 16 for cost in costs.values()), costs
    assert costs[10_000] == costs[1_000] + 16, costs  # counts of 256 and more take a byte more


@pytest.mark.parametrize("docs", [2_000, 10_000])
def test_repair_bytes_follow_the_differences_not_the_documents(docs: int) -> None:
    sim = loaded(["a", "b"], docs, seed=7)
    quiet(sim)
    sim.push_loss = 1.0
    per_difference = {}
    rng = random.Random(3)
    for differences in (1, 10, 100):
        for i in rng.sample(range(docs), differences):
            sim.write("a", f"state/d{i:05d}", f"changed {differences}")
        sim.run(0.1)  # pushes lost
        cost = one_round(sim, "b", "a")
        assert sim.converged()
        per_difference[differences] = cost / differences
    # Each difference costs the tree descent (≤ 4 levels × 16 nodes) and its update; never
    # a share of the documents that agree.
    assert all(c < 2_500 for c in per_difference.values()), per_difference
    assert per_difference[100] <= per_difference[1], per_difference


def test_churn_and_partitions_converge_by_anti_entropy() -> None:
    names = [f"n{i:02d}" for i in range(16)]
    sim = loaded(names, 1_000, seed=11)
    sim.push_loss = 0.5
    rng = random.Random(5)

    def writes(count: int) -> None:
        for _ in range(count):
            writer = rng.choice(sorted(sim.nodes))
            sim.write(writer, f"state/d{rng.randrange(1_200):05d}", rng.random())

    writes(200)
    sim.run(5.0)
    sim.partition(names[:6])
    writes(300)
    sim.run(5.0)
    sim.crash("n03")
    sim.crash("n12")
    writes(100)
    sim.run(3.0)
    sim.heal()
    for name in ("n03", "n12"):  # back with an empty disk
        sim.boot(name)
    sim.connect()
    writes(100)
    sim.run(3.0)
    sim.push_loss = 0.0
    start, before = sim.now, sim.round_bytes
    sim.run(60.0, until=sim.converged)
    assert sim.converged(), "did not converge"
    assert len(next(iter(sim.nodes.values())).store) >= 1_000
    took = sim.now - start
    assert took < 30.0, took
    # Once converged, rounds are idle: a few hundred bytes each.
    idle_before = sim.round_bytes
    sim.run(10.0)
    rounds = sum(c.stats.rounds_completed for c in sim.nodes.values())
    assert rounds > 0
    idle = sim.round_bytes - idle_before
    assert idle / (16 * 10) < 1_000, idle  # per node per second, about one round each
    del before
