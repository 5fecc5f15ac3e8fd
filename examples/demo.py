"""`make demo`: a 5-node meshd mesh on loopback with agents talking across it.

Everything is real: five daemon processes with encrypted gossip on 127.0.0.1, agents served
by clients of different daemons, and tables printed by the real `meshctl`.

1. The mesh forms; `meshctl members` shows it.
2. An echo agent on n2, a counter agent of kind `counter` (runners on n3 and n4; placement
   picks one; its count in replicated state) and a signal sink on n4 (subscribed to
   `orders.**`); a driver on n1 sends requests, at-least-once increments and signals. A live
   table shows the traffic; n5 reads the counter's state.
3. The counter's host is killed with SIGKILL: the others notice, calls to the counter say
   `unreachable` for a moment, then it answers from the other runner's host with its count.
4. The killed daemon is started again on the same data directory: it serves its state from
   its own disk at once, before it has heard from any peer (`meshctl storage` shows it).
5. n5 leaves gracefully.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from rich.console import Console
from rich.live import Live
from rich.rule import Rule
from rich.table import Table

from meshd.testing.localcluster import LocalCluster
from meshd_client import AgentContext, Mesh, MeshError, Message

console = Console()


def meshctl(socket_path: str, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "meshd.cli.meshctl", "--socket", socket_path, *args], check=False
    )


class Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.last_reply: object = None
        self.increments = 0
        self.signals_sent = 0
        self.signals_seen: list[str] = []
        self.counter_on_n5: object = None
        self.errors: list[str] = []

    def table(self) -> Table:
        table = Table(title="live traffic", title_justify="left", header_style="bold")
        table.add_column("what")
        table.add_column("where")
        table.add_column("value")
        table.add_row("requests to 'echo'", "n1 → echo on n2", str(self.requests))
        table.add_row("last reply", "", str(self.last_reply))
        table.add_row("at-least-once increments", f"n1 → {COUNTER}", str(self.increments))
        table.add_row(
            "counter state, read on n5", f"state/agent:{COUNTER}", str(self.counter_on_n5)
        )
        table.add_row("signals published", "n1: orders.<region>.created", str(self.signals_sent))
        table.add_row("signals received (orders.**)", "sink on n4", str(len(self.signals_seen)))
        table.add_row("last signal", "", self.signals_seen[-1] if self.signals_seen else "")
        if self.errors:
            table.add_row("last error", "", self.errors[-1])
        return table


async def echo(ctx: AgentContext, msg: Message) -> dict[str, object]:
    return {"echo": msg.body, "by": ctx.name}


COUNTER = "counter/main"


async def count(ctx: AgentContext, msg: Message) -> int:
    """Counts in its replicated state, once per message id (retries do not count twice)."""
    await ctx.state.incr("count", int(msg.body or 1), durability="majority", once=msg.id)
    value: int = await ctx.state.get("count")
    return value


async def drive(n1: Mesh, n5: Mesh, stats: Stats, seconds: float) -> None:
    with Live(stats.table(), console=console, refresh_per_second=8) as live:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            i += 1
            try:
                stats.last_reply = await n1.request("echo", f"ping {i}")
                stats.requests += 1
                await n1.request(COUNTER, 1, at_least_once=True)
                stats.increments += 1
                region = ("eu", "us")[i % 2]
                await n1.publish(f"orders.{region}.created", {"order": i})
                stats.signals_sent += 1
                stats.counter_on_n5 = await n5.state(f"agent:{COUNTER}").get("count", default=0)
            except MeshError as exc:
                stats.errors.append(f"{exc.kind.value}: {exc.message}")
            live.update(stats.table())
            await anyio.sleep(0.1)
        await anyio.sleep(0.3)
        live.update(stats.table())
    console.print()


async def kill_counter_host(cluster: LocalCluster, n1: Mesh) -> str:
    host = (await n1.lookup(COUNTER)).node
    victim = cluster[host]
    before = await n1.state(f"agent:{COUNTER}").get("count", default=0)
    console.print(Rule(f"[bold red]kill -9 {host} (pid {victim.pid}), the counter's host"))
    killed_at = time.monotonic()
    victim.kill()
    others = [n for n in ("n1", "n2", "n3", "n4", "n5") if n != host]
    seen = await cluster.wait_status(others, host, "dead", timeout=60)
    for name, at in sorted(seen.items(), key=lambda kv: kv[1]):
        console.print(f"  {name} marked {host} dead after {at - killed_at:.2f} s")
    with anyio.fail_after(60):
        while True:
            try:
                value = await n1.request(COUNTER, 1, at_least_once=True, timeout=5)
                break
            except MeshError as exc:
                console.print(f"  a request to {COUNTER!r}: {exc.kind.value}: {exc.message}")
                await anyio.sleep(0.5)
    now_on = (await n1.lookup(COUNTER)).node
    console.print(
        f"  {time.monotonic() - killed_at:.2f} s after the kill the counter answers from "
        f"{now_on}: count {before} → {value} (its state came along)"
    )
    return host


async def restart_counter_host(cluster: LocalCluster, host: str) -> None:
    victim = cluster[host]
    console.print(Rule(f"[bold green]{host} started again on the same data directory"))
    started = time.monotonic()
    victim.spawn()
    info = await cluster.wait_answering(victim)
    state = await victim.call("state.get", {"doc": f"agent:{COUNTER}"})
    console.print(
        f"  answering after {time.monotonic() - started:.2f} s (joined: {info['joined']}); "
        f"from its own disk it reads count = {state.get('count', 0)}"
    )
    await anyio.to_thread.run_sync(meshctl, victim.socket_path, "storage")
    await cluster.wait_ready([victim])


async def agents_on_the_mesh(cluster: LocalCluster) -> str:
    d = cluster.daemons
    stats = Stats()
    async with (
        Mesh.connect(d["n1"].socket_path) as n1,
        Mesh.connect(d["n2"].socket_path) as n2,
        Mesh.connect(d["n3"].socket_path) as n3,
        Mesh.connect(d["n4"].socket_path) as n4,
        Mesh.connect(d["n5"].socket_path) as n5,
        anyio.create_task_group() as tg,
    ):
        await n2.serve("echo", echo, kind="echo", capabilities=["echo"])
        for runner in (n3, n4):  # either host may run the counter; placement picks one
            await runner.serve_kind("counter", lambda _name: count, idle_timeout=None)

        async def sink() -> None:
            async with n4.subscribe("orders.**") as signals:
                async for signal in signals:
                    stats.signals_seen.append(f"{signal.topic} {signal.data}")

        tg.start_soon(sink)
        await start_counter(n1)
        await anyio.sleep(0.3)  # the sink's subscription reaches n1
        await drive(n1, n5, stats, seconds=4.0)
        await anyio.to_thread.run_sync(meshctl, d["n5"].socket_path, "agents")
        killed = await kill_counter_host(cluster, n1)
        tg.cancel_scope.cancel()
    return killed


async def start_counter(mesh: Mesh) -> None:
    """Spawn the counter once every daemon knows who serves its kind."""
    with anyio.fail_after(20):
        while True:
            try:
                await mesh.spawn("counter", COUNTER)
                return
            except MeshError:
                await anyio.sleep(0.1)


async def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="meshd-demo-"))
    with LocalCluster(root, profile="local") as cluster:
        console.print(Rule("[bold]meshd demo: a 5-node mesh on loopback"))
        console.print(f"run directory: {root} (logs: n1.log … n5.log)")
        daemons = cluster.start_many(5)
        await cluster.wait_ready()
        await cluster.wait_converged()
        meshctl(daemons[0].socket_path, "members")

        console.print(Rule("[bold]agents on different hosts: requests, state and signals"))
        killed = await agents_on_the_mesh(cluster)
        await restart_counter_host(cluster, killed)
        meshctl(daemons[0].socket_path, "members")

        console.print(Rule("[bold]graceful leave of n5 (meshctl leave)"))
        meshctl(cluster["n5"].socket_path, "leave")
        await cluster.wait_status(["n1", "n2", "n4"], "n5", "left", timeout=30)
        meshctl(daemons[1].socket_path, "members")
        codes = cluster.stop_all()
        console.print(f"stopped; exit codes: {codes}")


if __name__ == "__main__":
    anyio.run(main)
