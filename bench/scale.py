"""Replication at scale on real daemons: writes, convergence, memory, idle cost, a join.

    python -m bench.scale [--json] [--sizes 10000,100000] [--large] [--nodes 3]

For each N (``--sizes``; ``--large`` adds 1,000,000), a fresh cluster of ``--nodes`` meshd
daemons on loopback (``lan`` profile, default storage, metrics on):

1. **Writes.** One client session per daemon writes N state documents ``d000000``…
   (5 fields of 40 bytes: about 200 bytes each), ``--inflight`` calls in flight in all,
   spread over the daemons. ``write_per_s``: N / time until every call returned.
2. **Convergence.** ``all_hold_s``: from the first write until every daemon's
   ``meshd_documents{kind="state"}`` is N (polled every 0.25 s).
3. **Memory.** ``rss_kb_per_doc``: (VmRSS after convergence − VmRSS of the same daemon
   before the writes) / N, the median over daemons.
4. **Idle.** For ``--idle`` seconds nothing is written: ``idle_cpu_pct`` is each daemon's
   user+system CPU time over that window (% of one core, the maximum over daemons);
   ``idle_round_bytes``: bytes of anti-entropy messages sent per round started
   (``meshd_replication_round_sent_bytes_total`` / ``…rounds_started_total``, over the
   window, all daemons together).
5. **Join.** A fresh daemon seeded with n1: ``join_s`` from its spawn until its
   ``meshd_documents{kind="state"}`` is N; ``join_peak_rss_mb`` its VmHWM then;
   ``join_repair_updates``: repair updates it received (N means it was filled once).
6. **False suspicions.** Nobody is killed: every suspicion and death verdict counted by the
   daemons (``info`` stats) during the writes and the join is a false one.
7. **Memory after serving a join.** ``served_rss_growth_pct``: ``--settle`` seconds (60)
   after the joiner held everything, the largest growth of an established daemon's VmRSS
   over its VmRSS just before the joiner was spawned, in % (target: within 5 %).

The machine's load average at start and end is in ``method``: other work skews every number.
Every process is started here and ended by its pid.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import statistics
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.table import Table

from bench import harness
from meshd import __version__ as meshd_version
from meshd.testing.localcluster import Daemon, LocalCluster, free_port
from meshd_client.connection import Connection
from meshd_client.protocol.errors import MeshError

err = Console(stderr=True, soft_wrap=True)
SAMPLE = re.compile(r"^([a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$")
FIELD = "x" * 40
TARGETS = {
    "join_s@100000": 5.0,
    "rss_kb_per_doc": 1.5,
    "idle_cpu_pct@1000000": 2.0,
    "served_rss_growth_pct": 5.0,
}


def metrics(port: int) -> dict[str, float]:
    """Every sample of a daemon's /metrics page, labels kept in the key."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        found = SAMPLE.match(line)
        if found:
            out[found.group(1) + (found.group(2) or "")] = float(found.group(3))
    return out


async def scrape(port: int) -> dict[str, float]:
    return await anyio.to_thread.run_sync(metrics, port)


def proc_status(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        parts = stat.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


async def state_docs(port: int) -> int:
    return int((await scrape(port)).get('meshd_documents{kind="state"}', 0))


async def suspicions(daemons: Sequence[Daemon]) -> int:
    total = 0
    for daemon in daemons:
        with contextlib.suppress(MeshError):
            stats = (await daemon.call("info", timeout=60))["stats"]
            total += stats["suspicions"] + stats["deaths"]
    return total


@contextlib.asynccontextmanager
async def spying(out_dir: str | None, n: int, daemons: Sequence[Daemon]) -> Any:
    """With ``--spy DIR``: sample every daemon with py-spy (on PATH) while the block runs,
    one collapsed-stack file per daemon (``DIR/join-<N>-<name>.txt``)."""
    if not out_dir:
        yield
        return
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    spies = [
        await anyio.open_process(
            [
                "py-spy",
                "record",
                "--pid",
                str(d.pid),
                "--format",
                "raw",
                "--rate",
                "200",
                "--output",
                str(Path(out_dir) / f"join-{n}-{d.name}.txt"),
            ]
        )
        for d in daemons
    ]
    try:
        yield
    finally:
        for spy in spies:
            spy.send_signal(2)  # SIGINT: py-spy writes what it sampled and exits
        with anyio.move_on_after(30):
            for spy in spies:
                await spy.wait()


async def one_size(args: argparse.Namespace, root: Path, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"n": n}
    with LocalCluster(root / f"n{n}", profile=args.profile) as cluster:
        ports: dict[str, int] = {}

        def add(name: str, seeds: Sequence[str] = ()) -> Daemon:
            ports[name] = free_port()
            return cluster.add(name, seeds=seeds, extra=[f"--metrics-bind=127.0.0.1:{ports[name]}"])

        first = add("n1")
        daemons = [first] + [add(f"n{i}", [first.addr]) for i in range(2, args.nodes + 1)]
        await cluster.wait_ready(timeout=120)
        await cluster.wait_converged(timeout=120)
        await anyio.sleep(2.0)
        rss_before = {d.name: proc_status(d.pid, "VmRSS") for d in daemons}
        suspected = await suspicions(daemons)

        # 1-2. writes and convergence
        t0 = time.monotonic()
        async with contextlib.AsyncExitStack() as stack:
            conns = [
                await stack.enter_async_context(
                    Connection.open(d.socket_path, client="bench-scale", timeout=60)
                )
                for d in daemons
            ]
            next_doc = 0

            async def writer() -> None:
                nonlocal next_doc
                while next_doc < n:
                    i = next_doc
                    next_doc += 1
                    ops = [{"op": "set", "path": [f"f{k}"], "value": FIELD} for k in range(5)]
                    await conns[i % len(conns)].call(
                        "state.update", {"doc": f"d{i:07d}", "ops": ops}, timeout=120
                    )

            async with anyio.create_task_group() as tg:
                for _ in range(args.inflight):
                    tg.start_soon(writer)
        written = time.monotonic() - t0
        out["write_per_s"] = round(n / written, 1)
        with anyio.fail_after(args.timeout):
            while True:
                held = [await state_docs(ports[d.name]) for d in daemons]
                if min(held) >= n:
                    break
                await anyio.sleep(0.25)
        out["all_hold_s"] = round(time.monotonic() - t0, 2)
        out["write_suspicions"] = await suspicions(daemons) - suspected
        await anyio.sleep(2.0)
        per_doc = [(proc_status(d.pid, "VmRSS") - rss_before[d.name]) * 1024 / n for d in daemons]
        out["rss_kb_per_doc"] = round(statistics.median(per_doc), 2)
        out["rss_mb"] = round(max(proc_status(d.pid, "VmRSS") for d in daemons), 1)

        # 4. idle
        before = {d.name: (cpu_seconds(d.pid), await scrape(ports[d.name])) for d in daemons}
        i0 = time.monotonic()
        await anyio.sleep(args.idle)
        span = time.monotonic() - i0
        cpu, sent, rounds = [], 0.0, 0.0
        for d in daemons:
            page = await scrape(ports[d.name])
            cpu.append((cpu_seconds(d.pid) - before[d.name][0]) / span * 100)
            key_b, key_r = (
                "meshd_replication_round_sent_bytes_total",
                "meshd_replication_rounds_started_total",
            )
            sent += page.get(key_b, 0) - before[d.name][1].get(key_b, 0)
            rounds += page.get(key_r, 0) - before[d.name][1].get(key_r, 0)
        out["idle_cpu_pct"] = round(max(cpu), 2)
        out["idle_round_bytes"] = round(sent / rounds, 1) if rounds else None

        # 5-6. join
        suspected = await suspicions(daemons)
        served_before = {d.name: proc_status(d.pid, "VmRSS") for d in daemons}
        t0 = time.monotonic()
        fresh = add(f"n{args.nodes + 1}", [first.addr])
        async with spying(args.spy, n, [*daemons, fresh]):
            await cluster.wait_answering(fresh, timeout=60)
            with anyio.fail_after(args.timeout):
                while await state_docs(ports[fresh.name]) < n:
                    await anyio.sleep(0.1)
        out["join_s"] = round(time.monotonic() - t0, 2)
        out["join_peak_rss_mb"] = round(proc_status(fresh.pid, "VmHWM"), 1)
        page = await scrape(ports[fresh.name])
        out["join_repair_updates"] = int(
            page.get("meshd_replication_repair_updates_received_total", 0)
        )
        detail = {}
        for d in [*daemons, fresh]:
            page = await scrape(ports[d.name])
            detail[d.name] = {
                k: int(page.get(f"meshd_replication_{k}_total", 0))
                for k in (
                    "rounds_completed",
                    "rounds_busy",
                    "rounds_failed",
                    "pages_sent",
                    "pages_received",
                    "repair_updates_sent",
                    "frames_dropped",
                )
            }
        out["join_replication"] = detail
        await anyio.sleep(2.0)
        out["join_suspicions"] = await suspicions([*daemons, fresh]) - suspected

        # 7. memory after serving the join
        if args.settle > 0:
            await anyio.sleep(args.settle)
            growth = [
                (proc_status(d.pid, "VmRSS") / served_before[d.name] - 1) * 100 for d in daemons
            ]
            out["served_rss_growth_pct"] = round(max(growth), 1)
        out["crashed"] = [d.name for d in cluster.daemons.values() if not d.running()]
    return out


async def bench(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    load_start = os.getloadavg()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.large:
        sizes.append(1_000_000)
    runs = []
    for n in sizes:
        err.print(f"[dim]N = {n:,}[/dim]")
        runs.append(await one_size(args, root, n))
        err.print(f"[dim]{runs[-1]}[/dim]")
    return {
        "nodes": args.nodes,
        "profile": args.profile,
        "runs": runs,
        "targets": TARGETS,
        "method": {
            "meshd_version": meshd_version,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_1m_start": round(load_start[0], 2),
            "loadavg_1m_end": round(os.getloadavg()[0], 2),
            "inflight": args.inflight,
            "idle_window_s": args.idle,
            "doc": "5 fields of 40 bytes",
        },
    }


def print_summary(result: dict[str, Any]) -> None:
    table = Table(title=f"scale: {result['nodes']} daemons", title_justify="left")
    keys = [k for k in result["runs"][0] if k != "crashed"]
    for key in keys:
        table.add_column(key, justify="right")
    for run in result["runs"]:
        table.add_row(*(str(run.get(k)) for k in keys))
    Console().print(table)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--sizes", default="10000,100000", help="comma-separated document counts")
    p.add_argument("--large", action="store_true", help="also 1,000,000 documents")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--profile", default="lan")
    p.add_argument("--inflight", type=int, default=64)
    p.add_argument("--idle", type=float, default=10.0, help="idle window (s)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument(
        "--settle", type=float, default=60.0, help="wait after the join before step 7 (s)"
    )
    p.add_argument("--keep", action="store_true", help="keep the run directory (logs)")
    p.add_argument(
        "--spy", metavar="DIR", help="profile every daemon during the join with py-spy (on PATH)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return harness.run(
        "meshd-bench-scale-",
        lambda root: anyio.run(harness.until_sigterm, lambda: bench(args, root), backend="trio"),
        keep=args.keep,
        as_json=args.json,
        table=print_summary,
    )


if __name__ == "__main__":
    sys.exit(main())
