"""Placement in the deterministic simulation: real membership cores on a simulated network,
one real :class:`~meshd.placement.service.Placement` per node fed by its own core's view.

Only what lies outside placement is replaced: the registry by a recorder of which node runs
which agent, and the runner round trip (activate / deactivate) by updating that record. The
failure detector, the quorum decisions, the owner computation and the failover timing are
the real ones, in virtual time.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

from meshd.config.model import PlacementTuning
from meshd.config.profiles import profile_tuning
from meshd.membership.events import EventKind, MemberEvent
from meshd.placement import rendezvous
from meshd.placement.kinds import KindInfo, Strategy
from meshd.placement.service import Placement
from meshd.registry.model import Entry
from meshd.sim import SimNetwork, SimNode
from meshd.wire.membership import Status
from meshd_client.protocol import errors

LAN = profile_tuning("lan")
SA = 10.0  # stable_after for these runs
KIND = "single"


def entry(name: str, node: str) -> Entry:
    return Entry(name, node, KIND, (), {}, 0, f"{node}/{name}")


@dataclass
class World:
    """Who runs what, as each node's placement made it so."""

    running: dict[str, set[str]] = field(default_factory=dict)  # node -> agents it runs
    last_host: dict[str, str] = field(default_factory=dict)  # agent -> last node that ran it
    starts: list[tuple[float, str, str]] = field(default_factory=list)


@dataclass
class RegistryView:
    """The registry as ``node`` sees it: agents run by nodes its membership calls up."""

    node: str
    world: World
    core: Any
    listeners: list[Any] = field(default_factory=list)

    def _up(self, host: str) -> bool:
        state = self.core.peek(host)
        return host == self.node or (
            state is not None and state[0] in (Status.ALIVE, Status.SUSPECT)
        )

    def lookup(self, name: str) -> Entry | None:
        for host, names in self.world.running.items():
            if name in names and self._up(host):
                return entry(name, host)
        return None

    def holds(self, name: str) -> Entry | None:
        return entry(name, self.node) if name in self.world.running.get(self.node, ()) else None

    def names_on(self, host: str) -> list[str]:
        return sorted(n for n, h in self.world.last_host.items() if h == host)

    def last_known(self, name: str) -> Entry | None:
        host = self.world.last_host.get(name)
        return entry(name, host) if host is not None else None

    def entries(self, *, node: str | None = None, **_: Any) -> list[Entry]:
        return [entry(n, self.node) for n in sorted(self.world.running.get(self.node, ()))]


@dataclass
class RouterStub:
    node: str
    world: World
    placements: dict[str, Placement] = field(default_factory=dict)

    async def activate_remote(self, host: str, name: str, kind: str, deadline: float) -> Entry:
        # As the real router's activation handler: a host without a majority refuses.
        target = self.placements[host]
        if not target.may_run(kind):
            raise errors.Unreachable(f"{name!r}: {host} is in a minority")
        return await target.activate_local(name, kind, deadline)

    def deactivate(self, name: str, _reason: str) -> bool:
        names = self.world.running.get(self.node, set())
        if name in names:
            names.discard(name)
            return True
        return False


class ReplicatorStub:
    """State documents are not simulated here: syncing one before a move is a no-op."""

    def sync_with(self, _now: float, _peer: str) -> None:
        return None


def make_placement(
    sim: SimNode, world: World, hosts: Iterable[str], clock: Callable[[], float]
) -> Placement:
    placement = Placement(
        node=sim.name,
        membership=sim.core,
        registry=RegistryView(sim.name, world, sim.core),  # type: ignore[arg-type]
        docs=ReplicatorStub(),  # type: ignore[arg-type]
        host=RouterStub(sim.name, world),
        tuning=PlacementTuning(stable_after=SA),
        log=logging.getLogger("test.placement"),
        clock=clock,  # the membership cores' clock (their ack times), not trio's
    )
    for host in hosts:
        placement.table.set_host(host, {KIND: KindInfo(100, 0, Strategy.KEEP_MAJORITY)})

    async def activate_local(name: str, _kind: str, _deadline: float) -> Entry:
        world.running.setdefault(sim.name, set()).add(name)
        world.last_host[name] = sim.name
        world.starts.append((trio.current_time(), sim.name, name))
        return entry(name, sim.name)

    placement.activate_local = activate_local  # type: ignore[method-assign]
    return placement


async def cluster(n: int, seed: int) -> SimNetwork:
    net = SimNetwork(seed=seed)
    net.add_node("n0", LAN)
    for i in range(1, n):
        net.add_node(f"n{i}", LAN, seeds=["n0"])
    assert await net.run_until(60.0, stop=net.converged, check_every=0.5)
    return net


class Harness:
    """Runs every node's placement tick and failover reactions alongside the network."""

    def __init__(self, net: SimNetwork, names: list[str], nursery: trio.Nursery) -> None:
        self.net = net
        self.world = World()
        self.placements = {
            name: make_placement(net.nodes[name], self.world, net.nodes, lambda: net.now)
            for name in net.nodes
        }
        for p in self.placements.values():
            p._nursery = nursery
            p.host.placements = self.placements  # type: ignore[attr-defined]
        self._unplaced = list(names)
        self.hold: set[str] = set()  # nodes whose placement does not tick for now
        net.listeners.append(self._on_event)
        nursery.start_soon(self._ticker)

    def _place(self) -> None:
        """Place the agents where their owner is, once every node holds its lease (as a
        runner's activation would wait for: an agent starts only under a lease)."""
        now = self.net.now
        if not self._unplaced or not all(p.lease.check(now) for p in self.placements.values()):
            return
        for name in self._unplaced:
            owner = rendezvous.owner(name, dict.fromkeys(self.net.nodes, 100.0))
            assert owner is not None
            self.world.running.setdefault(owner, set()).add(name)
            self.world.last_host[name] = owner
        self._unplaced = []

    def _on_event(self, node: SimNode, event: MemberEvent) -> None:
        if event.kind in (EventKind.DEAD, EventKind.LEAVE) and node.state == "up":
            self.placements[node.name].host_down(event.member.name)

    async def _ticker(self) -> None:
        while True:
            for name, p in self.placements.items():
                if self.net.nodes[name].state == "up" and name not in self.hold:
                    p._tick(self.net.now)
            self._place()
            await trio.sleep(0.1)

    def runners_of(self, name: str, among: Iterable[str] | None = None) -> set[str]:
        nodes = set(among) if among is not None else set(self.net.nodes)
        return {n for n, names in self.world.running.items() if name in names and n in nodes}

    async def run(self, seconds: float, every: float = 0.1, check: Any = None) -> None:
        end = self.net.now + seconds
        while self.net.now < end:
            await self.net.run_for(every)
            if check is not None:
                check()


async def test_placement_agrees_on_every_node(autojump_clock: trio.testing.MockClock) -> None:
    net = await cluster(8, seed=3)
    async with trio.open_nursery() as nursery:
        h = Harness(net, [], nursery)
        names = [f"{KIND}/{i}" for i in range(300)]
        owners = {n: {p.owner(KIND, n) for p in h.placements.values()} for n in names}
        assert all(len(o) == 1 for o in owners.values())
        assert len({next(iter(o)) for o in owners.values()}) == 8  # spread over all
        nursery.cancel_scope.cancel()


async def test_a_crashed_owner_fails_over_to_exactly_one_survivor(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = await cluster(6, seed=5)
    names = [f"{KIND}/{i}" for i in range(40)]
    async with trio.open_nursery() as nursery:
        h = Harness(net, names, nursery)
        await h.run(SA + 1)  # every quorum settles
        victim = next(n for n in net.nodes if h.world.running.get(n))
        lost = sorted(h.world.running[victim])
        crashed_at = net.now
        net.crash(victim)  # silent: a host gone, no refusal evidence

        def at_most_one() -> None:
            alive = [n for n in net.nodes if n != victim]
            for name in names:
                assert len(h.runners_of(name, alive)) <= 1, (name, h.runners_of(name))

        await h.run(40.0, check=at_most_one)
        survivors = [n for n in net.nodes if n != victim]
        for name in lost:
            [runner] = h.runners_of(name, survivors)
            owners = {h.placements[s].owner(KIND, name) for s in survivors}
            assert owners == {runner}  # the one every survivor computes
        # Silence is not proof: nobody took over before the victim's lease had run out and
        # the margin passed (every survivor saw it alive until the crash, or later).
        tuning = h.placements[victim].tuning
        first_start = min(t for t, _, n in h.world.starts if n in lost)
        assert first_start - crashed_at >= tuning.lease + tuning.lease_margin
        nursery.cancel_scope.cancel()


async def test_the_agents_of_a_host_that_left_fail_over_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = await cluster(6, seed=7)
    names = [f"{KIND}/{i}" for i in range(40)]
    async with trio.open_nursery() as nursery:
        h = Harness(net, names, nursery)
        await h.run(SA + 1)
        leaver = next(n for n in net.nodes if h.world.running.get(n))
        moved = sorted(h.world.running[leaver])
        left_at = net.now
        net.leave(leaver)  # graceful: it stops its agents and announces the leave
        h.world.running[leaver] = set()
        await h.run(SA / 2)
        survivors = [n for n in net.nodes if n != leaver]
        for name in moved:
            [runner] = h.runners_of(name, survivors)
            assert {h.placements[s].owner(KIND, name) for s in survivors} == {runner}
        # A leave is proof that nothing runs there any more: no stable_after wait.
        assert max(t for t, _, n in h.world.starts if n in moved) < left_at + SA / 2
        nursery.cancel_scope.cancel()


def _never_on_both_sides(h: Harness, names: list[str], small: list[str], big: list[str]) -> None:
    for name in names:
        both = h.runners_of(name, small) and h.runners_of(name, big)
        assert not both, (h.net.now, name, h.runners_of(name))


async def test_keep_majority_never_runs_a_singleton_on_both_sides_of_a_partition(
    autojump_clock: trio.testing.MockClock,
) -> None:
    for seed in (7, 8, 9):
        net = await cluster(5, seed=seed)
        names = [f"{KIND}/{i}" for i in range(60)]
        async with trio.open_nursery() as nursery:
            h = Harness(net, names, nursery)
            await h.run(SA + 1)
            nodes = sorted(net.nodes)
            small, big = nodes[:2], nodes[2:]
            net.partition(small, big)

            never_both = functools.partial(_never_on_both_sides, h, names, small, big)
            await h.run(60.0, check=never_both)
            # The majority side runs every agent, the minority none.
            for name in names:
                assert h.runners_of(name, big), (seed, name)
                assert not h.runners_of(name, small), (seed, name)
            net.heal()
            await h.run(60.0, check=never_both)
            for name in names:
                assert len(h.runners_of(name)) == 1, (seed, name, h.runners_of(name))
            # Once membership settled, each agent went back to the host every node agrees owns it.
            await h.run(2 * SA)
            for name in names:
                owners = {p.owner(KIND, name) for p in h.placements.values()}
                assert len(owners) == 1 and h.runners_of(name) == owners, (seed, name)
            nursery.cancel_scope.cancel()


async def test_after_an_even_split_heals_every_agent_runs_again_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = await cluster(4, seed=21)
    names = [f"{KIND}/{i}" for i in range(40)]
    async with trio.open_nursery() as nursery:
        h = Harness(net, names, nursery)
        await h.run(SA + 1)
        nodes = sorted(net.nodes)
        net.partition(nodes[:2], nodes[2:])
        await h.run(60.0)
        assert not any(h.runners_of(name) for name in names)  # 2|2: no majority anywhere
        net.heal()
        await h.run(3 * SA)
        for name in names:
            owners = {p.owner(KIND, name) for p in h.placements.values()}
            assert len(owners) == 1 and h.runners_of(name) == owners, name
        nursery.cancel_scope.cancel()


async def test_a_join_moves_only_agents_whose_owner_changed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = await cluster(5, seed=11)
    async with trio.open_nursery() as nursery:
        h = Harness(net, [], nursery)
        names = [f"{KIND}/{i}" for i in range(2000)]
        before = {n: h.placements["n0"].owner(KIND, n) for n in names}
        net.add_node("n5", LAN, seeds=["n0"])
        assert await net.run_until(net.now + 30.0, stop=net.converged, check_every=0.5)
        for p in h.placements.values():
            p.table.set_host("n5", {KIND: KindInfo(100, 0, Strategy.KEEP_MAJORITY)})
        newcomer = make_placement(net.nodes["n5"], h.world, net.nodes, lambda: net.now)
        views = [*h.placements.values(), newcomer]
        after = {n: {p.owner(KIND, n) for p in views} for n in names}
        assert all(len(o) == 1 for o in after.values())  # everyone agrees, newcomer too
        moved = [n for n in names if next(iter(after[n])) != before[n]]
        assert all(next(iter(after[n])) == "n5" for n in moved)  # only to the newcomer
        assert 0.10 < len(moved) / len(names) < 0.24  # ≈ 1/6
        nursery.cancel_scope.cancel()


def _active(h: Harness, name: str) -> set[str]:
    """The nodes where ``name`` would take a message now: running there, on a node that is up
    (not crashed nor paused), and passed by that node's delivery gate (the lease)."""
    return {
        n
        for n, names in h.world.running.items()
        if name in names
        and h.net.nodes[n].state == "up"
        and h.placements[n].serving(entry(name, n)) is None
    }


def _at_most_one_active(h: Harness, names: list[str]) -> None:
    for name in names:
        active = _active(h, name)
        assert len(active) <= 1, (h.net.now, name, active)


async def _settled(
    seed: int, nursery: trio.Nursery
) -> tuple[Harness, list[str], str, list[str], list[str]]:
    """Five nodes running 60 keep_majority agents, settled; a victim that runs some: the
    harness, the agents, the victim, its agents and the other nodes."""
    net = await cluster(5, seed=seed)
    names = [f"{KIND}/{i}" for i in range(60)]
    h = Harness(net, names, nursery)
    await h.run(SA + 1)
    victim = next(n for n in sorted(net.nodes) if h.world.running.get(n))
    others = [n for n in net.nodes if n != victim]
    return h, names, victim, sorted(h.world.running[victim]), others


async def test_an_isolated_host_stops_its_agents_by_its_lease_before_the_majority_takes_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Every packet of one host dropped (silence, the host still running): its lease runs
    out, it stops its keep_majority agents, and the majority starts them elsewhere only after
    that; at no check does an agent take messages on two hosts."""
    for seed in (31, 32, 33):
        async with trio.open_nursery() as nursery:
            h, names, victim, lost, others = await _settled(seed, nursery)
            net = h.net
            net.partition([victim], others)
            await h.run(40.0, check=functools.partial(_at_most_one_active, h, names))
            assert h.placements[victim].stats.lease_lapses >= 1, seed
            assert not h.world.running.get(victim), seed  # it stopped them itself
            for name in lost:
                assert len(h.runners_of(name, others)) == 1, (seed, name)
            net.heal()
            await h.run(3 * SA, check=functools.partial(_at_most_one_active, h, names))
            for name in names:
                assert len(h.runners_of(name)) == 1, (seed, name, h.runners_of(name))
            nursery.cancel_scope.cancel()


async def test_a_host_paused_past_its_lease_checks_it_before_it_serves_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """SIGSTOP for longer than the lease: the majority takes the agents over meanwhile. On
    waking the host reads the acks that came in and pings again, but the first check of its
    lease (a tick, or a delivery) finds it lapsed and stops the agents, whatever fresh acks
    arrived; it serves none of them in between."""
    for seed in (41, 42):
        async with trio.open_nursery() as nursery:
            h, names, victim, lost, others = await _settled(seed, nursery)
            net = h.net
            net.pause(victim)
            check = functools.partial(_at_most_one_active, h, names)
            await h.run(15.0, check=check)
            for name in lost:  # taken over while it slept; still listed on the sleeper
                assert len(h.runners_of(name, others)) == 1, (seed, name)
                assert victim in h.runners_of(name), (seed, name)
            # The worst order on waking: the packets first (the acks that came meanwhile,
            # then fresh acks for the pings sent on waking), placement's first tick after.
            h.hold.add(victim)
            woke = net.now
            net.resume(victim)
            await h.run(0.05)
            fresh = h.placements[victim].membership.acked_at()
            assert sum(t >= woke for t in fresh.values()) >= 2, seed  # a majority answered
            h.hold.clear()
            check()  # the first look at the lease (a delivery's) finds it lapsed
            await h.run(3 * SA, check=check)
            assert h.placements[victim].stats.lease_lapses >= 1, seed
            for name in names:
                assert len(h.runners_of(name)) == 1, (seed, name, h.runners_of(name))
            nursery.cancel_scope.cancel()
