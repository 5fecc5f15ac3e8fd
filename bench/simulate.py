"""Membership at scale in the simulator: dissemination, failure detection, false positives.

    python -m bench.simulate --nodes 1000 --json [--seed S] [--profile lan]
                             [--loss P --duration S]

Real :class:`~meshd.membership.core.Membership` cores on :class:`~meshd.sim.SimNetwork`, in
virtual time (``trio.testing.MockClock`` with autojump), so every figure below is in *virtual*
seconds and the same seed always gives the same numbers.

Building the converged cluster: every node joins through one seed (``n0``) at t=0, as a real
cluster bootstrapped from one seed address does, and the run goes on until every node sees all
N alive. Joining in waves (doubling waves, each seeded from random members of the converged
part) was tried and is not faster (51 s against 47 s real at 1,000 nodes): whichever way, each
of the N nodes has to apply the other N − 1 Alive messages, and that O(N²) work dominates.

Then, with ``--loss P`` switched on for every link:

1. soak: ``--duration`` virtual seconds of normal operation;
2. ``disseminate_999_s``: a NEW node joins with one push-pull to one random member; time until
   99.9 % of the existing nodes have it as ALIVE (``disseminate_all_s``: until all of them);
3. ``detect_all_s``: a random existing node crashes silently (no TCP reset); time until every
   survivor has it DEAD.

``false_positives`` counts (observer, member) DEAD verdicts issued about a member whose node
was running at that moment, over all three phases.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import trio
import trio.testing

from meshd.config import PROFILES, profile_tuning
from meshd.membership.events import EventKind, MemberEvent
from meshd.membership.suspicion import suspicion_bounds
from meshd.sim import SimNetwork, SimNode

CONVERGE_LIMIT = 300.0  # virtual seconds allowed for the initial join
DISSEMINATE_LIMIT = 120.0
DETECT_LIMIT = 600.0
CHECK_EVERY = 0.01  # resolution of the measured times (checks are O(1))
NEWCOMER = "newcomer"


@dataclass
class Result:
    """One run; ``None`` for a measurement whose condition never held within its limit."""

    nodes: int
    seed: int
    profile: str
    loss: float
    duration: float
    converge_s: float | None = None
    disseminate_999_s: float | None = None
    disseminate_all_s: float | None = None
    detect_all_s: float | None = None
    false_positives: int = 0
    min_suspicion_s: float = 0.0
    suspicions: int = 0
    refutations: int = 0
    packets_delivered: int = 0
    packets_dropped: int = 0
    build_real_seconds: float = 0.0
    real_seconds: float = 0.0


@dataclass
class Watch:
    """Membership events folded into O(1) answers: who sees whom alive, who declared whom
    dead, and how many DEAD verdicts hit a member that was running."""

    net: SimNetwork
    alive_in: dict[str, set[str]] = field(default_factory=dict)  # member -> observers
    dead_in: dict[str, set[str]] = field(default_factory=dict)
    false_positives: list[tuple[float, str, str]] = field(default_factory=list)

    def __call__(self, node: SimNode, event: MemberEvent) -> None:
        member = event.member.name
        alive = self.alive_in.setdefault(member, set())
        if event.kind in (EventKind.JOIN, EventKind.ALIVE):
            alive.add(node.name)
        elif event.kind in (EventKind.SUSPECT, EventKind.DEAD, EventKind.LEAVE):
            alive.discard(node.name)
        if event.kind is EventKind.DEAD:
            self.dead_in.setdefault(member, set()).add(node.name)
            if self.net.nodes[member].state == "up":
                self.false_positives.append((event.at, node.name, member))

    def alive_count(self, member: str, observers: set[str]) -> int:
        return len(self.alive_in.get(member, set()) & observers)


async def measure(net: SimNetwork, condition: Callable[[], bool], limit: float) -> float | None:
    """Virtual seconds until ``condition`` holds, or None if it does not within ``limit``."""
    start = net.now
    if await net.run_until(start + limit, stop=condition, check_every=CHECK_EVERY):
        return round(net.now - start, 3)
    return None


async def build_cluster(net: SimNetwork, n: int, profile: str) -> float | None:
    """All nodes join through n0 at t=0; virtual seconds until everyone sees all n alive."""
    tuning = profile_tuning(profile)
    net.add_node("n0", tuning)
    for i in range(1, n):
        net.add_node(f"n{i}", tuning, seeds=["n0"])
    if await net.run_until(CONVERGE_LIMIT, stop=net.converged, check_every=0.1):
        return round(net.now, 3)
    return None


async def run(args: argparse.Namespace) -> Result:
    t0 = time.perf_counter()
    tuning = profile_tuning(args.profile)
    result = Result(args.nodes, args.seed, args.profile, args.loss, args.duration)
    result.min_suspicion_s = round(
        suspicion_bounds(
            tuning.suspicion_mult,
            tuning.suspicion_max_timeout_mult,
            args.nodes,
            tuning.probe_interval,
        )[0],
        3,
    )
    net = SimNetwork(args.seed)
    choose = random.Random(f"bench:{args.seed}")  # the bench's own picks, apart from the net's
    result.converge_s = await build_cluster(net, args.nodes, args.profile)
    result.build_real_seconds = round(time.perf_counter() - t0, 2)
    if result.converge_s is not None:
        watch = Watch(net)
        net.listeners.append(watch)
        net.loss = args.loss
        await net.run_for(args.duration)
        existing = set(net.nodes)
        await disseminate(net, watch, existing, choose, result)
        victim = choose.choice(sorted(existing))
        net.crash(victim)
        survivors = {n.name for n in net.up_nodes()}
        result.detect_all_s = await measure(
            net,
            lambda: len(watch.dead_in.get(victim, set()) & survivors) == len(survivors),
            DETECT_LIMIT,
        )
        result.false_positives = len(watch.false_positives)
    cores = [node.core for node in net.nodes.values()]
    result.suspicions = sum(c.stats.suspicions for c in cores)
    result.refutations = sum(c.stats.refutations for c in cores)
    result.packets_delivered = net.delivered
    result.packets_dropped = net.dropped
    result.real_seconds = round(time.perf_counter() - t0, 2)
    return result


async def disseminate(
    net: SimNetwork,
    watch: Watch,
    existing: set[str],
    choose: random.Random,
    result: Result,
) -> None:
    """A new node joins through one random member; fills the two dissemination times."""
    contact = choose.choice(sorted(existing))
    net.add_node(NEWCOMER, profile_tuning(result.profile), seeds=[contact])
    start = net.now
    quorum = math.ceil(0.999 * len(existing))
    result.disseminate_999_s = await measure(
        net, lambda: watch.alive_count(NEWCOMER, existing) >= quorum, DISSEMINATE_LIMIT
    )
    if result.disseminate_999_s is not None:
        left = DISSEMINATE_LIMIT - (net.now - start)
        rest = await measure(
            net, lambda: watch.alive_count(NEWCOMER, existing) == len(existing), left
        )
        if rest is not None:
            result.disseminate_all_s = round(net.now - start, 3)


def summary(r: Result) -> str:
    def s(v: float | None) -> str:
        return "not reached" if v is None else f"{v:.2f} s"

    return "\n".join(
        [
            f"{r.nodes} nodes, profile {r.profile}, seed {r.seed}, "
            f"loss {r.loss:.1%} for {r.duration:g} s (virtual times)",
            f"  converged after join        {s(r.converge_s)}",
            f"  new node at 99.9 % / 100 %  {s(r.disseminate_999_s)} / {s(r.disseminate_all_s)}",
            f"  crash detected by all       {s(r.detect_all_s)}"
            f"  (min suspicion timeout {r.min_suspicion_s:.2f} s)",
            f"  false positives             {r.false_positives}",
            f"  suspicions / refutations    {r.suspicions} / {r.refutations}",
            f"  packets delivered / dropped {r.packets_delivered} / {r.packets_dropped}",
            f"  real time                   {r.real_seconds:.1f} s "
            f"(building the cluster {r.build_real_seconds:.1f} s)",
        ]
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.simulate", description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--profile", choices=sorted(PROFILES), default="lan")
    p.add_argument("--loss", type=float, default=0.0, help="loss probability on every link")
    p.add_argument("--duration", type=float, default=30.0, help="virtual seconds of soak")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.nodes < 3:
        p.error("--nodes must be at least 3")
    if not 0.0 <= args.loss < 1.0:
        p.error("--loss must be in [0, 1)")
    if args.duration < 0:
        p.error("--duration must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = trio.run(run, args, clock=trio.testing.MockClock(autojump_threshold=0))
    print(json.dumps(asdict(result)) if args.json else summary(result))
    complete = None not in (result.converge_s, result.disseminate_999_s, result.detect_all_s)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
