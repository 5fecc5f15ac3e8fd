"""Run a scenario end to end: up, workload + fault schedule, heal, observe, check, down.

The cluster is always taken down — on success, on a failed check, on an exception in the
harness, on Ctrl-C or SIGTERM — and every run leaves its history and verdict in the results
directory (and, when it failed, every daemon's log), with the seed needed to replay it.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup

from chaos.backends import DaemonSpec
from chaos.checker import Check, Verdict, check
from chaos.cluster import (
    Cluster,
    default_run_dir,
    new_key,
    rotate_key,
    wait_majority,
    wait_ready,
)
from chaos.history import History
from chaos.netns import DEFAULT_SUBNET
from chaos.observe import collect, watch_convergence, watch_disk
from chaos.scenario import Scenario, Step
from chaos.workload import Workload, open_workload

DEFAULT_RESULTS = Path("/tmp/meshd-chaos-results")
# Steps that end a fault: the time from each to one membership view is measured.
RECOVERIES = frozenset({"heal_network", "unblock", "resume", "start", "restart", "flap"})


@dataclass(slots=True)
class RunOptions:
    prefix: str = "mshr"
    subnet: str = DEFAULT_SUBNET
    backend: str = "netns"
    results: Path = DEFAULT_RESULTS
    keep_logs: bool = False
    seed: int | None = None
    docker_net: str | None = None  # first three octets of the compose network (docker)


def _hosts(args: dict[str, Any]) -> list[str]:
    value = args.get("hosts", args.get("host"))
    return [value] if isinstance(value, str) else list(value or [])


async def _sync(fn: Any, *args: Any) -> Any:
    return await anyio.to_thread.run_sync(lambda: fn(*args))


async def play(
    step: Step,
    cluster: Cluster,
    workload: Workload,
    bound: float = 30.0,
    background: TaskGroup | None = None,
) -> None:
    """Carry out one step of a fault schedule. Watchers that must outlive the schedule (a
    filled disk's, until its daemon recovered) start in ``background``."""
    a = step.args
    match step.action:
        case "partition":
            await _sync(cluster.partition, a["groups"])
        case "one_way":
            await _sync(cluster.one_way, a["src"], a["dst"])
        case "unblock":
            await _sync(cluster.unblock, a["src"], a["dst"])
        case "bridge":
            await _sync(cluster.bridge, a["a"], a["b"], a["via"])
        case "isolate":
            await _sync(cluster.isolate, a["host"])
        case "loss":
            await _sync(cluster.loss, _hosts(a) or cluster.hosts, float(a["p"]))
        case "heal_network":
            await _sync(cluster.heal_network)
        case "kill" | "pause" | "resume" | "restart" | "stop" | "start":
            for host in _hosts(a):
                await _sync(getattr(cluster, step.action), host)
        case "kill_all":
            await _sync(cluster.kill_all, _hosts(a) or cluster.hosts)
        case "fill_disk":
            await _sync(cluster.fill_disk, a["host"])
            if background is not None:
                background.start_soon(watch_disk, cluster, workload.history, a["host"])
        case "free_disk":
            await _sync(cluster.free_disk, a["host"])
        case "write_burst":
            workload.write_burst(list(a["hosts"]), str(a["kind"]), int(a["count"]))
        case "flap":
            half = float(a["period"]) / 2
            for _ in range(int(a["times"])):
                await _sync(cluster.one_way, a["a"], a["b"])
                await _sync(cluster.one_way, a["b"], a["a"])
                await anyio.sleep(half)
                await _sync(cluster.unblock, a["a"], a["b"])
                await _sync(cluster.unblock, a["b"], a["a"])
                await anyio.sleep(half)
        case "rolling_restart":
            for host in _hosts(a) or cluster.hosts:
                await _sync(cluster.restart, host)
                # Timed like any recovery; the next host goes only once this one is back.
                await watch_convergence(cluster, workload.history, bound, after=f"restart {host}")
                await anyio.sleep(float(a.get("settle", 3.0)))
        case "rotate_key":
            running = [h for h in cluster.hosts if cluster.backend.daemon_running(h)]
            await rotate_key(cluster, running[0], new_key())
        case "register_duplicate":
            await workload.register_duplicate(a["name"], list(a["hosts"]))
        case "wait":
            pass
        case other:
            raise ValueError(f"unknown action {other!r}")


async def run_scenario(scenario: Scenario, options: RunOptions) -> Verdict:
    seed = options.seed if options.seed is not None else random.randrange(2**31)
    rng = random.Random(seed)
    started = time.monotonic()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = options.results / f"{stamp}-{scenario.name}-{seed}"
    out.mkdir(parents=True, exist_ok=True)
    history = History(out / "history.jsonl")
    history.add(
        "meta",
        scenario=scenario.name,
        seed=seed,
        hosts=[f"h{i}" for i in range(1, scenario.hosts + 1)],
        backend=options.backend,
        profile=scenario.profile,
        duration=scenario.duration,
        steps=scenario.describe(),
        expect=scenario.expect.to_json(),
        workload=scenario.workload.enabled,
    )
    cluster: Cluster | None = None
    verdict: Verdict | None = None
    try:
        error: Exception | None = None
        try:
            # Synchronously (not in a worker thread): a cancellation must never leave a
            # cluster behind whose handle we never got.
            cluster = Cluster.create(
                scenario.hosts,
                backend=options.backend,
                prefix=options.prefix,
                subnet=options.subnet,
                run_dir=default_run_dir(options.prefix),
                spec=DaemonSpec(profile=scenario.profile, key=new_key()),
                history=history,
                docker_net=options.docker_net,
                disks=scenario.disk_sizes(),
            )
            await _exercise(scenario, cluster, history, rng)
        except Exception as exc:
            error = exc
        verdict = check(history.events)
        if error is not None:
            verdict.checks.insert(0, Check("harness", False, f"{type(error).__name__}: {error}"))
    finally:
        if cluster is not None:
            failed = verdict is None or not verdict.ok
            cluster.close(keep=out if failed or options.keep_logs else None)
        history.close()
    assert verdict is not None
    verdict.seed = seed
    verdict.duration_s = round(time.monotonic() - started, 1)
    verdict.stats["results"] = str(out)
    (out / "verdict.json").write_text(json.dumps(verdict.to_json(), indent=1, default=str))
    return verdict


async def _exercise(
    scenario: Scenario, cluster: Cluster, history: History, rng: random.Random
) -> None:
    """Workload and schedule, the final heal, then the observations the checker needs."""
    ready = await wait_ready(cluster, 60.0)
    majority = await wait_majority(cluster, 90.0)
    history.add("ready", after=round(ready, 3), majority_after=round(majority, 3))
    await anyio.sleep(scenario.settle)
    bound = scenario.converge_bound
    async with open_workload(cluster, history, scenario.workload, rng) as workload:
        # Disk watchers run until every filled disk's daemon recovered, past the heal.
        async with anyio.create_task_group() as disks:
            workload.start_drivers()
            await _schedule(scenario, cluster, workload, disks)
            history.add("observe", what="nft", hosts=await _sync(cluster.counted))
            await _sync(cluster.heal)
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch_convergence, cluster, history, bound)
                await workload.stop_drivers()
        await collect(cluster, history, workload, bound=scenario.converge_bound)


async def _schedule(
    scenario: Scenario, cluster: Cluster, workload: Workload, background: TaskGroup
) -> None:
    """Play the fault schedule over the scenario's duration, timing each recovery."""
    history = workload.history
    bound = scenario.converge_bound
    t0 = time.monotonic()
    recovering: list[anyio.CancelScope] = []
    async with anyio.create_task_group() as watchers:
        for step in scenario.steps:
            await anyio.sleep(max(0.0, t0 + step.at - time.monotonic()))
            for scope in recovering:  # a new fault: stop timing the last recovery
                scope.cancel()
            recovering.clear()
            history.add("step", at=step.at, action=step.action, args=step.args)
            await play(step, cluster, workload, bound, background)
            if step.action in RECOVERIES:
                # Time the recovery this step starts (a heal, a resume, a start).
                scope = anyio.CancelScope()
                recovering.append(scope)

                async def watch(scope: anyio.CancelScope = scope, after: str = step.action) -> None:
                    with scope:
                        await watch_convergence(cluster, history, bound, after=after)

                watchers.start_soon(watch)
        await anyio.sleep(max(0.0, t0 + scenario.duration - time.monotonic()))
        for scope in recovering:
            scope.cancel()


def summary(verdicts: list[Verdict]) -> dict[str, Any]:
    """The JSON verdict of a suite: per scenario, and the totals that matter."""
    converge = [v.converge_s for v in verdicts if v.converge_s is not None]
    return {
        "scenarios": [v.to_json() for v in verdicts],
        "passed": sum(1 for v in verdicts if v.ok),
        "failed": sum(1 for v in verdicts if not v.ok),
        "lost_writes": sum(v.lost_writes for v in verdicts),
        "lost_majority_writes": sum(v.lost_majority for v in verdicts),
        "lost_local_writes": sum(v.lost_local for v in verdicts),
        "duplicate_deliveries": sum(v.duplicate_deliveries for v in verdicts),
        "max_converge_s": max(converge) if converge else None,
        "duration_s": round(sum(v.duration_s or 0 for v in verdicts), 1),
    }
