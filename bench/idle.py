"""Idle cost: CPU used by idle daemons.

    python -m bench.idle --json [--nodes 32] [--settle 30] [--window 30] [--profile lan]

Starts N real meshd processes on loopback (the ``lan`` profile by default: memberlist's
timers, the cost a production cluster pays), waits until they converged and settled (joins,
initial anti-entropy and push-pull done), then reads each process's CPU time
(``/proc/<pid>/stat`` utime + stime) at the start and the end of a window with no client
traffic. Reports per-daemon CPU as a share of one core: median, max, and the total. The
target (brief): each idle daemon uses < 2 % of a core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from meshd.testing.localcluster import LocalCluster

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # fields[11] and [12] are utime and stime (fields 14 and 15 of the full line).
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def measure(nodes: int, settle: float, window: float, profile: str) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="meshd-bench-idle-"))
    with LocalCluster(root, profile=profile) as cluster:
        started = time.monotonic()
        cluster.start_many(nodes)
        await cluster.wait_ready(timeout=120)
        await cluster.wait_converged(timeout=120)
        converged = time.monotonic() - started
        await anyio.sleep(settle)
        pids = {d.name: d.pid for d in cluster.running()}
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        t0 = time.monotonic()
        await anyio.sleep(window)
        elapsed = time.monotonic() - t0
        after = {name: cpu_seconds(pid) for name, pid in pids.items()}
        shares = {name: (after[name] - before[name]) / elapsed for name in pids}
        rss = {name: rss_mb(pid) for name, pid in pids.items()}
        alive = await cluster.converged(set(pids))
    values = sorted(shares.values())
    return {
        "nodes": nodes,
        "profile": profile,
        "settle_s": settle,
        "window_s": round(elapsed, 2),
        "converge_s": round(converged, 2),
        "still_converged": alive,
        "cpu_share_median": round(statistics.median(values), 5),
        "cpu_share_max": round(values[-1], 5),
        "cpu_share_total": round(sum(values), 4),
        "cpu_percent_median": round(100 * statistics.median(values), 3),
        "cpu_percent_max": round(100 * values[-1], 3),
        "rss_mb_median": round(statistics.median(rss.values()), 1),
        "target_percent": 2.0,
        "meets_target": values[-1] < 0.02,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=32)
    parser.add_argument("--settle", type=float, default=30.0)
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--profile", default="lan")
    parser.add_argument("--json", action="store_true")
    ns = parser.parse_args()
    result = anyio.run(measure, ns.nodes, ns.settle, ns.window, ns.profile)
    if ns.json:
        print(json.dumps(result))
        return
    print(f"{result['nodes']} idle daemons ({result['profile']}), {result['window_s']} s window:")
    print(
        f"  CPU per daemon: median {result['cpu_percent_median']} % of a core, "
        f"max {result['cpu_percent_max']} % (target < 2 %)"
    )
    print(f"  RSS per daemon: median {result['rss_mb_median']} MB")


if __name__ == "__main__":
    main()
