"""After the heal: look at the cluster from every host and write down what is there.

The collector only *observes* (and records into the history); it judges nothing. The
checker then decides from those records alone. Waiting is part of observing: membership is
polled from the moment of the heal until every daemon reports the same view (the time it
took is the convergence time the verdict reports), document digests until they agree, and
duplicate names until they have settled — each with a bound, after which the collector
records what it saw last and lets the checker fail it.

It also *tests the counters*: it sends a known number of junk datagrams of known kinds to
every daemon from the controller address (exempt from the fault rules, so all of them
arrive) and records the rejection counters before and after, so the checker can require
that the daemon counted exactly those it was sent — besides the identity that every UDP
datagram a daemon received was either handled or counted as rejected with a reason.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio

from chaos.cluster import Cluster, call
from chaos.history import History
from chaos.workload import LOCAL_DOC, MAJORITY_DOC, Workload, counter_agent
from meshd_client.protocol.errors import MeshError

# Junk datagrams the collector sends, by the rejection reason each must be counted under.
JUNK: dict[str, Callable[[], bytes]] = {
    "unknown_mode": lambda: b"\x7f" + os.urandom(40),
    "malformed": lambda: b"\x01" + os.urandom(8),
    "plaintext_refused": lambda: b"\x00\x05chaos" + os.urandom(16),
}
JUNK_PER_REASON = 5
# How long a daemon may take, after the space came back, to trust its disk again: it retries
# a snapshot with back-off (0.5 s doubling up to 30 s, meshd/storage/driver.py), so up to
# 30 s plus one snapshot.
DISK_RECOVERY_BOUND = 45.0
DISK_POLL = 0.25
DISK_MAX_FULL = 600.0  # a watcher gives up on a disk nobody frees (the final heal does)
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Poll = Callable[[], Awaitable[tuple[bool, Any]]]


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text exposition -> (name, labels, value) samples."""
    out: list[tuple[str, dict[str, str], float]] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line.strip())
        if m is None:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        out.append((m.group(1), labels, float(m.group(3))))
    return out


def counters_of(samples: list[tuple[str, dict[str, str], float]]) -> dict[str, Any]:
    """What the checker needs from one scrape: UDP datagrams in, datagrams the membership
    layer handled, and every rejection counter by ``layer/reason``."""
    out: dict[str, Any] = {"udp_in": 0, "handled_in": 0, "rejected": {}}
    for name, labels, value in samples:
        if name == "meshd_transport_udp_packets_in_total":
            out["udp_in"] = int(value)
        elif name == "meshd_membership_packets_in_total":
            out["handled_in"] = int(value)
        elif name == "meshd_rejected_total":
            out["rejected"][f"{labels.get('layer')}/{labels.get('reason')}"] = int(value)
    return out


async def scrape(addr: str, port: int, timeout: float = 5.0) -> str:
    """GET /metrics over plain HTTP/1.1 (the daemon closes the connection after it)."""
    with anyio.fail_after(timeout):
        async with await anyio.connect_tcp(addr, port) as stream:
            request = f"GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            await stream.send(request.encode())
            chunks = []
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while True:
                    chunks.append(await stream.receive())
    raw = b"".join(chunks).decode(errors="replace")
    head, _, body = raw.partition("\r\n\r\n")
    if not head.startswith("HTTP/1.1 200"):
        raise OSError(f"metrics scrape of {addr}:{port}: {head.splitlines()[:1]}")
    return body


async def poll_until(poll: Poll, bound: float, interval: float = 0.25) -> tuple[bool, float, Any]:
    """Call ``poll`` until it reports done or ``bound`` seconds passed: (done, elapsed, last)."""
    start = time.monotonic()
    last: Any = None
    while True:
        done, last = await poll()
        elapsed = time.monotonic() - start
        if done or elapsed >= bound:
            return done, elapsed, last
        await anyio.sleep(interval)


def _running(cluster: Cluster) -> list[str]:
    return [h for h in cluster.hosts if cluster.backend.daemon_running(h)]


async def membership_views(cluster: Cluster) -> dict[str, Any]:
    views: dict[str, Any] = {}
    for host in _running(cluster):
        try:
            members = await call(cluster, host, "members", timeout=2.0)
            views[host] = {m["name"]: [m["status"], m["incarnation"]] for m in members}
        except MeshError as exc:
            views[host] = {"error": exc.kind.value}
    return views


def views_agree(views: dict[str, Any], alive: list[str]) -> bool:
    """One view on every daemon, in which exactly the running daemons are alive."""
    if not views or any("error" in v for v in views.values()) or set(views) != set(alive):
        return False
    first = next(iter(views.values()))
    if any(v != first for v in views.values()):
        return False
    return {m for m, (status, _) in first.items() if status == "alive"} == set(alive)


async def watch_convergence(
    cluster: Cluster, history: History, bound: float, *, after: str = "heal"
) -> None:
    """From now (a heal, a resume, a restart) until every daemon reports the same view.

    Cancelled before that (the schedule moved on to its next fault), it records the
    measurement as interrupted, which the checker does not judge.
    """
    t_heal = history.now()
    last: Any = {}
    done = False
    try:

        async def poll() -> tuple[bool, Any]:
            nonlocal last
            alive = _running(cluster)
            views = await membership_views(cluster)
            last = {"views": views, "alive": alive}
            return views_agree(views, alive), last

        done, _, last = await poll_until(poll, bound)
    finally:
        history.add(
            "observe",
            what="convergence",
            after=after,
            since=t_heal,
            converged=done,
            interrupted=not done and history.now() - t_heal < bound,
            elapsed=round(history.now() - t_heal, 3),
            bound=bound,
            **last,
        )


async def storage_status(cluster: Cluster, host: str) -> dict[str, Any]:
    """The ``storage`` op of one daemon: what the checker needs of it."""
    try:
        s = await call(cluster, host, "storage", timeout=2.0)
    except MeshError as exc:
        return {"error": exc.kind.value}
    keys = ("enabled", "healthy", "failure", "failures", "dropped_records", "snapshots")
    return {k: s.get(k) for k in keys}


async def watch_disk(
    cluster: Cluster, history: History, host: str, bound: float = DISK_RECOVERY_BOUND
) -> None:
    """From a ``fill_disk`` until ``host``'s store is healthy again after the space came
    back (at most ``bound`` s after that): every 0.25 s its ``storage`` status, a read of
    the majority document and its membership view, each through its own API. One
    ``observe`` record (``what="disk"``) at the end, whatever happens: when the store first
    reported a failure, when the filler was gone, when it was healthy again, and how every
    read and membership call answered meanwhile."""
    start = history.now()
    noticed: float | None = None
    freed: float | None = None
    recovered: float | None = None
    failures: Counter[str] = Counter()
    reads: Counter[str] = Counter()
    members: Counter[str] = Counter()
    polls = 0
    last: dict[str, Any] = {}
    try:
        while True:
            now = history.now()
            if freed is None and not cluster.backend.disk_filled(host):
                freed = now
            last = await storage_status(cluster, host)
            polls += 1
            if "error" in last:
                failures[f"storage op: {last['error']}"] += 1
            elif not last.get("healthy"):
                failures[str(last.get("failure"))] += 1
                if noticed is None:
                    noticed = now
            elif freed is not None:
                recovered = now
                break
            for counter, op, args in (
                (reads, "state.get", {"doc": MAJORITY_DOC}),
                (members, "members", None),
            ):
                try:
                    await call(cluster, host, op, args, timeout=2.0)
                    counter["ok"] += 1
                except MeshError as exc:
                    counter[exc.kind.value] += 1
            if freed is not None and now - freed > bound:
                break
            if freed is None and now - start > DISK_MAX_FULL:
                break
            await anyio.sleep(DISK_POLL)
    finally:
        history.add(
            "observe",
            what="disk",
            host=host,
            since=start,
            noticed=noticed,
            freed=freed,
            recovered=recovered,
            bound=bound,
            polls=polls,
            failures=dict(failures),
            reads=dict(reads),
            members=dict(members),
            last=last,
        )


async def digests(cluster: Cluster) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for host in _running(cluster):
        try:
            d = await call(cluster, host, "docs.digest", timeout=5.0)
            out[host] = {"digest": d["digest"], "docs": d["docs"]}
        except MeshError as exc:
            out[host] = {"error": exc.kind.value}
    return out


def digests_agree(found: dict[str, Any]) -> bool:
    values = list(found.values())
    return (
        bool(values)
        and all("error" not in v for v in values)
        and all(v["digest"] == values[0]["digest"] for v in values)
    )


async def collect(
    cluster: Cluster,
    history: History,
    workload: Workload | None,
    *,
    bound: float,
    agents: Iterable[str] = (),
) -> None:
    """Record everything the checker needs (call after the drivers stopped)."""
    alive = _running(cluster)

    # Final membership view (the convergence watcher recorded the time to reach one).
    views = await membership_views(cluster)
    history.add("observe", what="membership", views=views, alive=alive)

    # Documents: every daemon holds the same registry and state documents.
    async def poll_digests() -> tuple[bool, Any]:
        found = await digests(cluster)
        return digests_agree(found), found

    done, elapsed, found = await poll_until(poll_digests, bound, interval=0.5)
    history.add("observe", what="digests", converged=done, elapsed=round(elapsed, 3), hosts=found)

    # Duplicate names: every daemon resolves each to the same entry; our agents say who won.
    if workload is not None and workload.duplicates:

        async def poll_duplicates() -> tuple[bool, Any]:
            lookups: dict[str, dict[str, Any]] = {}
            for name in workload.duplicates:
                lookups[name] = {}
                for host in _running(cluster):
                    try:
                        e = await call(cluster, host, "lookup", {"name": name}, timeout=2.0)
                        lookups[name][host] = {"node": e["node"], "entry_id": e["entry_id"]}
                    except MeshError as exc:
                        lookups[name][host] = {"error": exc.kind.value}
            report = workload.duplicate_report()
            settled = all(
                len({str(v) for v in lookups[n].values()}) == 1
                and sum(a["running"] for a in report[n].values()) <= 1
                and all(a["running"] or a["stop_reason"] for a in report[n].values())
                for n in lookups
            )
            return settled, {"lookups": lookups, "agents": report}

        done, elapsed, last = await poll_until(poll_duplicates, bound, interval=0.5)
        history.add("observe", what="duplicates", settled=done, elapsed=round(elapsed, 3), **last)

    # State: the documents the workload wrote, read back from every daemon.
    # (the agents requests went to: from the workload, or from a history written by another
    # process — `chaos workload` — when `chaos check` collects)
    names = set(agents)
    if workload is not None:
        names |= {counter_agent(k) for k in range(1, workload.config.counters + 1)}
    docs = [MAJORITY_DOC, LOCAL_DOC, *(f"agent:{a}" for a in sorted(names))]
    state: dict[str, dict[str, Any]] = {}
    for doc in docs:
        state[doc] = {}
        for host in alive:
            try:
                state[doc][host] = await call(cluster, host, "state.get", {"doc": doc}, 10.0)
            except MeshError as exc:
                state[doc][host] = {"$error": exc.kind.value}
    history.add("observe", what="state", docs=state)

    # Keys: which keys every member holds, and its primary.
    if alive:
        try:
            listing = await call(cluster, alive[0], "keys", {"op": "list"}, timeout=10.0)
            keys: dict[str, Any] = {
                m: {"primary": r.get("primary"), "keys": r.get("keys"), "ok": r.get("ok")}
                for m, r in listing["results"].items()
            }
        except MeshError as exc:
            keys = {"error": exc.kind.value}
        history.add("observe", what="keys", members=keys)

    # Storage: every store trusts its disk again (a failed one recovers by itself, with
    # back-off: wait for that, as for the other observations).
    async def poll_storage() -> tuple[bool, Any]:
        found = {host: await storage_status(cluster, host) for host in alive}
        healthy = all(v.get("healthy") or v.get("enabled") is False for v in found.values())
        return healthy, found

    done, elapsed, found = await poll_until(poll_storage, DISK_RECOVERY_BOUND, interval=0.5)
    history.add("observe", what="storage", healthy=done, elapsed=round(elapsed, 3), hosts=found)

    await rejections(cluster, history, alive)

    # Processes: every exit, whether we caused it; crash traces in the logs.
    exits = await anyio.to_thread.run_sync(cluster.backend.poll_exits)
    logs: dict[str, Any] = {}
    for host in cluster.hosts:
        text = cluster.backend.log_text(host)
        errors = [
            line for line in text.splitlines() if "level=error" in line or "level=critical" in line
        ]
        logs[host] = {
            "tracebacks": text.count("Traceback (most recent call last)"),
            "errors": errors[:20],
            "error_count": len(errors),
        }
    history.add(
        "observe",
        what="processes",
        running={h: cluster.backend.daemon_running(h) for h in cluster.hosts},
        exits=[{"host": e.host, "pid": e.pid, "code": e.code, "cause": e.cause} for e in exits],
        logs=logs,
    )


async def rejections(cluster: Cluster, history: History, hosts: list[str]) -> None:
    """Scrape, send known junk to every daemon, scrape again: record both."""
    port = cluster.backend.spec.metrics_port
    before: dict[str, Any] = {}
    for host in hosts:
        try:
            before[host] = counters_of(
                parse_metrics(await scrape(cluster.backend.addr(host), port))
            )
        except OSError as exc:
            before[host] = {"error": str(exc)}
    injected = {reason: JUNK_PER_REASON for reason in JUNK}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for host in hosts:
            target = (cluster.backend.addr(host), cluster.backend.spec.port)
            for make in JUNK.values():
                for _ in range(JUNK_PER_REASON):
                    sock.sendto(make(), target)
    await anyio.sleep(1.0)
    after: dict[str, Any] = {}
    for host in hosts:
        try:
            after[host] = counters_of(parse_metrics(await scrape(cluster.backend.addr(host), port)))
        except OSError as exc:
            after[host] = {"error": str(exc)}
    history.add(
        "observe",
        what="rejections",
        injected=injected,
        controller=cluster.backend.controller,
        hosts={h: {"before": before.get(h), "after": after.get(h)} for h in hosts},
    )
