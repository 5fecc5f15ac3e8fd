"""Membership at scale in the simulator: dissemination, failure detection, false positives.

    python -m bench.simulate --nodes 1000 --json [--seed S] [--profile lan]
                             [--loss P --duration S] [--detector]

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

``--detector`` adds the failure detector's own figures (``detector``), the ones the real
benchmarks (``bench.membership``, ``bench.failover``) report beside theirs:

* ``detect``: for N = 5 and 16, the median (and 90th percentile) over ``--detector-seeds``
  seeded clusters of the virtual time until every survivor has a node dead, for each way a
  node can fail: ``isolate`` (the host goes silent: no packets, no TCP answer), ``hang``
  (SIGSTOP: packets queue, timers stall, TCP connects but nothing answers) and ``kill9``
  (the process is gone, the host refuses connections);
* ``soak``: N = 16 for ``--soak-duration`` virtual seconds under 10 % loss, under a node
  CPU-starved by a SIGSTOP/SIGCONT duty cycle (1 s stopped, 1 s running; and a cgroup-like
  quota, 90 ms stopped of every 100 ms), and under asymmetric one-way loss (four nodes lose
  40 % of what they send, nothing of what they receive): DEAD verdicts (all false, nobody
  fails) and SUSPECT events.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import trio
import trio.testing

from meshd.config import PROFILES, MembershipTuning, profile_tuning
from meshd.membership.events import EventKind, MemberEvent
from meshd.membership.suspicion import detector_bounds
from meshd.sim import SimNetwork, SimNode
from meshd.wire.membership import Status

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


Tune = str | MembershipTuning  # a profile's name, or tuning as it is


def as_tuning(tune: Tune) -> MembershipTuning:
    return profile_tuning(tune) if isinstance(tune, str) else tune


async def build_cluster(net: SimNetwork, n: int, profile: Tune) -> float | None:
    """All nodes join through n0 at t=0; virtual seconds until everyone sees all n alive."""
    tuning = as_tuning(profile)
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
        detector_bounds(
            tuning.suspicion_mult,
            tuning.suspicion_max_timeout_mult,
            tuning.suspicion_min_timeout,
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


# ---------------------------------------------------------------------------- the detector

SIM_FAULTS: dict[str, Callable[[SimNetwork, str], None]] = {
    "isolate": SimNetwork.crash,
    "hang": SimNetwork.pause,
    "kill9": SimNetwork.kill,
}
DETECT_LIMIT_SMALL = 120.0


@dataclass(frozen=True)
class SoakCase:
    """A fault that must cause no death: ``loss`` (every link, fraction), ``starve`` (one
    node paused ``stop`` s of every ``stop + run`` s), ``asym`` (``hosts`` nodes lose a
    fraction ``loss`` of what they send, nothing of what they receive)."""

    kind: str
    loss: float = 0.0
    stop: float = 0.0
    run: float = 0.0
    hosts: int = 0

    def describe(self) -> str:
        if self.kind == "loss":
            return f"{self.loss:.0%} loss on every link"
        if self.kind == "starve":
            return f"one node stopped {self.stop:g} s of every {self.stop + self.run:g} s"
        return f"{self.hosts} nodes lose {self.loss:.0%} of what they send"


SOAK_CASES = {
    "loss": SoakCase("loss", loss=0.10),
    "starve_stop": SoakCase("starve", stop=1.0, run=1.0),
    "starve_quota": SoakCase("starve", stop=0.09, run=0.01),
    "asym": SoakCase("asym", loss=0.40, hosts=4),
}
# Harsher cases for the trade-off curve only: stops as long as the faster minimum itself,
# and heavier loss. Where a setting's false positives start to show.
SWEEP_CASES = {
    "loss": SOAK_CASES["loss"],
    "loss_25": SoakCase("loss", loss=0.25),
    "asym": SOAK_CASES["asym"],
    "starve_stop": SOAK_CASES["starve_stop"],
    "starve_2s": SoakCase("starve", stop=2.0, run=2.0),
    "starve_3s": SoakCase("starve", stop=3.0, run=3.0),
}


async def _converged_cluster(n: int, seed: int, profile: Tune) -> SimNetwork:
    net = SimNetwork(seed)
    if await build_cluster(net, n, profile) is None:
        raise RuntimeError(f"{n} simulated nodes did not converge (seed {seed})")
    # Settle, and fail at a different point of the probe cycle in every seed.
    await net.run_for(10.0 + random.Random(seed).random())
    return net


async def detect_once(n: int, seed: int, fault: str, profile: Tune = "lan") -> float | None:
    """Virtual seconds from the fault of one node until every survivor has it DEAD."""
    net = await _converged_cluster(n, seed, profile)
    victim = random.Random(f"victim:{seed}").choice(sorted(net.nodes)[1:])
    SIM_FAULTS[fault](net, victim)
    survivors = [name for name in net.nodes if name != victim]
    dead = Status.DEAD
    return await measure(
        net,
        lambda: all(net.status_of(o, victim) is dead for o in survivors),
        DETECT_LIMIT_SMALL,
    )


async def soak_once(
    n: int, seed: int, case: SoakCase, duration: float, profile: Tune = "lan"
) -> dict[str, Any]:
    """``duration`` virtual seconds under ``case``; every DEAD verdict is a false positive."""
    net = await _converged_cluster(n, seed, profile)
    names = sorted(net.nodes, key=lambda x: int(x[1:]))
    deaths: list[tuple[float, str, str]] = []
    suspicions = 0

    def listen(node: SimNode, event: MemberEvent) -> None:
        nonlocal suspicions
        if event.kind is EventKind.DEAD:
            deaths.append((round(event.at, 2), node.name, event.member.name))
        elif event.kind is EventKind.SUSPECT:
            suspicions += 1

    net.listeners.append(listen)
    starved = names[1]
    if case.kind == "loss":
        net.loss = case.loss
    elif case.kind == "starve":
        net.starve(starved, stop=case.stop, run=case.run)
    else:
        for src in names[1 : 1 + case.hosts]:
            for dst in names:
                if dst != src:
                    net.set_loss(src, dst, case.loss)
    await net.run_for(duration)
    return {
        "false_positives": len(deaths),
        "suspect_events": suspicions,
        "first_verdicts": deaths[:3],
        "starved": starved if case.kind == "starve" else None,
    }


def _virtual(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    return trio.run(fn, *args, clock=trio.testing.MockClock(autojump_threshold=0))


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    done = sorted(v for v in values if v is not None)
    if not done:
        return {"median_s": None, "p90_s": None, "undetected": len(values)}
    return {
        "median_s": round(statistics.median(done), 3),
        "p90_s": round(done[min(len(done) - 1, int(0.9 * len(done)))], 3),
        "undetected": len(values) - len(done),
    }


def sim_detection(
    n: int, faults: Sequence[str], seeds: int, profile: Tune = "lan"
) -> dict[str, Any]:
    """Median virtual detection time per fault over ``seeds`` seeded clusters of ``n``."""
    out: dict[str, Any] = {"nodes": n, "seeds": seeds}
    if isinstance(profile, str):
        out["profile"] = profile
    for fault in faults:
        times = [_virtual(detect_once, n, s, fault, profile) for s in range(1, seeds + 1)]
        out[fault] = _stats(times)
    return out


def sim_soak(
    n: int, case: SoakCase, duration: float, seeds: int, profile: Tune = "lan"
) -> dict[str, Any]:
    runs = [_virtual(soak_once, n, s, case, duration, profile) for s in range(1, seeds + 1)]
    return {
        "nodes": n,
        "case": case.describe(),
        "virtual_s": duration,
        "seeds": seeds,
        "false_positives": sum(r["false_positives"] for r in runs),
        "suspect_events": sum(r["suspect_events"] for r in runs),
        "first_verdicts": [v for r in runs for v in r["first_verdicts"]][:3],
    }


def detector_figures(seeds: int, soak_duration: float, profile: str = "lan") -> dict[str, Any]:
    t0 = time.perf_counter()
    out: dict[str, Any] = {
        "detect": {str(n): sim_detection(n, list(SIM_FAULTS), seeds, profile) for n in (5, 16)},
        "soak": {
            name: sim_soak(16, case, soak_duration, 1, profile) for name, case in SOAK_CASES.items()
        },
    }
    out["real_seconds"] = round(time.perf_counter() - t0, 1)
    return out


# The settings the trade-off curve in docs/architecture.md was measured with: each one's
# detection time for a silent host against its false positives under the soak cases.
SWEEP: dict[str, dict[str, Any]] = {
    "memberlist": {
        "suspicion_min_timeout": 0.0,
        "suspicion_stall_mult": 0,
        "probe_timeout_min": 0.5,
        "indirect_checks_max": 3,
    },
    "min 3.0 s": {"suspicion_min_timeout": 3.0},
    "min 2.0 s (lan)": {},
    "min 2.0 s, no stall floor": {"suspicion_stall_mult": 0},
    "min 1.0 s": {"suspicion_min_timeout": 1.0},
    "min 1.0 s, no stall floor": {"suspicion_min_timeout": 1.0, "suspicion_stall_mult": 0},
}


def sweep(
    seeds: int, soak_duration: float, cases: Sequence[str], profile: str = "lan"
) -> dict[str, Any]:
    """For each setting in :data:`SWEEP`: N=16 silent-host (``isolate``) detection over
    ``seeds`` clusters, and false positives in each soak case (one seeded cluster each)."""
    out: dict[str, Any] = {}
    for name, changes in SWEEP.items():
        tune = replace(profile_tuning(profile), **changes)
        det = sim_detection(16, ["isolate"], seeds, tune)["isolate"]
        row: dict[str, Any] = {"settings": changes, "isolate_n16": det}
        for case in cases:
            soak = sim_soak(16, SWEEP_CASES[case], soak_duration, 1, tune)
            row[case] = {k: soak[k] for k in ("false_positives", "suspect_events")}
        out[name] = row
        print(f"{name}: {json.dumps(row)}", file=sys.stderr, flush=True)
    return out


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


def detector_summary(d: dict[str, Any]) -> str:
    def s(v: float | None) -> str:
        return "—" if v is None else f"{v:.2f} s"

    lines = ["failure detector (virtual times, median / p90 over seeded clusters)"]
    for n, row in d["detect"].items():
        cells = ", ".join(f"{f} {s(row[f]['median_s'])} / {s(row[f]['p90_s'])}" for f in SIM_FAULTS)
        lines.append(f"  N={n:>2} ({row['seeds']} seeds): {cells}")
    for name, row in d["soak"].items():
        lines.append(
            f"  {name:12} N={row['nodes']} {row['virtual_s']:g} s, {row['case']}: "
            f"{row['false_positives']} false positives, {row['suspect_events']} suspect events"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.simulate", description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--profile", choices=sorted(PROFILES), default="lan")
    p.add_argument("--loss", type=float, default=0.0, help="loss probability on every link")
    p.add_argument("--duration", type=float, default=30.0, help="virtual seconds of soak")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--detector", action="store_true", help="add the failure detector's figures (N=5, 16)"
    )
    p.add_argument("--detector-seeds", type=int, default=30, help="clusters per detection figure")
    p.add_argument(
        "--soak-duration", type=float, default=600.0, help="virtual seconds per soak case"
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="the detector's trade-off curve: each setting of SWEEP, detection vs false positives",
    )
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
    if args.sweep:
        curve = sweep(args.detector_seeds, args.soak_duration, list(SWEEP_CASES), args.profile)
        print(json.dumps({"sweep": curve, "soak_virtual_s": args.soak_duration}))
        return 0
    result = trio.run(run, args, clock=trio.testing.MockClock(autojump_threshold=0))
    detector = (
        detector_figures(args.detector_seeds, args.soak_duration, args.profile)
        if args.detector
        else None
    )
    if args.json:
        out = asdict(result)
        if detector is not None:
            out["detector"] = detector
        print(json.dumps(out))
    else:
        print(summary(result))
        if detector is not None:
            print(detector_summary(detector))
    complete = None not in (result.converge_s, result.disseminate_999_s, result.detect_all_s)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
