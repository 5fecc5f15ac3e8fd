"""meshd's durable store on real daemons: write cost, fsync, restart, footprint.

    python -m bench.storage [--json] [--phases writes,fsync,restart,restart-1gb,footprint]

Every daemon is a real ``python -m meshd run`` process (:class:`LocalCluster`, ``local``
profile unless ``--profile``); the in-memory reference is the same daemon with
``--set storage.enabled=false``. Phases (``--phases``, unknown names refused):

1. **writes** — two 3-daemon clusters side by side, one durable, one in memory. A client of
   the first daemon keeps ``--inflight`` ``state.update`` calls in flight
   (``Mesh.state(f"d{i % 100}").update([set k{i % 5} = i], durability)``), ``majority`` then
   ``local``, ``--window`` s each after ``--warmup`` s, for ``--rounds`` rounds; in each round
   the durable and the in-memory window of one durability run back to back (alternating which
   goes first), and a ratio is the median of the per-round ratios (the machine is shared: a
   pair sees the same neighbours). Throughput per side is the median, latencies pooled. The
   durable cluster's metrics endpoints give the daemons' own group-commit latency
   (``meshd_storage_fsync_seconds``: write + fdatasync of one batch, timed around the worker
   thread, so it includes waiting for a thread and for the GIL).
2. **fsync** — ``--fsync-samples`` appends of 200 B followed by ``fdatasync`` (and by
   ``fsync``), and of 64 KiB followed by ``fdatasync``, in the run directory: what a commit
   costs on this machine's disk, alone.
3. **restart** — two daemons a and b. Clients of a register ``--agents`` agents (the bulk
   loader of ``bench.registry``; the sessions stay open, so the entries stay), then
   ``--state-docs`` agent-state documents are written on a (5 fields, ~200 B of values). Once
   b holds all of it (``agents`` count, ``storage`` documents) and has it on disk, b is
   stopped (SIGTERM) and started again: time from spawn until its log says ``store
   recovered``, until it answers ``info`` (the API starts after recovery), until it holds
   every document it held before (``storage`` documents; ``docs.digest`` of the state
   documents identical), and until it resolves every agent again (that needs a to be alive
   in b's membership: it includes rejoining).
4. **restart-1gb** — one daemon; ``--big-docs`` documents of one ``--big-kb`` KB string each
   (default 10,000 × 100 KB ≈ 1 GB), written with ``local`` durability, then a restart as
   above: time until it answers with every document.
5. **footprint** — two single daemons, durable and in memory; ``--footprint-docs``
   agent-state documents (5 fields, ~200 B of values). RSS before and after, disk bytes
   before and after a ``storage.snapshot`` (log compacted into a snapshot).
6. **engines** (not in the default run) — :mod:`bench.storage_engines` in this process.

Every process is started here and ended by its pid (LocalCluster's context manager), on
success, error, Ctrl-C or SIGTERM; every file is under the run directory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import re
import signal
import statistics
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
from rich.console import Console
from rich.table import Table

from bench import harness, registry
from bench.api import Usage, _dist, percentile
from bench.registry import rss_mb
from meshd import __version__ as meshd_version
from meshd.testing.localcluster import Daemon, LocalCluster, free_port
from meshd_client import Mesh
from meshd_client.connection import Connection
from meshd_client.protocol.errors import MeshError

err = Console(stderr=True, soft_wrap=True)

PHASES: Final = ("writes", "fsync", "restart", "restart-1gb", "footprint", "engines")
DEFAULT_PHASES: Final = ("writes", "fsync", "restart", "restart-1gb", "footprint")
MEMORY: Final = "--set=storage.enabled=false"
# metric -> (comparison, limit, what the issue asks)
TARGETS: Final[dict[str, tuple[str, float, str]]] = {
    "majority_throughput_ratio": (">=", 0.5, "majority writes/s, durable / in memory"),
    "majority_p99_ratio": (">=", 0.5, "majority p99, in memory / durable"),
    "local_throughput_ratio": (">=", 0.8, "local writes/s, durable / in memory"),
    "restart_ready_s": ("<", 5.0, "restart to ready, 100k registry entries + 10k documents"),
    "restart_1gb_ready_s": ("<", 30.0, "restart to ready, 1 GB of state"),
    "rss_growth_ratio": ("<=", 0.20, "RSS durable / in memory - 1 (100k documents)"),
}
# report-only figures: where they are in the result
REPORTED: Final = {
    "fsync_p99_ms": "fsync.fdatasync_200B_ms.p99",
    "daemon_commit_p99_ms": "writes.daemon_commit.p99_le_ms",
    "disk_bytes_per_document": "footprint.durable.disk_bytes_per_doc_after_snapshot",
    "disk_bytes_per_registry_entry": "restart.disk_bytes_per_entry",
    "rss_kb_per_document": "footprint.durable.rss_kb_per_doc",
}


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# ---------------------------------------------------------------------------- helpers


def metrics_flag() -> tuple[int, str]:
    port = free_port()
    return port, f"--metrics-bind=127.0.0.1:{port}"


def fsync_buckets(port: int) -> list[tuple[float, int]]:
    """The cumulative buckets of ``meshd_storage_fsync_seconds`` on a daemon's /metrics."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    out: list[tuple[float, int]] = []
    pattern = re.compile(r'^meshd_storage_fsync_seconds_bucket\{le="([^"]+)"\} (\S+)$')
    for line in text.splitlines():
        m = pattern.match(line)
        if m is not None:
            out.append((float(m.group(1)), int(float(m.group(2)))))
    return out


def bucket_quantile(buckets: Sequence[tuple[float, int]], q: float) -> float | None:
    """The upper bound of the bucket holding quantile ``q`` (0..1) of cumulative buckets."""
    if not buckets or buckets[-1][1] == 0:
        return None
    want = q * buckets[-1][1]
    for bound, count in buckets:
        if count >= want:
            return bound
    return buckets[-1][0]


def bucket_delta(
    after: Sequence[tuple[float, int]], before: Sequence[tuple[float, int]]
) -> list[tuple[float, int]]:
    old = dict(before)
    return [(bound, count - old.get(bound, 0)) for bound, count in after]


async def until(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, poll: float = 0.2
) -> float:
    """Poll ``check`` until true; the seconds it took. Raises naming ``what`` at the timeout."""
    t0 = time.monotonic()
    try:
        with anyio.fail_after(timeout):
            while not await check():
                await anyio.sleep(poll)
    except TimeoutError:
        raise RuntimeError(f"{what}: not within {timeout} s") from None
    return time.monotonic() - t0


async def storage(daemon: Daemon, timeout: float = 30.0) -> dict[str, Any]:
    status: dict[str, Any] = await daemon.call("storage", timeout=timeout)
    return status


async def wait_durable(daemon: Daemon, timeout: float) -> dict[str, Any]:
    """Until everything the daemon appended is fsynced; its storage status then."""
    last: dict[str, Any] = {}

    async def synced() -> bool:
        last.update(await storage(daemon))
        return bool(last["durable"] >= last["appended"] and not last["pending_bytes"])

    await until(synced, timeout, f"{daemon.name}: store durable", poll=0.1)
    return last


def agent_doc_ops(i: int) -> list[dict[str, Any]]:
    """Five fields, about 200 bytes of values: an agent's small state (issue 19's shape)."""
    return [
        {"op": "set", "path": ["name"], "value": f"agent-{i:07d}"},
        {"op": "set", "path": ["status"], "value": "running" if i % 3 else "idle"},
        {"op": "set", "path": ["host"], "value": f"host-{i % 97:03d}.example.internal"},
        {"op": "set", "path": ["count"], "value": i},
        {"op": "set", "path": ["note"], "value": f"{i:08d}" + "n" * 132},
    ]


async def write_docs(
    sock: str,
    names: Sequence[str],
    ops: Callable[[int], list[dict[str, Any]]],
    inflight: int,
    *,
    label: str,
) -> dict[str, Any]:
    """``state.update`` of every name (``local`` durability), ``inflight`` calls at a time;
    the per-second rate and failures."""
    failures: Counter[str] = Counter()
    todo = iter(enumerate(names))
    t0 = time.monotonic()

    async def worker(conn: Connection) -> None:
        for i, name in todo:
            try:
                await conn.call("state.update", {"doc": name, "ops": ops(i)}, timeout=120)
            except MeshError as exc:
                failures[exc.kind.value] += 1

    async def progress() -> None:
        while True:
            await anyio.sleep(15)
            err.print(f"[dim]  {label}: {time.monotonic() - t0:.0f} s ...[/dim]")

    async with contextlib.AsyncExitStack() as stack:
        conns = [
            await stack.enter_async_context(
                Connection.open(sock, client=f"bench-{label}", timeout=30)
            )
            for _ in range(min(4, inflight))
        ]
        async with anyio.create_task_group() as tg:
            tg.start_soon(progress)
            async with anyio.create_task_group() as workers:
                for k in range(inflight):
                    workers.start_soon(worker, conns[k % len(conns)])
            tg.cancel_scope.cancel()
    span = time.monotonic() - t0
    done = len(names) - sum(failures.values())
    err.print(f"[dim]{label}: {done} documents written in {span:.1f} s[/dim]")
    return {"written": done, "seconds": round(span, 2), "per_s": round(done / span, 1),
            "failures": dict(failures)}  # fmt: skip


# ---------------------------------------------------------------------------- phase: writes


@dataclass
class Window:
    """One measurement window of one configuration."""

    per_s: float
    latencies: list[float]
    errors: dict[str, int]
    usage: dict[str, Any]


async def write_window(
    mesh: Mesh, pids: dict[str, int], durability: str, args: argparse.Namespace
) -> Window:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    counting = [False]

    async def worker(k: int) -> None:
        i = k
        while True:
            doc = mesh.state(f"d{i % 100}")
            ops = [{"op": "set", "path": [f"k{i % 5}"], "value": i}]
            started = time.perf_counter()
            try:
                await doc.update(ops, durability)  # type: ignore[arg-type]
            except MeshError as exc:
                errors[exc.kind.value] += 1
            else:
                if counting[0]:
                    latencies.append(time.perf_counter() - started)
            i += args.inflight

    usage = Usage(pids)
    async with anyio.create_task_group() as tg:
        for k in range(args.inflight):
            tg.start_soon(worker, k)
        await anyio.sleep(args.warmup)
        counting[0] = True
        usage.begin()
        t0 = time.perf_counter()
        await anyio.sleep(args.window)
        span = time.perf_counter() - t0
        counting[0] = False
        done = len(latencies)
        used = usage.end(done)
        tg.cancel_scope.cancel()
    return Window(done / span, latencies[:done], dict(errors), used)


@dataclass
class Side:
    """One of the two clusters of the writes phase."""

    name: str
    daemons: list[Daemon]
    metrics: dict[str, int] = field(default_factory=dict)
    windows: dict[str, list[Window]] = field(default_factory=dict)


def start_three(cluster: LocalCluster, prefix: str, metrics: bool) -> Side:
    side = Side(prefix, [])
    for i in range(1, 4):
        extra: list[str] = []
        if metrics:
            port, flag = metrics_flag()
            side.metrics[f"{prefix}{i}"] = port
            extra.append(flag)
        seeds = [side.daemons[0].addr] if side.daemons else []
        side.daemons.append(cluster.add(f"{prefix}{i}", seeds=seeds, extra=extra))
    return side


def summarize_side(side: Side, durability: str) -> dict[str, Any]:
    windows = side.windows[durability]
    pooled = [x for w in windows for x in w.latencies]
    errors: Counter[str] = Counter()
    for w in windows:
        errors.update(w.errors)
    median = sorted(windows, key=lambda w: w.per_s)[len(windows) // 2]
    return {
        "per_s": round(statistics.median(w.per_s for w in windows), 1),
        "rounds_per_s": [round(w.per_s, 1) for w in windows],
        "latency_ms": _dist(pooled, 1e3),
        "calls": len(pooled),
        "errors": dict(errors),
        "usage": median.usage,
    }


async def phase_writes(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    with (
        LocalCluster(root / "writes-durable", profile=args.profile) as durable_cluster,
        LocalCluster(root / "writes-memory", profile=args.profile, extra_args=[MEMORY]) as mem,
    ):
        durable = start_three(durable_cluster, "d", metrics=True)
        memory = start_three(mem, "m", metrics=False)
        for cluster in (durable_cluster, mem):
            await cluster.wait_ready(timeout=60)
            await cluster.wait_converged(timeout=60)
        before = {n: await anyio.to_thread.run_sync(fsync_buckets, p)
                  for n, p in durable.metrics.items()}  # fmt: skip
        status_before = {d.name: await storage(d) for d in durable.daemons}
        async with contextlib.AsyncExitStack() as stack:
            meshes = {
                side.name: await stack.enter_async_context(
                    Mesh.connect(side.daemons[0].socket_path, client="bench-writes")
                )
                for side in (durable, memory)
            }
            for rnd in range(args.rounds):
                # Durable and in-memory windows back to back (the pair sees the same
                # neighbours on a shared machine), which one goes first alternating.
                order = (durable, memory) if rnd % 2 == 0 else (memory, durable)
                for durability in ("majority", "local"):
                    for side in order:
                        pids = {d.name: d.pid for d in side.daemons} | {"client": os.getpid()}
                        w = await write_window(meshes[side.name], pids, durability, args)
                        side.windows.setdefault(durability, []).append(w)
                        err.print(
                            f"[dim]round {rnd + 1} {side.name} {durability}: {w.per_s:.0f}/s, "
                            f"p99 {percentile(w.latencies, 99) * 1e3 if w.latencies else 0:.1f}"
                            f" ms, errors {w.errors}[/dim]"
                        )
        after = {n: await anyio.to_thread.run_sync(fsync_buckets, p)
                 for n, p in durable.metrics.items()}  # fmt: skip
        status_after = {d.name: await storage(d) for d in durable.daemons}
        crashed = [d.name for d in [*durable.daemons, *memory.daemons] if not d.running()]
    out: dict[str, Any] = {"durable": {}, "memory": {}, "crashed": crashed}
    for durability in ("majority", "local"):
        out["durable"][durability] = summarize_side(durable, durability)
        out["memory"][durability] = summarize_side(memory, durability)
    # Ratios: the median of the per-round ratios (each pair measured back to back), and
    # the ratio of the medians for comparison.
    for durability in ("majority", "local"):
        pairs = zip(durable.windows[durability], memory.windows[durability], strict=True)
        rounds = [d.per_s / m.per_s for d, m in pairs if m.per_s]
        p99s = [
            percentile(m.latencies, 99) / percentile(d.latencies, 99)
            for d, m in zip(durable.windows[durability], memory.windows[durability], strict=True)
            if d.latencies and m.latencies
        ]
        dd, mm = out["durable"][durability], out["memory"][durability]
        out[f"{durability}_throughput_ratio"] = _r(statistics.median(rounds) if rounds else None)
        out[f"{durability}_throughput_ratio_rounds"] = [round(x, 3) for x in rounds]
        out[f"{durability}_throughput_ratio_of_medians"] = _r(
            dd["per_s"] / mm["per_s"] if mm["per_s"] else None
        )
        out[f"{durability}_p99_ratio"] = _r(statistics.median(p99s) if p99s else None)
        out[f"{durability}_p99_ratio_rounds"] = [round(x, 3) for x in p99s]
    # The daemons' own group commits over the whole phase (durable side; every daemon
    # commits: the writer for its own change, the peers before they ACK).
    total: dict[float, int] = {}
    per_daemon: dict[str, Any] = {}
    for name in durable.metrics:
        delta = bucket_delta(after[name], before[name])
        for bound, count in delta:
            total[bound] = total.get(bound, 0) + count
        commits = status_after[name]["commits"] - status_before[name]["commits"]
        per_daemon[name] = {
            "commits": commits,
            "p50_le_ms": _r((bucket_quantile(delta, 0.5) or 0) * 1e3),
            "p99_le_ms": _r((bucket_quantile(delta, 0.99) or 0) * 1e3),
            "fsync_mean_ms_since_start": status_after[name]["fsync_mean_ms"],
        }
    merged = sorted(total.items())
    out["daemon_commit"] = {
        "what": "meshd_storage_fsync_seconds (write + fdatasync of one group commit, timed "
        "on the event loop around the worker thread), all 3 durable daemons, whole phase; "
        "quantiles are bucket upper bounds",
        "commits": merged[-1][1] if merged else 0,
        "p50_le_ms": _r((bucket_quantile(merged, 0.5) or 0) * 1e3),
        "p99_le_ms": _r((bucket_quantile(merged, 0.99) or 0) * 1e3),
        "buckets": {("+Inf" if b == float("inf") else f"{b}"): c for b, c in merged},
        "by_daemon": per_daemon,
    }
    err.print(
        f"[dim]writes: majority ratio {out['majority_throughput_ratio']} (p99 ratio "
        f"{out['majority_p99_ratio']}), local ratio {out['local_throughput_ratio']}[/dim]"
    )
    return out


# ---------------------------------------------------------------------------- phase: fsync


def phase_fsync(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    directory = root / "fsync"
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    for label, size, sync in (
        ("fdatasync_200B_ms", 200, os.fdatasync),
        ("fsync_200B_ms", 200, os.fsync),
        ("fdatasync_64KiB_ms", 64 << 10, os.fdatasync),
    ):
        path = directory / f"{label}.log"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        data = os.urandom(size)
        latencies: list[float] = []
        try:
            for _ in range(args.fsync_samples):
                os.write(fd, data)
                t0 = time.perf_counter()
                sync(fd)
                latencies.append(time.perf_counter() - t0)
        finally:
            os.close(fd)
            path.unlink()
        out[label] = _dist(latencies, 1e3)
        out[label]["mean"] = _r(statistics.mean(latencies) * 1e3)
        err.print(f"[dim]{label}: {out[label]}[/dim]")
    out["samples"] = args.fsync_samples
    for loop in ("idle", "busy"):
        path = directory / f"thread-{loop}.log"
        inner, outer = trio_run(thread_commits, path, args.fsync_samples // 4, loop == "busy")
        path.unlink()
        out[f"thread_commit_{loop}_loop"] = {
            "in_thread_ms": _dist(inner, 1e3),
            "around_to_thread_ms": _dist(outer, 1e3),
        }
        err.print(f"[dim]to_thread commit, {loop} loop: {out[f'thread_commit_{loop}_loop']}[/dim]")
    out["thread_commit_what"] = (
        "300 B write + fdatasync in trio.to_thread.run_sync, as the daemon's committer does, "
        "timed inside the worker thread and around the call on the loop; 'busy': another task "
        "runs Python code between checkpoints meanwhile (a loaded daemon), so the worker "
        f"thread waits for the GIL (switch interval {sys.getswitchinterval() * 1e3:g} ms)"
    )
    return out


def trio_run(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    return anyio.run(fn, *args, backend="trio")


async def thread_commits(path: Path, samples: int, busy: bool) -> tuple[list[float], list[float]]:
    """Small commits through a worker thread, with the event loop idle or busy."""
    import trio

    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    inner: list[float] = []
    outer: list[float] = []

    def commit() -> None:
        t0 = time.perf_counter()
        os.write(fd, b"x" * 300)
        os.fdatasync(fd)
        inner.append(time.perf_counter() - t0)

    async def spin() -> None:
        while True:
            x = 0
            for i in range(2000):  # some 100 us of Python between checkpoints
                x += i * i
            await trio.lowlevel.checkpoint()

    try:
        async with trio.open_nursery() as nursery:
            if busy:
                nursery.start_soon(spin)
            for _ in range(samples):
                t0 = time.perf_counter()
                await trio.to_thread.run_sync(commit)
                outer.append(time.perf_counter() - t0)
                await trio.sleep(0.002)
            nursery.cancel_scope.cancel()
    finally:
        os.close(fd)
    return inner, outer


# ---------------------------------------------------------------------------- restarts


async def state_digests(daemon: Daemon, prefixes: Sequence[str]) -> dict[str, Any]:
    docs: dict[str, Any] = {}
    for prefix in prefixes:
        found = await daemon.call("docs.digest", {"prefix": prefix}, timeout=60)
        docs |= found["docs"]
    return docs


async def restart(
    daemon: Daemon,
    cluster: LocalCluster,
    expected_docs: int,
    *,
    timeout: float,
    extra: Callable[[], Awaitable[bool]] | None = None,
) -> dict[str, Any]:
    """SIGTERM ``daemon``, start it again, and time what it takes to come back."""
    rss_before = rss_mb(daemon.pid)
    daemon.signal(signal.SIGTERM)
    code = await anyio.to_thread.run_sync(daemon.wait, 60.0)
    if code is None:
        raise RuntimeError(f"{daemon.name} did not stop within 60 s of SIGTERM")
    offset = len(daemon.log_text())
    t0 = time.monotonic()
    daemon.spawn()
    recovered: dict[str, Any] = {}

    async def watch_log() -> None:
        while True:
            text = daemon.log_text()[offset:]
            for line in text.splitlines():
                if 'msg="store recovered"' in line:
                    recovered["at_s"] = round(time.monotonic() - t0, 3)
                    fields = dict(re.findall(r'(\w+)=("[^"]*"|\S+)', line))
                    recovered["log"] = {
                        k: fields.get(k) for k in ("documents", "bytes", "logs", "seconds")
                    }
                    recovered["log"]["snapshot"] = fields.get("snapshot", "").strip('"')
                    return
            await anyio.sleep(0.02)

    out: dict[str, Any] = {"stop_exit_code": code, "rss_mb_before": _r(rss_before, 1)}
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_log)
        await cluster.wait_answering(daemon, timeout=timeout)
        answered = time.monotonic() - t0
        status = await storage(daemon)
        docs_at_answer = status["documents"]
        if docs_at_answer < expected_docs:
            with anyio.fail_after(timeout):
                while (await storage(daemon))["documents"] < expected_docs:
                    await anyio.sleep(0.02)
        all_docs = time.monotonic() - t0
        out["extra_s"] = None
        if extra is not None:
            await until(extra, timeout, f"{daemon.name}: after restart", poll=0.05)
            out["extra_s"] = round(time.monotonic() - t0, 3)
        with anyio.fail_after(30):
            while "at_s" not in recovered:
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    out |= {
        "answered_s": round(answered, 3),
        "all_documents_s": round(all_docs, 3),
        "documents_at_first_answer": docs_at_answer,
        "documents_expected": expected_docs,
        "store_recovered_line_s": recovered.get("at_s"),
        "store_recovered": recovered.get("log"),
        "rss_mb_after": _r(rss_mb(daemon.pid), 1),
        "rss_peak_mb_after": _r(rss_mb(daemon.pid, "VmHWM"), 1),
    }
    return out


async def restarts(
    daemon: Daemon,
    cluster: LocalCluster,
    expected_docs: int,
    count: int,
    *,
    timeout: float,
    extra: Callable[[], Awaitable[bool]] | None = None,
) -> dict[str, Any]:
    """``count`` restarts in a row: the last one's details, every run's key times, and the
    median (the machine is shared: one restart can be slowed by a neighbour)."""
    runs = [
        await restart(daemon, cluster, expected_docs, timeout=timeout, extra=extra)
        for _ in range(count)
    ]
    out = dict(runs[-1])
    for key in ("answered_s", "all_documents_s", "store_recovered_line_s", "extra_s"):
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = round(statistics.median(values), 3) if values else None
        out[f"{key}_runs"] = values
    out["recovery_seconds_runs"] = [
        float(r["store_recovered"]["seconds"]) for r in runs if r.get("store_recovered")
    ]
    out["restarts"] = count
    return out


async def phase_restart(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    with LocalCluster(root / "restart", profile=args.profile) as cluster:
        port, flag = metrics_flag()
        a = cluster.add("a", extra=[flag])
        b = cluster.add("b", seeds=[a.addr])
        await cluster.wait_ready(timeout=60)
        await cluster.wait_converged(timeout=60)
        async with contextlib.AsyncExitStack() as stack:
            # The registry's bulk loader, all sessions on a and kept open (entries live as
            # long as their session).
            bulk_args = argparse.Namespace(
                entries=args.agents, conns=4, inflight=8, timeout=args.timeout
            )
            reg = registry.Run(bulk_args, cluster, random.Random(0))
            reg.nodes = [registry.Node(a, port)]
            await registry.bulk(reg, stack, expected=args.agents)
            names = [f"agent:rs-{i:06d}" for i in range(args.state_docs)]
            written = await write_docs(
                a.socket_path, names, agent_doc_ops, args.load_inflight, label="restart docs"
            )
            expected = args.state_docs + 2  # + reg/a, reg/b

            async def b_holds_all() -> bool:
                count = (await b.call("agents", {"limit": 0}, timeout=60))["count"]
                return bool(count >= args.agents and (await storage(b))["documents"] >= expected)

            synced_s = await until(b_holds_all, args.timeout, "b holds every entry and document")
            status = await wait_durable(b, 60)
            prefixes = [f"state/agent:rs-{k:02d}" for k in range(100)]
            digest_before = await state_digests(b, prefixes)

            async def agents_back() -> bool:
                count = (await b.call("agents", {"limit": 0}, timeout=60))["count"]
                return bool(count >= args.agents)

            out = await restarts(b, cluster, status["documents"], args.restarts,
                                 timeout=args.timeout, extra=agents_back)  # fmt: skip
            digest_after = await state_digests(b, prefixes)
            out["state_identical_after_restart"] = digest_after == digest_before
            out["agents_resolved_s"] = out.pop("extra_s")
            out["agents_resolved_s_runs"] = out.pop("extra_s_runs")
        crashed = [d.name for d in cluster.daemons.values() if not d.running()]
    entries = args.agents + args.state_docs
    out |= {
        "agents": args.agents,
        "state_docs": args.state_docs,
        "registrations_per_s": reg.result.get("registrations_per_s_api"),
        "state_docs_written": written,
        "b_synced_s": round(synced_s, 2),
        "b_store_before_restart": {
            k: status[k]
            for k in ("documents", "disk_bytes", "snapshot_bytes", "log_bytes", "generation")
        },
        "disk_bytes_per_entry": round(status["disk_bytes"] / entries, 1),
        "crashed": crashed,
        # ready = answers and holds every document it held before, from its own disk
        "restart_ready_s": out["all_documents_s"],
    }
    err.print(
        f"[dim]restart: answered {out['answered_s']} s, all documents {out['all_documents_s']} s"
        f", agents resolved {out['agents_resolved_s']} s, 'store recovered' at "
        f"{out['store_recovered_line_s']} s ({out['store_recovered']})[/dim]"
    )
    return out


async def phase_restart_big(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    blob = os.urandom(args.big_kb * 512).hex()  # args.big_kb KB of text, not compressible

    def big_ops(i: int) -> list[dict[str, Any]]:
        return [{"op": "set", "path": ["blob"], "value": f"{i:08d}{blob}"[: args.big_kb * 1024]}]

    with LocalCluster(root / "restart-big", profile=args.profile) as cluster:
        s = cluster.add("s")
        await cluster.wait_ready(timeout=60)
        names = [f"agent:big-{i:06d}" for i in range(args.big_docs)]
        written = await write_docs(s.socket_path, names, big_ops, 4, label="restart-1gb docs")
        status = await wait_durable(s, 300)
        out = await restarts(s, cluster, status["documents"], args.restarts, timeout=args.timeout)
        del out["extra_s"], out["extra_s_runs"]
        crashed = [d.name for d in cluster.daemons.values() if not d.running()]
    out |= {
        "documents": args.big_docs,
        "document_kb": args.big_kb,
        "state_bytes": args.big_docs * args.big_kb * 1024,
        "written": written,
        "store_before_restart": {
            k: status[k]
            for k in ("documents", "disk_bytes", "snapshot_bytes", "log_bytes", "generation")
        },
        "crashed": crashed,
        "restart_1gb_ready_s": out["all_documents_s"],
    }
    err.print(
        f"[dim]restart-1gb ({out['state_bytes'] / 1e6:.0f} MB): all documents after "
        f"{out['all_documents_s']} s, 'store recovered' {out['store_recovered']}[/dim]"
    )
    return out


# ---------------------------------------------------------------------------- footprint


async def footprint_one(args: argparse.Namespace, root: Path, durable: bool) -> dict[str, Any]:
    label = "durable" if durable else "memory"
    extra = [] if durable else [MEMORY]
    with LocalCluster(root / f"footprint-{label}", profile=args.profile, extra_args=extra) as c:
        d = c.add("f")
        await c.wait_ready(timeout=60)
        await anyio.sleep(args.settle)
        rss_base = rss_mb(d.pid)
        names = [f"agent:fp-{i:07d}" for i in range(args.footprint_docs)]
        written = await write_docs(d.socket_path, names, agent_doc_ops, args.load_inflight,
                                   label=f"footprint {label}")  # fmt: skip
        out: dict[str, Any] = {"written": written}
        if durable:
            status = await wait_durable(d, 120)
            out["disk_bytes_before_snapshot"] = status["disk_bytes"]
            out["log_bytes_before_snapshot"] = status["log_bytes"]
            out["snapshots_before"] = status["snapshots"]
        await anyio.sleep(args.settle)
        rss = rss_mb(d.pid)
        out["rss_mb_base"] = _r(rss_base, 1)
        out["rss_mb"] = _r(rss, 1)
        out["rss_peak_mb"] = _r(rss_mb(d.pid, "VmHWM"), 1)
        if rss is not None and rss_base is not None:
            out["rss_kb_per_doc"] = round((rss - rss_base) * 1024 / args.footprint_docs, 3)
        if durable:
            t0 = time.monotonic()
            status = await d.call("storage.snapshot", timeout=300)
            out["snapshot_s"] = round(time.monotonic() - t0, 2)
            out["disk_bytes_after_snapshot"] = status["disk_bytes"]
            out["snapshot_bytes"] = status["snapshot_bytes"]
            out["disk_bytes_per_doc_before_snapshot"] = round(
                out["disk_bytes_before_snapshot"] / args.footprint_docs, 1
            )
            out["disk_bytes_per_doc_after_snapshot"] = round(
                status["disk_bytes"] / args.footprint_docs, 1
            )
            await anyio.sleep(args.settle)
            out["rss_mb_after_snapshot"] = _r(rss_mb(d.pid), 1)
            out["rss_peak_mb_after_snapshot"] = _r(rss_mb(d.pid, "VmHWM"), 1)
        out["documents"] = (await storage(d))["documents"]
        out["crashed"] = not d.running()
    err.print(f"[dim]footprint {label}: {out}[/dim]")
    return out


async def phase_footprint(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    memory = await footprint_one(args, root, durable=False)
    durable = await footprint_one(args, root, durable=True)
    out: dict[str, Any] = {"documents": args.footprint_docs, "durable": durable, "memory": memory}
    if durable.get("rss_mb") and memory.get("rss_mb"):
        out["rss_growth_ratio"] = round(durable["rss_mb"] / memory["rss_mb"] - 1, 3)
    return out


# ---------------------------------------------------------------------------- main


def run_phase(name: str, fn: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    err.print(f"[bold]phase {name}[/bold]")
    t0 = time.monotonic()
    out: dict[str, Any] = anyio.run(fn, backend="trio")
    out["phase_s"] = round(time.monotonic() - t0, 1)
    return out


def bench(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    phases = args.phases.split(",")
    load_start = os.getloadavg()[0]
    result: dict[str, Any] = {"phases": phases}
    if "writes" in phases:
        result["writes"] = run_phase("writes", lambda: phase_writes(args, root))
    if "fsync" in phases:
        err.print("[bold]phase fsync[/bold]")
        result["fsync"] = phase_fsync(args, root)
    if "restart" in phases:
        result["restart"] = run_phase("restart", lambda: phase_restart(args, root))
    if "restart-1gb" in phases:
        result["restart-1gb"] = run_phase("restart-1gb", lambda: phase_restart_big(args, root))
    if "footprint" in phases:
        result["footprint"] = run_phase("footprint", lambda: phase_footprint(args, root))
    if "engines" in phases:
        from bench import storage_engines

        err.print("[bold]phase engines[/bold]")
        eng_args = storage_engines._parser().parse_args(["--seconds", str(args.engine_seconds)])
        result["engines"] = storage_engines.bench(eng_args, root / "engines")
    result["targets"] = targets(result)
    result["reported"] = {k: _lookup(result, path) for k, path in REPORTED.items()}
    result["method"] = {
        "meshd_version": meshd_version,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_1m_start": round(load_start, 2),
        "loadavg_1m_end": round(os.getloadavg()[0], 2),
        "profile": args.profile,
        "in_memory_reference": "the same daemon with --set storage.enabled=false",
        "writes": f"3 + 3 daemons side by side; {args.inflight} state.update calls in flight "
        f"from one client (this process) on the first daemon; {args.rounds} rounds of "
        f"{args.window} s per configuration after {args.warmup} s warm-up, durable and in "
        "memory back to back; ratios are the median of the per-round ratios (p99 ratio: in "
        "memory / durable per round); throughput medians and pooled latencies per side",
        "restart": f"{args.agents} registrations on a + {args.state_docs} agent-state "
        "documents; b (holding a's registry document and the state) restarted with SIGTERM "
        f"{args.restarts} times (median); ready = from spawn until it answers and holds every "
        "document it held (storage op documents)",
        "restart-1gb": f"{args.big_docs} documents x {args.big_kb} KB (one string each), one "
        f"daemon, restarted with SIGTERM {args.restarts} times (median)",
        "footprint": f"{args.footprint_docs} agent-state documents (5 fields, ~200 B) on one "
        f"daemon, durable vs in memory; RSS after {args.settle} s idle",
    }
    return result


def _lookup(result: dict[str, Any], path: str) -> Any:
    value: Any = result
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """Every target this run measured: value, limit, met (honestly: a miss is a miss)."""
    found = {
        "majority_throughput_ratio": _lookup(result, "writes.majority_throughput_ratio"),
        "majority_p99_ratio": _lookup(result, "writes.majority_p99_ratio"),
        "local_throughput_ratio": _lookup(result, "writes.local_throughput_ratio"),
        "restart_ready_s": _lookup(result, "restart.restart_ready_s"),
        "restart_1gb_ready_s": _lookup(result, "restart-1gb.restart_1gb_ready_s"),
        "rss_growth_ratio": _lookup(result, "footprint.rss_growth_ratio"),
    }
    out: dict[str, Any] = {}
    for key, value in found.items():
        if value is None:
            continue
        op, limit, what = TARGETS[key]
        met = value >= limit if op == ">=" else value < limit if op == "<" else value <= limit
        entry: dict[str, Any] = {"value": value, "target": f"{op} {limit}", "met": met,
                                 "what": what}  # fmt: skip
        if key == "restart_1gb_ready_s":
            state = _lookup(result, "restart-1gb.state_bytes") or 0
            if state < 1e9:
                entry["met"] = None
                entry["note"] = f"ran {state / 1e6:.0f} MB, not 1 GB (--big-docs/--big-kb)"
        if key == "restart_ready_s":
            ran = (_lookup(result, "restart.agents"), _lookup(result, "restart.state_docs"))
            if ran[0] < 100_000 or ran[1] < 10_000:
                entry["met"] = None
                entry["note"] = f"ran {ran[0]} agents + {ran[1]} documents: not judged"
        out[key] = entry
    return out


def print_summary(result: dict[str, Any]) -> None:
    console = Console()
    table = Table(title="meshd durable store", title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    for t in result["targets"].values():
        mark = {True: "✓", False: "✗ missed", None: "(not judged)"}[t["met"]]
        table.add_row(t["what"], str(t["value"]), f"{t['target']} {mark}")
    for key, value in result["reported"].items():
        table.add_row(key, str(value), "report")
    console.print(table)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.storage",
        description="meshd durable store: write cost vs in memory, fsync, restart, footprint",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--phases", default=",".join(DEFAULT_PHASES),
                   help=f"comma-separated subset of {','.join(PHASES)}")  # fmt: skip
    p.add_argument("--profile", default="local", help="meshd profile (local)")
    p.add_argument("--inflight", type=int, default=32, help="writes: calls in flight")
    p.add_argument("--window", type=float, default=3.0, help="writes: seconds measured")
    p.add_argument("--warmup", type=float, default=1.0, help="writes: seconds before")
    p.add_argument("--rounds", type=int, default=5, help="writes: alternating rounds")
    p.add_argument("--fsync-samples", type=int, default=1000)
    p.add_argument("--agents", type=int, default=100_000, help="restart: registrations")
    p.add_argument("--state-docs", type=int, default=10_000, help="restart: state documents")
    p.add_argument("--big-docs", type=int, default=10_000, help="restart-1gb: documents")
    p.add_argument("--big-kb", type=int, default=100, help="restart-1gb: KB per document")
    p.add_argument("--restarts", type=int, default=3, help="restarts per restart phase")
    p.add_argument("--footprint-docs", type=int, default=100_000)
    p.add_argument("--load-inflight", type=int, default=32, help="bulk loads: calls in flight")
    p.add_argument("--settle", type=float, default=2.0, help="idle seconds before RSS")
    p.add_argument("--engine-seconds", type=float, default=2.0, help="engines: per config")
    p.add_argument("--timeout", type=float, default=600.0, help="limit of every wait")
    p.add_argument("--keep", action="store_true", help="keep the run directory (logs)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.phases = ",".join(harness.subset("--phases", args.phases, PHASES))
    harness.interrupt_on_sigterm()  # (several event loops run in turn here)
    return harness.run(
        "meshd-bench-storage-",
        lambda root: bench(args, root),
        keep=args.keep,
        as_json=args.json,
        table=print_summary,
    )


if __name__ == "__main__":
    sys.exit(main())
