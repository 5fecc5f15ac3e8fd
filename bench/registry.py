"""Agent registry at scale on real daemons: propagation, bulk load, join sync, memory, bytes.

    python -m bench.registry [--json] [--nodes 16] [--entries 100000] [--samples 200]

N meshd daemons on loopback (:class:`~meshd.testing.localcluster.LocalCluster`, ``lan``
profile unless ``--profile``, encrypted gossip, metrics endpoint on), all seeded from n1.

1. **Propagation.** Every daemon has a ``registry.watch`` stream open (one connection per
   daemon); ``--samples`` single registrations are made one at a time on random daemons (one
   registering connection per daemon, kept open: an agent belongs to its session) and the
   ``registered`` event is timestamped on every daemon as it arrives. A sample's time runs
   from just before the ``register`` call to the last daemon's event: p50/p99/max.
2. **Bulk.** ``--entries`` registrations spread evenly over the daemons, ``--conns`` sessions
   per daemon with ``--inflight`` requests in flight each, all sessions kept open. Timed until
   every call returned and until every daemon resolves every entry (``agents`` with
   ``limit 0``, polled once a second). Network bytes are every daemon's
   ``meshd_transport_{tcp,udp}_sent_bytes_total`` from just before the bulk load to
   convergence (membership gossip and anti-entropy digests included), divided by
   entries × nodes.
3. **Join.** A fresh daemon is started with n1 as its seed; the time from its spawn until it
   resolves every entry (``agents`` count polled every 0.1 s).
4. **Memory.** The largest VmRSS among all daemons (the joiner included) at the end.

Every process is started here and ended by its pid (LocalCluster's context manager), on
success, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import random
import statistics
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus
from rich.console import Console
from rich.table import Table

from bench import harness
from meshd import __version__ as meshd_version
from meshd.testing.localcluster import Daemon, LocalCluster, free_port
from meshd_client.connection import Connection
from meshd_client.protocol.errors import MeshError

err = Console(stderr=True, soft_wrap=True)
BYTE_COUNTERS = ("meshd_transport_tcp_sent_bytes_total", "meshd_transport_udp_sent_bytes_total")
TARGETS = {"join_full_sync_s": 5.0, "rss_mb_max": 250.0, "propagation_p99_s": 1.0}


@dataclass
class Node:
    daemon: Daemon
    metrics_port: int

    @property
    def name(self) -> str:
        return self.daemon.name


@dataclass
class Run:
    args: argparse.Namespace
    cluster: LocalCluster
    rng: random.Random
    nodes: list[Node] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, seeds: Sequence[str] = ()) -> Node:
        port = free_port()
        daemon = self.cluster.add(
            name, seeds=seeds, extra=[f"--metrics-bind=127.0.0.1:{port}"], start=False
        )
        return Node(daemon, port)


# ---------------------------------------------------------------------------- helpers


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    """Resident memory now (VmRSS) or its high-water mark (VmHWM), in MB."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def scrape(port: int) -> dict[str, float]:
    """The unlabelled samples of a daemon's /metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or "{" in line:
            continue
        parts = line.split()
        if len(parts) == 2:
            with contextlib.suppress(ValueError):
                out[parts[0]] = float(parts[1])
    return out


async def bytes_out(nodes: Sequence[Node]) -> dict[str, float]:
    out: dict[str, float] = {}
    for node in nodes:
        page = await anyio.to_thread.run_sync(scrape, node.metrics_port)
        out[node.name] = sum(page.get(name, 0.0) for name in BYTE_COUNTERS)
    return out


async def resolved_count(conn: Connection) -> int:
    found = await conn.call("agents", {"limit": 0}, timeout=60)
    return int(found["count"])


async def false_positives(run: Run, phase: str) -> None:
    """Death verdicts and suspicions so far, summed over every daemon's own counters (one
    member declared dead counts once per daemon that learns it). Nobody is killed in this
    benchmark: every death verdict is a false positive."""
    deaths = suspicions = 0
    for node in run.nodes:
        with contextlib.suppress(MeshError):
            stats = (await node.daemon.call("info", timeout=30))["stats"]
            deaths += stats["deaths"]
            suspicions += stats["suspicions"]
    seen = run.result.setdefault("membership_false_positives", {})
    before_d = sum(v["deaths"] for v in seen.values())
    before_s = sum(v["suspicions"] for v in seen.values())
    seen[phase] = {"deaths": deaths - before_d, "suspicions": suspicions - before_s}


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


# ---------------------------------------------------------------------------- phases


async def start_cluster(run: Run) -> None:
    args = run.args
    first = run.add("n1")
    run.nodes = [first] + [
        run.add(f"n{i}", seeds=[first.daemon.addr]) for i in range(2, args.nodes + 1)
    ]
    t0 = time.monotonic()
    for node in run.nodes:
        node.daemon.spawn()
    await run.cluster.wait_ready(timeout=120)
    await run.cluster.wait_converged(timeout=120)
    run.result["startup_s"] = round(time.monotonic() - t0, 2)
    err.print(f"[dim]{args.nodes} daemons up and converged in {run.result['startup_s']} s[/dim]")


async def propagation(run: Run, stack: contextlib.AsyncExitStack) -> dict[str, Connection]:
    """Returns the registering connections (their agents must stay registered)."""
    args = run.args
    registrars: dict[str, Connection] = {}
    for node in run.nodes:
        registrars[node.name] = await stack.enter_async_context(
            Connection.open(node.daemon.socket_path, client="bench-register", timeout=30)
        )
    seen: dict[str, dict[str, float]] = {}
    complete: dict[str, anyio.Event] = {}
    want = len(run.nodes)

    async def watch(node: Node, task_status: TaskStatus[None]) -> None:
        async with (
            Connection.open(node.daemon.socket_path, client="bench-watch", timeout=30) as conn,
            conn.stream("registry.watch") as events,
        ):
            task_status.started()
            async for event in events:
                if event.get("kind") != "registered":
                    continue
                at = time.monotonic()
                name = event.get("name", "")
                times = seen.setdefault(name, {})
                times.setdefault(node.name, at)
                if len(times) == want and name in complete:
                    complete[name].set()

    latencies: list[float] = []
    missed: list[str] = []
    async with anyio.create_task_group() as watchers:
        for node in run.nodes:
            await watchers.start(watch, node)
        for i in range(-3, args.samples):  # three warm-up registrations, not counted
            name = f"prop-{i + 3:05d}"
            node = run.rng.choice(run.nodes)
            complete[name] = anyio.Event()
            t0 = time.monotonic()
            await registrars[node.name].call(
                "register", {"name": name, "kind": "probe", "capabilities": ["propagation"]}
            )
            with anyio.move_on_after(args.sample_timeout):
                await complete[name].wait()
            times = seen.get(name, {})
            if i >= 0:
                if len(times) == want:
                    latencies.append(max(times.values()) - t0)
                else:
                    missed.append(name)
            await anyio.sleep(run.rng.uniform(0.0, args.gap))
        watchers.cancel_scope.cancel()
    if not latencies:
        raise RuntimeError("no registration propagated to every daemon")
    bounds = (0.05, 0.1, 0.25, 0.5, 1.0)
    histogram = {f"<{b}s": sum(1 for x in latencies if x < b) for b in bounds}
    histogram[f">={bounds[-1]}s"] = sum(1 for x in latencies if x >= bounds[-1])
    run.result |= {
        "propagation_p50_s": _r(statistics.median(latencies)),
        "propagation_p99_s": _r(percentile(latencies, 99)),
        "propagation_max_s": _r(max(latencies)),
        "propagation_missed": len(missed),
        "propagation_histogram": histogram,
    }
    err.print(
        f"[dim]propagation over {len(latencies)} samples: p50 {run.result['propagation_p50_s']} s"
        f", p99 {run.result['propagation_p99_s']} s, max {run.result['propagation_max_s']} s, "
        f"missed {len(missed)}[/dim]"
    )
    return registrars


def _share(names: Sequence[str], parts: int) -> Iterator[list[str]]:
    for k in range(parts):
        yield list(names[k::parts])


async def bulk(run: Run, stack: contextlib.AsyncExitStack, expected: int) -> None:
    args = run.args
    names = [f"agent-{i:07d}" for i in range(args.entries)]
    per_node = dict(zip((n.name for n in run.nodes), _share(names, len(run.nodes)), strict=True))
    sessions: list[tuple[Connection, list[str]]] = []
    for node in run.nodes:
        for chunk in _share(per_node[node.name], args.conns):
            conn = await stack.enter_async_context(
                Connection.open(node.daemon.socket_path, client="bench-bulk", timeout=30)
            )
            sessions.append((conn, chunk))
    pollers = {
        node.name: await stack.enter_async_context(
            Connection.open(node.daemon.socket_path, client="bench-poll", timeout=30)
        )
        for node in run.nodes
    }
    failures: dict[str, int] = {}
    before = await bytes_out(run.nodes)
    t0 = time.monotonic()

    async def session(conn: Connection, chunk: list[str]) -> None:
        todo = iter(chunk)

        async def worker() -> None:
            for name in todo:
                i = int(name.rsplit("-", 1)[1])
                try:
                    await conn.call(
                        "register",
                        {
                            "name": name,
                            "kind": f"kind-{i % 8}",
                            "capabilities": ["bulk", f"cap-{i % 32}"],
                            "metadata": {"i": i},
                        },
                        timeout=120,
                    )
                except MeshError as exc:
                    failures[exc.kind.value] = failures.get(exc.kind.value, 0) + 1

        async with anyio.create_task_group() as tg:
            for _ in range(args.inflight):
                tg.start_soon(worker)

    async def progress() -> None:
        while True:
            await anyio.sleep(10)
            err.print(f"[dim]  bulk: {time.monotonic() - t0:.0f} s ...[/dim]")

    async with anyio.create_task_group() as tg:
        tg.start_soon(progress)
        async with anyio.create_task_group() as senders:
            for conn, chunk in sessions:
                senders.start_soon(session, conn, chunk)
        api_s = time.monotonic() - t0
        err.print(f"[dim]  bulk: every call returned after {api_s:.1f} s[/dim]")
        counts: dict[str, int] = {}
        pending = set(pollers)
        with anyio.fail_after(args.timeout):
            while pending:
                for name in sorted(pending):
                    counts[name] = await resolved_count(pollers[name])
                    if counts[name] >= expected:
                        pending.discard(name)
                if pending:
                    await anyio.sleep(1.0)
        converged_s = time.monotonic() - t0
        tg.cancel_scope.cancel()
    after = await bytes_out(run.nodes)
    delta = sum(after[n] - before[n] for n in before)
    registered = args.entries - sum(failures.values())
    run.result |= {
        "entries": args.entries,
        "entries_total": expected,
        "bulk_failures": failures,
        "bulk_api_s": round(api_s, 2),
        "bulk_converged_s": round(converged_s, 2),
        "registrations_per_s_api": round(registered / api_s, 1),
        "registrations_per_s": round(registered / converged_s, 1),
        "bytes_out_total": int(delta),
        "bytes_per_registration": round(delta / (args.entries * len(run.nodes)), 1),
    }
    err.print(
        f"[dim]bulk: {registered} registrations; calls done in {api_s:.1f} s, resolved "
        f"everywhere in {converged_s:.1f} s; {run.result['bytes_per_registration']} B out per "
        f"registration per node[/dim]"
    )


async def join(run: Run, expected: int) -> None:
    node = run.add(f"n{len(run.nodes) + 1}", seeds=[run.nodes[0].daemon.addr])
    t0 = time.monotonic()
    node.daemon.spawn()
    await run.cluster.wait_answering(node.daemon, timeout=60)
    answered_s = time.monotonic() - t0
    count = 0
    async with Connection.open(node.daemon.socket_path, client="bench-join", timeout=30) as conn:
        with anyio.fail_after(run.args.timeout):
            while (count := await resolved_count(conn)) < expected:
                await anyio.sleep(0.1)
    sync_s = time.monotonic() - t0
    run.nodes.append(node)
    page = await anyio.to_thread.run_sync(scrape, node.metrics_port)
    run.result |= {
        "join_full_sync_s": round(sync_s, 3),
        "join_answering_s": round(answered_s, 3),
        "join_resolved": count,
        # What the joiner took in: every peer that starts a round with it sends it every
        # document it lacks, so these show how many full copies arrived.
        "join_repair_updates_received": int(
            page.get("meshd_replication_repair_updates_received_total", 0)
        ),
        "join_repair_bytes_received": int(
            page.get("meshd_replication_repair_received_bytes_total", 0)
        ),
        "join_rounds_completed": int(page.get("meshd_replication_rounds_completed_total", 0)),
    }
    err.print(
        f"[dim]join: {node.name} resolves all {count} entries {sync_s:.2f} s after start[/dim]"
    )


async def finish(run: Run) -> None:
    rss = {n.name: rss_mb(n.daemon.pid) for n in run.nodes if n.daemon.running()}
    hwm = {n.name: rss_mb(n.daemon.pid, "VmHWM") for n in run.nodes if n.daemon.running()}
    values = [v for v in rss.values() if v is not None]
    info = await run.nodes[0].daemon.call("info", timeout=30)
    run.result |= {
        "rss_mb_max": round(max(values), 1),
        "rss_mb_median": round(statistics.median(values), 1),
        "rss_mb_by_node": {k: _r(v, 1) for k, v in rss.items()},
        "rss_peak_mb_max": round(max(v for v in hwm.values() if v is not None), 1),
        "rss_peak_mb_by_node": {k: _r(v, 1) for k, v in hwm.items()},
        "members_seen_by_n1": info["members"],
        "crashed": [n.name for n in run.nodes if not n.daemon.running()],
    }


async def bench(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    load_start = os.getloadavg()
    with LocalCluster(root, profile=args.profile) as cluster:
        run = Run(args, cluster, rng)
        run.result = {"nodes": args.nodes, "profile": args.profile, "samples": args.samples}
        try:
            await start_cluster(run)
            async with contextlib.AsyncExitStack() as stack:
                await propagation(run, stack)
                await false_positives(run, "startup_and_propagation")
                await bulk(run, stack, expected=args.entries + args.samples + 3)
                await false_positives(run, "bulk")
                await join(run, expected=args.entries + args.samples + 3)
                await false_positives(run, "join")
                await finish(run)
        except BaseException:
            crashed = [d.name for d in cluster.daemons.values() if d.starts and not d.running()]
            if crashed:
                err.print(f"[red]daemons that exited: {crashed}[/red]")
            raise
    run.result["targets"] = {
        key: {"target": limit, "met": run.result.get(key) is not None and run.result[key] < limit}
        for key, limit in TARGETS.items()
    }
    run.result["method"] = {
        "meshd_version": meshd_version,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        # Other work on the machine skews every number here: the 1-minute load at start/end.
        "loadavg_1m_start": round(load_start[0], 2),
        "loadavg_1m_end": round(os.getloadavg()[0], 2),
        "conns_per_node": args.conns,
        "inflight_per_conn": args.inflight,
        "propagation": "registry.watch on every daemon; from before the register call to the "
        "last daemon's 'registered' event; one registration at a time on a random daemon",
        "bytes": "sum over daemons of tcp+udp bytes out during the bulk load (until every "
        "daemon resolved everything), divided by entries x nodes",
        "join": "from spawning a fresh daemon (seed n1) until agents count (limit 0) is full",
    }
    return run.result


# ---------------------------------------------------------------------------- output


def print_summary(result: dict[str, Any]) -> None:
    console = Console()
    table = Table(
        title=f"registry: {result['nodes']} daemons ({result['profile']} profile), "
        f"{result.get('entries')} entries",
        title_justify="left",
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    rows = (
        ("propagation p50 (s)", "propagation_p50_s"),
        ("propagation p99 (s)", "propagation_p99_s"),
        ("propagation max (s)", "propagation_max_s"),
        ("bulk: calls returned (s)", "bulk_api_s"),
        ("bulk: resolved everywhere (s)", "bulk_converged_s"),
        ("registrations/s (to convergence)", "registrations_per_s"),
        ("bytes out per registration per node", "bytes_per_registration"),
        ("join: full sync (s)", "join_full_sync_s"),
        ("RSS max (MB)", "rss_mb_max"),
        ("RSS median (MB)", "rss_mb_median"),
    )
    for label, key in rows:
        target = result.get("targets", {}).get(key)
        shown = "" if target is None else f"< {target['target']} " + ("✓" if target["met"] else "✗")
        table.add_row(label, str(result.get(key)), shown)
    console.print(table)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.registry",
        description="meshd agent registry: propagation, bulk load, join sync, memory, bytes",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--entries", type=int, default=100_000)
    p.add_argument("--samples", type=int, default=200, help="propagation samples")
    p.add_argument("--profile", default="lan", help="meshd profile (lan)")
    p.add_argument("--conns", type=int, default=4, help="bulk sessions per daemon")
    p.add_argument("--inflight", type=int, default=8, help="requests in flight per session")
    p.add_argument("--gap", type=float, default=0.05, help="max random pause between samples")
    p.add_argument("--sample-timeout", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=900.0, help="bulk/join convergence limit")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--keep", action="store_true", help="keep the run directory (logs)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.nodes < 2 or args.entries < 1 or args.samples < 1:
        raise SystemExit("--nodes >= 2, --entries >= 1 and --samples >= 1")
    return harness.run(
        "meshd-bench-registry-",
        lambda root: anyio.run(harness.until_sigterm, lambda: bench(args, root), backend="trio"),
        keep=args.keep,
        as_json=args.json,
        table=print_summary,
    )


if __name__ == "__main__":
    sys.exit(main())
