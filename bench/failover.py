"""Agent lifecycle on real daemons: failover, activation, spawn, rebalance; Serf's failure
detection on the same N as the yardstick for failover.

    python -m bench.failover [--json] [--nodes 5] [--runs 5] [--profile lan]

N meshd daemons on loopback (:class:`~meshd.testing.localcluster.LocalCluster`, the ``lan``
profile by default: memberlist's production timers, encrypted gossip). The runners serving
the kinds are the real client library in this process, one ``Mesh`` per daemon.

* ``failover_first_reply_s`` — median over ``--runs`` fresh clusters. A stateful counter
  agent (its handler does ``state.incr("n", 1, durability="majority", once=msg.id)``) runs
  on a random non-seed host; a client on another daemon calls it in a loop with
  ``at_least_once`` requests (the client library's retries, each call with its own id).
  The host is killed with SIGKILL; the time runs from the kill to the first successful
  reply from the agent's new home. Each run also checks the count is exact (every
  acknowledged increment counted once) and records meshd's own detection time (every
  survivor reports the victim dead; survivors' membership polled every ``--poll`` s).
* ``serf_detect_all_s`` — median over ``--runs`` fresh Serf clusters of the same N
  (``serf agent`` defaults, LAN), SIGKILL of a random non-seed member, until every survivor
  reports it failed (helpers from :mod:`bench.membership`). Skipped if Serf is absent.
* ``activation_p50_ms`` — one warm cluster: ``--activations`` requests, one at a time, each
  to a new name of a virtual kind (``echo/<i>``), from clients on every daemon in turn; the
  time from the request to its reply, activation included. ``request_p50_ms`` is the same
  request to an already active agent, for reference.
* ``spawn_per_s`` — ``--spawns`` spawns (``--inflight`` at a time, spread over the daemons).
* ``rebalance_moved_fraction`` — after the spawns, a 6th daemon joins and starts serving
  the kind (same capacity); moved = agents whose host differs in the registry before and
  after it settled, over the total (ideal 1/(N+1); ``rebalance_expected_fraction`` is what
  rendezvous hashing predicts for these exact names).

Every process is started here and ended by its pid, on success, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import platform
import random
import shutil
import statistics
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.table import Table

from bench import harness
from bench.membership import (
    POLL_ERRORS,
    System,
    fault_action,
    measure_detection,
    meshd_netns,
    serf_loopback,
    serf_netns,
    wait_converged,
    wait_healthy,
)
from chaos.netns import HostNet, unavailable_reason
from meshd import __version__ as meshd_version
from meshd.config.model import PlacementTuning
from meshd.placement import rendezvous
from meshd.testing.localcluster import Daemon, LocalCluster
from meshd_client import AgentContext, Mesh, Message
from meshd_client.connection import Connection
from meshd_client.protocol.errors import ErrorKind, MeshError

err = Console(stderr=True, soft_wrap=True)
CAPACITY = 100_000
PER_CONN = 80  # agents per client connection (meshd admits 128 streams + requests)


# ---------------------------------------------------------------------------- helpers


async def counter(ctx: AgentContext, msg: Message) -> Any:
    if msg.body == "get":
        return {"n": await ctx.state.get("n", default=0), "node": ctx.mesh.node}
    await ctx.state.incr("n", 1, durability="majority", once=msg.id)
    return {"n": await ctx.state.get("n"), "node": ctx.mesh.node}


async def echo(ctx: AgentContext, msg: Message) -> Any:
    return {"node": ctx.mesh.node, "body": msg.body}


def handler_for(fn: Any) -> Any:
    return lambda _name: fn


@asynccontextmanager
async def meshes(daemons: Sequence[AnyDaemon]) -> AsyncIterator[dict[str, Mesh]]:
    async with AsyncExitStack() as stack:
        out = {}
        for d in daemons:
            out[d.name] = await stack.enter_async_context(Mesh.connect(d.socket_path))
        yield out


async def serving(daemons: Sequence[AnyDaemon], kind: str, hosts: set[str], timeout: float) -> None:
    with anyio.fail_after(timeout):
        while True:
            tables = [await d.call("kinds") for d in daemons]
            if all(set(t.get(kind, {})) == hosts for t in tables):
                return
            await anyio.sleep(0.05)


async def registry(daemon: Daemon, kind: str) -> dict[str, str]:
    result = await daemon.call("agents", {"kind": kind, "limit": 1_000_000}, timeout=10)
    return {a["name"]: a["node"] for a in result["agents"]}


@dataclass
class NetnsDaemon:
    """A meshd daemon in a network namespace, seen the way the benchmark sees a
    :class:`Daemon`: a name, an API socket (in the file system, reachable from here), calls."""

    name: str
    socket_path: str

    async def call(self, op: str, args: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
        async with Connection.open(self.socket_path, client="bench", timeout=timeout) as conn:
            return await conn.call(op, args, timeout=timeout)


AnyDaemon = Daemon | NetnsDaemon


async def start(cluster: LocalCluster, n: int, timeout: float = 60) -> list[Daemon]:
    daemons = cluster.start_many(n)
    await cluster.wait_ready(timeout=timeout)
    await cluster.wait_converged(timeout=timeout)
    return daemons


def pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def median(values: Sequence[float | None]) -> float | None:
    """A run that never finished counts as infinitely slow (None if that wins)."""
    if not values:
        return None
    m = statistics.median([math.inf if v is None else v for v in values])
    return None if math.isinf(m) else round(m, 3)


def _r(v: float | None, digits: int = 3) -> float | None:
    return None if v is None else round(v, digits)


# ---------------------------------------------------------------------------- failover


@dataclass
class FailoverRun:
    fault: str
    victim: str
    first_reply_s: float | None
    meshd_detect_all_s: float | None
    acked: int
    count: int | None
    exact: bool
    retried_calls: int
    new_home: str | None
    first_unreachable_s: float | None = None
    stale_errors: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


async def failover_once(
    root: Path,
    args: argparse.Namespace,
    rng: random.Random,
    fault: str = "kill9",
    net: HostNet | None = None,
) -> FailoverRun:
    """One failover run: ``kill9`` on loopback (SIGKILL: the host refuses connections), or
    ``isolate`` in network namespaces (every packet of the host dropped: silence)."""
    if fault == "kill9":
        with LocalCluster(root, profile=args.profile) as cluster:
            daemons = await start(cluster, args.nodes)
            victim_of = {d.name: d for d in daemons}
            return await _failover(list(daemons), args, rng, lambda v: victim_of[v].kill(), fault)
    assert net is not None
    system = meshd_netns(net, root, args.profile, port=next(_PORTS))
    try:
        await wait_converged(system, 60)
        await wait_healthy(system, 2.0)
        netns_daemons: list[AnyDaemon] = [
            NetnsDaemon(a.name, a.socket) for a in system.agents.values()
        ]
        return await _failover(
            netns_daemons, args, rng, lambda v: fault_action(system, v, fault, net)(), fault
        )
    finally:
        system.close()
        net.heal()


_PORTS = itertools.count(21000, 10)  # a fresh port per namespaced cluster


async def _failover(
    daemons: list[AnyDaemon],
    args: argparse.Namespace,
    rng: random.Random,
    apply: Callable[[str], None],
    fault: str,
) -> FailoverRun:
    async with meshes(daemons) as ms:
        for mesh in ms.values():
            await mesh.serve_kind(
                "counter", handler_for(counter), idle_timeout=None, strategy=args.strategy
            )
        await serving(daemons, "counter", set(ms), 30)
        # A random non-seed host, found by spawning names until one lands there.
        victim = rng.choice([d.name for d in daemons[1:]])
        name = ""
        for i in range(1000):
            candidate = f"counter/f{i}"
            owner = (await daemons[0].call("placement", {"kind": "counter", "name": candidate}))[
                "owner"
            ]
            if owner == victim:
                name = candidate
                break
        info = await ms["n1"].spawn("counter", name)
        assert info.node == victim
        caller = rng.choice([n for n in ms if n != victim])
        acked: list[tuple[float, dict[str, Any]]] = []
        errors: list[str] = []
        calls: list[float] = []  # duration of every call
        killed = anyio.Event()
        t0 = 0.0
        first: list[float] = []
        detect: list[float] = []

        async def client() -> None:
            i = 0
            while True:
                started = time.monotonic()
                try:
                    reply = await ms[caller].request(
                        name, "inc", at_least_once=True, id=f"i{i}", timeout=60
                    )
                except MeshError as exc:
                    errors.append(f"{exc.kind.value}: {exc.message}")
                    continue
                now = time.monotonic()
                calls.append(now - started)
                acked.append((now, reply))
                if killed.is_set() and reply["node"] != victim and not first:
                    first.append(now - t0)
                    return
                i += 1

        unreachable: list[float] = []
        stale_kinds: dict[str, int] = {}

        async def stale_caller() -> None:
            """A caller without retries, on another host: how soon after the fault is it told
            ``unreachable`` (the circuit to the silent host open), instead of waiting out a
            timeout? Stops at that answer, or when the agent already answers from elsewhere."""
            await killed.wait()
            while True:
                try:
                    reply = await ms[caller].request(name, "get", timeout=2)
                except MeshError as exc:
                    stale_kinds[exc.kind.value] = stale_kinds.get(exc.kind.value, 0) + 1
                    if exc.kind is ErrorKind.UNREACHABLE:
                        unreachable.append(time.monotonic() - t0)
                        return
                    continue
                if reply["node"] != victim:
                    return
                await anyio.sleep(0.01)

        async def watch_detection() -> None:
            survivors = [d for d in daemons if d.name != victim]
            async with AsyncExitStack() as stack:
                conns = [
                    await stack.enter_async_context(
                        Connection.open(d.socket_path, client="bench", timeout=3)
                    )
                    for d in survivors
                ]
                await killed.wait()
                pending = set(range(len(conns)))
                while pending:
                    for j in list(pending):
                        with contextlib.suppress(*POLL_ERRORS):
                            members = await conns[j].call("members", timeout=2)
                            if any(m["name"] == victim and m["status"] == "dead" for m in members):
                                pending.discard(j)
                    await anyio.sleep(args.poll)
                detect.append(time.monotonic() - t0)

        with anyio.move_on_after(args.failover_timeout):
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch_detection)
                tg.start_soon(client)
                tg.start_soon(stale_caller)
                while len(acked) < 20:
                    await anyio.sleep(0.01)
                await anyio.sleep(rng.uniform(0, 0.05))  # kill at a random point of a call
                t0 = time.monotonic()
                apply(victim)
                killed.set()
                with anyio.fail_after(args.failover_timeout):
                    while not (first and detect):
                        await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
        count: int | None = None
        new_home = None
        with contextlib.suppress(MeshError):
            final = await ms[caller].request(name, "get", timeout=10)
            count, new_home = final["n"], final["node"]
        # A call cancelled mid-way at the end may or may not have been applied; every
        # acknowledged one must be counted exactly once.
        exact = count is not None and count in (len(acked), len(acked) + 1)
        slow = sum(1 for c in calls if c > 0.5)
        return FailoverRun(
            fault=fault,
            victim=victim,
            first_reply_s=first[0] if first else None,
            meshd_detect_all_s=detect[0] if detect else None,
            acked=len(acked),
            count=count,
            exact=exact,
            retried_calls=slow,
            first_unreachable_s=unreachable[0] if unreachable else None,
            stale_errors=stale_kinds,
            new_home=new_home,
            errors=errors[:5],
        )


async def serf_detection(
    root: Path,
    args: argparse.Namespace,
    rng: random.Random,
    fault: str = "kill9",
    net: HostNet | None = None,
) -> float | None:
    system: System
    if net is None:
        system = await serf_loopback(root, args.nodes)
    else:
        port = next(_PORTS)
        system = await serf_netns(net, root, port=port, rpc_port=port + 1)
    try:
        await wait_converged(system, 60)
        await wait_healthy(system, 2.0)
        victim = rng.choice(system.names[1:])
        result = await measure_detection(
            system,
            victim,
            fault,
            fault_action(system, victim, fault, net),
            poll_s=args.poll,
            timeout_s=60,
            tail_s=0.0,
        )
        return result.all_s
    finally:
        system.close()
        if net is not None:
            net.heal()


# ---------------------------------------------------------------------------- the rest


def runner_conns(agents: int, hosts: int) -> int:
    """Client connections per daemon to serve ``agents`` agents spread over ``hosts``.

    Every served agent holds one stream on its client's connection, and meshd's API
    admits at most 128 requests and streams in flight per connection: beyond ~127 agents a
    runner's activations are refused (overloaded) and time out. So the runners of a kind are
    spread over several connections per daemon, each kept well below the limit (the daemon
    picks the least used runner for each activation)."""
    return max(1, math.ceil(agents * 1.3 / hosts / PER_CONN))


async def serve_on(stack: AsyncExitStack, daemon: Daemon, kind: str, conns: int) -> list[Mesh]:
    out = []
    for _ in range(conns):
        mesh = await stack.enter_async_context(Mesh.connect(daemon.socket_path))
        await mesh.serve_kind(kind, handler_for(echo), capacity=CAPACITY, idle_timeout=None)
        out.append(mesh)
    return out


async def lifecycle(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    with LocalCluster(root, profile=args.profile) as cluster:
        daemons = await start(cluster, args.nodes)
        bulk_conns = runner_conns(args.spawns, args.nodes)
        async with meshes(daemons) as ms, AsyncExitStack() as stack:
            # Callers (ms) and runners on connections of their own.
            for d in daemons:
                await serve_on(stack, d, "echo", runner_conns(args.activations, args.nodes))
                await serve_on(stack, d, "bulk", bulk_conns)
            await serving(daemons, "echo", set(ms), 30)
            await serving(daemons, "bulk", set(ms), 30)
            clients = list(ms.values())
            # Warm request latency: an active agent, callers on every daemon in turn.
            await clients[0].request("echo/warm", 0)
            warm = []
            for i in range(args.activations):
                t = time.perf_counter()
                await clients[i % len(clients)].request("echo/warm", i)
                warm.append((time.perf_counter() - t) * 1000)
            # Activation latency: a new name every time.
            cold = []
            remote = []
            for i in range(args.activations):
                mesh = clients[i % len(clients)]
                t = time.perf_counter()
                reply = await mesh.request(f"echo/cold-{i}", i)
                ms_taken = (time.perf_counter() - t) * 1000
                cold.append(ms_taken)
                if reply["node"] != mesh.node:
                    remote.append(ms_taken)
            # Spawn throughput.
            names = [f"bulk/{i}" for i in range(args.spawns)]
            limiter = anyio.Semaphore(args.inflight)

            async def spawn(i: int, name: str) -> None:
                async with limiter:
                    await clients[i % len(clients)].spawn("bulk", name, timeout=60)

            t = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for i, name in enumerate(names):
                    tg.start_soon(spawn, i, name)
            spawn_s = time.perf_counter() - t
            with anyio.fail_after(60):
                while len(before := await registry(daemons[0], "bulk")) < len(names):
                    await anyio.sleep(0.1)
            # Rebalance on join: a 6th host starts serving the kind.
            hosts_before = {d.name: float(CAPACITY) for d in daemons}
            joiner = cluster.add(f"n{args.nodes + 1}", seeds=[daemons[0].addr])
            await cluster.wait_ready([joiner], timeout=60)
            t = time.perf_counter()
            async with AsyncExitStack() as joiner_stack:
                await serve_on(joiner_stack, joiner, "bulk", bulk_conns)
                hosts_after = {**hosts_before, joiner.name: float(CAPACITY)}
                expected = {n: rendezvous.owner(n, hosts_after) for n in names}
                after: dict[str, str] = {}
                settled = False
                with anyio.move_on_after(args.rebalance_timeout):
                    stable_since = time.perf_counter()
                    last: dict[str, str] = {}
                    while True:
                        after = await registry(daemons[0], "bulk")
                        if after != last:
                            last, stable_since = after, time.perf_counter()
                        if after == expected or (
                            len(after) == len(names) and time.perf_counter() - stable_since > 5
                        ):
                            settled = after == expected
                            break
                        await anyio.sleep(0.1)
                rebalance_s = time.perf_counter() - t
                lost = sorted(set(names) - set(after))
                # Every agent still answers, where it now runs.
                answered = 0
                for i, name in enumerate(names[:: max(1, len(names) // 100)]):
                    with contextlib.suppress(MeshError):
                        await clients[i % len(clients)].request(name, "x", timeout=10)
                        answered += 1
            moved = sum(1 for n in names if after.get(n) not in (None, before[n]))
            moved_to_joiner = sum(
                1 for n in names if after.get(n) == joiner.name and before[n] != joiner.name
            )
            return {
                "activation_p50_ms": _r(pct(cold, 0.5), 2),
                "activation_p90_ms": _r(pct(cold, 0.9), 2),
                "activation_p99_ms": _r(pct(cold, 0.99), 2),
                "activation_remote_owner_p50_ms": _r(pct(remote, 0.5), 2),
                "activation_remote_owner_share": round(len(remote) / len(cold), 3),
                "request_p50_ms": _r(pct(warm, 0.5), 2),
                "request_p99_ms": _r(pct(warm, 0.99), 2),
                "spawn_per_s": round(len(names) / spawn_s, 1),
                "rebalance_moved_fraction": round(moved / len(names), 4),
                "rebalance_moved_to_joiner": moved_to_joiner,
                "rebalance_expected_fraction": round(
                    rendezvous.moved_fraction(names, hosts_before, hosts_after), 4
                ),
                "rebalance_ideal_fraction": round(1 / (args.nodes + 1), 4),
                "rebalance_s": round(rebalance_s, 2),
                "rebalance_settled_on_owners": settled,
                "rebalance_lost": len(lost),
                "rebalance_sampled_answered": answered,
            }


# ---------------------------------------------------------------------------- main


async def failovers(
    args: argparse.Namespace, root: Path, rng: random.Random, serf: str | None
) -> tuple[dict[str, list[FailoverRun]], dict[str, list[float | None]]]:
    """``--runs`` failover runs per fault, each with a Serf detection run of the same fault."""
    faults: list[str] = args.faults.split(",")
    runs: dict[str, list[FailoverRun]] = {f: [] for f in faults}
    serf_runs: dict[str, list[float | None]] = {f: [] for f in faults}
    net = (
        HostNet(args.nodes, prefix=args.prefix, subnet=args.subnet, root_addr=True)
        if ("isolate" in faults)
        else None
    )
    with net if net is not None else contextlib.nullcontext():
        for run in range(1, args.runs + 1):
            # Interleaved, so that drifting machine load hits both alike.
            for fault in faults:
                where = net if fault == "isolate" else None
                r = await failover_once(root / f"failover{run}-{fault}", args, rng, fault, where)
                runs[fault].append(r)
                err.print(
                    f"[dim]run {run}/{args.runs} meshd {fault}: {r.victim}, first reply from "
                    f"{r.new_home} after {_fmt(r.first_reply_s)} (detected by all after "
                    f"{_fmt(r.meshd_detect_all_s)}, unreachable after "
                    f"{_fmt(r.first_unreachable_s)}), {r.acked} acked, count {r.count}, "
                    f"exact {r.exact}[/dim]"
                )
                if serf:
                    s = await serf_detection(root / f"serf{run}-{fault}", args, rng, fault, where)
                    serf_runs[fault].append(s)
                    err.print(
                        f"[dim]run {run}/{args.runs} serf {fault}: detected by all after "
                        f"{_fmt(s)}[/dim]"
                    )
    return runs, serf_runs


def _run_json(r: FailoverRun) -> dict[str, Any]:
    return {
        "fault": r.fault,
        "victim": r.victim,
        "first_reply_s": _r(r.first_reply_s),
        "meshd_detect_all_s": _r(r.meshd_detect_all_s),
        "first_unreachable_s": _r(r.first_unreachable_s),
        "stale_caller_errors": r.stale_errors,
        "acked": r.acked,
        "count": r.count,
        "exact": r.exact,
        "calls_over_500ms": r.retried_calls,
        "client_errors": r.errors,
    }


async def bench(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    serf = shutil.which("serf") if not args.no_serf else None
    by_fault, serf_by_fault = await failovers(args, root, rng, serf)
    silent: dict[str, Any] = {}
    for fault in by_fault:
        if fault == "kill9":
            continue
        f_runs, s_runs = by_fault[fault], serf_by_fault[fault]
        first, serf_f = median([r.first_reply_s for r in f_runs]), median(s_runs) if serf else None
        silent[fault] = {
            "failover_first_reply_s": first,
            "meshd_detect_all_s": median([r.meshd_detect_all_s for r in f_runs]),
            "first_unreachable_s": median([r.first_unreachable_s for r in f_runs]),
            "serf_detect_all_s": serf_f,
            "failover_within_serf_detection": (
                None if first is None or serf_f is None else first <= serf_f
            ),
            "runs": [_run_json(r) for r in f_runs],
            "serf_runs_s": [_r(s) for s in s_runs],
        }
    runs = by_fault.get("kill9", [])
    serf_runs = serf_by_fault.get("kill9", [])
    if args.skip_lifecycle:
        rest: dict[str, Any] = {}
    else:
        err.print("[dim]activation, spawn and rebalance...[/dim]")
        rest = await lifecycle(root / "lifecycle", args)
    failover = median([r.first_reply_s for r in runs])
    serf_all = median(serf_runs) if serf and runs else None
    out: dict[str, Any] = {
        "nodes": args.nodes,
        "runs": args.runs,
        "profile": args.profile,
        "strategy": args.strategy,
        "failover_first_reply_s": failover,
        "serf_detect_all_s": serf_all,
        "meshd_detect_all_s": median([r.meshd_detect_all_s for r in runs]),
        "first_unreachable_s": median([r.first_unreachable_s for r in runs]),
        "faults": args.faults.split(","),
        **silent,
        **rest,
        "targets": {
            "failover_below_serf_detection": (
                None if failover is None or serf_all is None else failover < serf_all
            ),
            "activation_p50_below_5ms": (
                None if rest.get("activation_p50_ms") is None else rest["activation_p50_ms"] < 5
            ),
        },
        "failover_runs": [_run_json(r) for r in runs],
        "serf_runs_s": [_r(s) for s in serf_runs],
        "method": {
            "meshd_version": meshd_version,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loopback": "every daemon and Serf agent on 127.0.0.1; clients and runners in "
            "this one process (their CPU is shared)",
            "meshd": f"profile {args.profile}, encrypted gossip, placement {PlacementTuning()}",
            "serf": "serf agent defaults (LAN), fresh cluster per run",
            "failover": "kill -9 of the agent's host (or, for isolate, every packet of its "
            "host dropped by nftables in its network namespace) to the first successful reply "
            "from the new host, client-library at_least_once requests in a loop",
            "first_unreachable": "from the fault to the first 'unreachable' answer to a plain "
            "request (no retries, 2 s timeout) from a caller on another host",
            "isolate": "daemons and Serf agents in network namespaces on a bridge "
            "(chaos.netns.HostNet); kill9 on loopback",
        },
    }
    if not serf:
        out["serf_note"] = "skipped (--no-serf)" if args.no_serf else "serf is not installed"
    return out


def _fmt(v: float | None, unit: str = "s") -> str:
    return "—" if v is None else f"{v:.3f} {unit}"


def print_table(result: dict[str, Any]) -> None:
    console = Console()
    table = Table(title=f"{result['nodes']} daemons, profile {result['profile']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("target / reference")
    t = result["targets"]
    table.add_row(
        "failover: first reply (median)",
        _fmt(result["failover_first_reply_s"]),
        f"< Serf detect-all {_fmt(result['serf_detect_all_s'])}: "
        f"{t['failover_below_serf_detection']}",
    )
    table.add_row("meshd detect-all (same runs)", _fmt(result["meshd_detect_all_s"]), "")
    table.add_row("first 'unreachable' (same runs)", _fmt(result["first_unreachable_s"]), "")
    for fault in result["faults"]:
        r = result.get(fault) if fault != "kill9" else None
        if not r:
            continue
        table.add_row(
            f"{fault}: failover first reply",
            _fmt(r["failover_first_reply_s"]),
            f"<= Serf detect-all {_fmt(r['serf_detect_all_s'])}: "
            f"{r['failover_within_serf_detection']}",
        )
        table.add_row(f"{fault}: meshd detect-all", _fmt(r["meshd_detect_all_s"]), "")
        table.add_row(f"{fault}: first 'unreachable'", _fmt(r["first_unreachable_s"]), "")
    if "activation_p50_ms" not in result:
        console.print(table)
        return
    table.add_row(
        "activation p50 / p99",
        f"{result['activation_p50_ms']} / {result['activation_p99_ms']} ms",
        f"< 5 ms: {t['activation_p50_below_5ms']}",
    )
    table.add_row(
        "request to an active agent p50",
        f"{result['request_p50_ms']} ms",
        "reference",
    )
    table.add_row("spawn", f"{result['spawn_per_s']} /s", "")
    table.add_row(
        "rebalance moved on join",
        f"{result['rebalance_moved_fraction']:.3f}",
        f"ideal {result['rebalance_ideal_fraction']:.3f}, "
        f"hash predicts {result['rebalance_expected_fraction']:.3f}",
    )
    console.print(table)
    if result.get("serf_note"):
        console.print(f"[yellow]{result['serf_note']}[/yellow]")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.failover",
        description="meshd failover, activation, spawn and rebalance; Serf detection as "
        "the reference",
    )
    p.add_argument("--json", action="store_true", help="print JSON (else a table)")
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--runs", type=int, default=5, help="failover runs (fresh clusters)")
    p.add_argument("--profile", default="lan")
    p.add_argument("--activations", type=int, default=300, help="cold activations timed")
    p.add_argument("--spawns", type=int, default=1200, help="agents spawned")
    p.add_argument("--inflight", type=int, default=32, help="spawns in flight")
    p.add_argument("--poll", type=float, default=0.05, help="detection poll interval (s)")
    p.add_argument("--failover-timeout", type=float, default=60.0)
    p.add_argument("--rebalance-timeout", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-serf", action="store_true", help="do not run the Serf reference")
    p.add_argument(
        "--faults",
        default="kill9",
        help="failover after: kill9 (SIGKILL, loopback) and/or isolate (every packet of the "
        "host dropped, network namespaces; needs root and nft)",
    )
    p.add_argument(
        "--strategy",
        choices=["keep_majority", "allow_duplicates"],
        default="keep_majority",
        help="the counter kind's placement strategy: keep_majority waits until the silent "
        "host's lease has run out (placement.lease + lease_margin after it was last seen "
        "alive: it may still run on the other side of a partition); allow_duplicates does not",
    )
    p.add_argument(
        "--skip-lifecycle", action="store_true", help="failover only (no activation/spawn)"
    )
    p.add_argument("--prefix", default="mshf", help="namespace name prefix (isolate)")
    p.add_argument("--subnet", default="10.78.0.0/24", help="host subnet (isolate)")
    p.add_argument("--keep", action="store_true", help="keep the run directory (logs)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.nodes < 3:
        raise SystemExit("--nodes must be at least 3")
    faults = args.faults.split(",")
    if not faults or not set(faults) <= {"kill9", "isolate"}:
        raise SystemExit("--faults: kill9 and/or isolate")
    if "isolate" in faults and (reason := unavailable_reason()) is not None:
        raise SystemExit(f"--faults isolate: {reason}")
    return harness.run(
        "meshd-bench-failover-",
        lambda root: anyio.run(bench, args, root, backend="trio"),
        keep=args.keep,
        as_json=args.json,
        table=print_table,
    )


if __name__ == "__main__":
    raise SystemExit(main())
