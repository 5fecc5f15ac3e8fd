"""Durable state on real daemons: restarts, kill -9 of every daemon at once, a minority that
declared the rest dead, reminders and ``once`` keys across restarts.

Every daemon is a real process with its own data directory (LocalCluster); a restart is the
same command line again, so the same directory. Waits are polls with deadlines.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

import anyio

from meshd.placement.reminders import RETRY_MAX
from meshd.testing.localcluster import Daemon, LocalCluster
from meshd.testing.poll import eventually
from meshd_client import AgentContext, Mesh, Message, Timeout

DOC = "ledger"


async def start(cluster: LocalCluster, count: int) -> list[Daemon]:
    daemons = cluster.start_many(count)
    await cluster.wait_ready()
    await cluster.wait_converged()
    return daemons


def kill_all(daemons: Sequence[Daemon]) -> None:
    """kill -9 every daemon at once (a power cut, as far as the processes can tell)."""
    for d in daemons:
        d.signal(signal.SIGKILL)
    for d in daemons:
        d.wait(10)


async def restart(cluster: LocalCluster, daemons: Sequence[Daemon]) -> None:
    for d in daemons:
        d.spawn()
    for d in daemons:
        await cluster.wait_answering(d)


async def value(daemon: Daemon, doc: str = DOC) -> Any:
    return await daemon.call("state.get", {"doc": doc})


async def test_a_restarted_daemon_keeps_its_state(cluster: LocalCluster) -> None:
    (solo,) = await start(cluster, 1)
    async with Mesh.connect(solo.socket_path) as mesh:
        doc = mesh.state(DOC)
        await doc.set("color", "blue")
        await doc.incr("hits", 5)
        await doc.set("limits", {"cpu": 2})
        await doc.set("log", [])
        await doc.append("log", "a", "b")
        await doc.delete("color")
        await doc.set("color", "green")
        before = await doc.get()
    solo.signal(signal.SIGTERM)
    assert solo.wait(15) == 0
    solo.spawn()
    await cluster.wait_answering(solo)
    # Served from its own store at once, before any peer could have answered.
    assert (
        await value(solo)
        == before
        == {
            "color": "green",
            "hits": 5,
            "limits": {"cpu": 2},
            "log": ["a", "b"],
        }
    )
    # And kill -9 right after a local write: the group commit put it on disk within
    # sync_interval; wait for that by asking for a majority write (of one) after it.
    async with Mesh.connect(solo.socket_path) as mesh:
        await mesh.state(DOC).incr("hits", 1)
        await mesh.state("marker").set("m", 1, durability="majority")
    solo.kill()
    solo.wait(10)
    solo.spawn()
    await cluster.wait_answering(solo)
    assert (await value(solo))["hits"] == 6


async def test_kill_9_of_every_daemon_keeps_every_acknowledged_majority_write(
    cluster: LocalCluster,
) -> None:
    daemons = await start(cluster, 3)
    acked_keys: list[str] = []
    acked_incr = 0

    async def writer(d: Daemon, index: int) -> None:
        nonlocal acked_incr
        async with Mesh.connect(d.socket_path) as mesh:
            doc = mesh.state(DOC)
            for i in range(60):
                key = f"{d.name}-{i}"
                await doc.set(key, index * 1000 + i, durability="majority")
                acked_keys.append(key)
                await doc.incr("count", 1, durability="majority")
                acked_incr += 1

    async with anyio.create_task_group() as tg:
        for index, d in enumerate(daemons):
            tg.start_soon(writer, d, index)
    assert len(acked_keys) == 180 and acked_incr == 180
    kill_all(daemons)
    await restart(cluster, daemons)
    # Straight after the restart, from the disks: every acknowledged write is on a majority
    # of the nodes (2 of 3) — that is what `majority` promises, not that every node has it.
    first = {d.name: await value(d) for d in daemons}
    for key in acked_keys:
        holders = [name for name, got in first.items() if key in got]
        assert len(holders) >= 2, (key, holders)
    # Once the nodes exchanged what each kept, every node holds every acknowledged write.
    await cluster.wait_converged()

    async def everywhere() -> bool | None:
        for d in daemons:
            got = await value(d)
            if not set(acked_keys) <= set(got) or got.get("count", 0) < acked_incr:
                return None
        return True

    await eventually(everywhere, "every acknowledged write on every node", 30)


async def test_a_minority_that_declared_the_rest_dead_acknowledges_nothing(
    cluster: LocalCluster,
) -> None:
    n1, n2, n3 = await start(cluster, 3)
    for d in (n1, n2):
        d.signal(signal.SIGSTOP)
    try:
        # Alone, n3 gets no confirmations and its awareness of its own failing probes stretches
        # each suspicion (37 s and 56 s on an idle machine): give a loaded machine room.
        await cluster.wait_status(["n3"], "n1", "dead", timeout=120)
        await cluster.wait_status(["n3"], "n2", "dead", timeout=120)
        failures: list[dict[str, Any]] = []
        async with Mesh.connect(n3.socket_path) as mesh:
            doc = mesh.state(DOC)
            for i in range(2):
                try:
                    await doc.set(f"minority-{i}", i, durability="majority")
                except Timeout as exc:
                    failures.append(exc.detail)
        # Not one acknowledged: each says how many hold it, of how many, and how many needed.
        assert len(failures) == 2
        assert all(f["acked"] == ["n3"] and f["needed"] == 2 and f["total"] == 3 for f in failures)
        # The writes stay applied on n3 (and on its disk): kill it, wake the others, restart.
        n3.kill()
        n3.wait(10)
    finally:
        for d in (n1, n2):
            d.signal(signal.SIGCONT)
    n3.spawn()
    await cluster.wait_ready([n3])
    written = {f"minority-{i}": i for i in range(2)}
    assert (await value(n3)).items() >= written.items()

    async def spread() -> bool | None:
        for d in (n1, n2):
            got = await value(d) if await has_doc(d) else {}
            if not got.items() >= written.items():
                return None
        return True

    await eventually(spread, "n3's writes to spread to n1 and n2 after the heal", 60)


async def has_doc(daemon: Daemon, doc: str = DOC) -> bool:
    names = {d["name"] for d in await daemon.call("state.list")}
    return doc in names


async def test_once_keys_still_deduplicate_after_a_restart(cluster: LocalCluster) -> None:
    daemons = await start(cluster, 2)
    async with Mesh.connect(daemons[0].socket_path) as mesh:
        for i in range(20):
            await mesh.state(DOC).incr("n", 1, durability="majority", once=f"msg-{i}")
    for d in daemons:
        d.signal(signal.SIGTERM)
    for d in daemons:
        d.wait(15)
    await restart(cluster, daemons)
    await cluster.wait_ready()
    async with Mesh.connect(daemons[1].socket_path) as mesh:
        doc = mesh.state(DOC)
        assert await doc.get("n") == 20
        for i in range(20):
            result = await doc.update(
                [{"op": "incr", "path": ["n"], "by": 1}], "local", once=f"msg-{i}"
            )
            assert result.get("duplicate") is True
        assert await doc.get("n") == 20


class Reminded:
    """An agent kind that records each reminder occurrence it handles, in its state. With
    ``hang_first``, the first delivery never returns (the test then kills the runner)."""

    def __init__(self, hang_first: bool = False) -> None:
        self.hang_first = hang_first
        self.seen: list[tuple[str, str]] = []  # (node, occurrence id), every attempt
        self.hanging = anyio.Event()

    def factory(self, mesh: Mesh) -> Any:
        async def handle(ctx: AgentContext, msg: Message) -> Any:
            body = msg.body
            if isinstance(body, dict) and "reminder" in body:
                self.seen.append((ctx.mesh.node, body["id"]))
                if self.hang_first and len(self.seen) == 1:
                    self.hanging.set()
                    await anyio.sleep_forever()
                await ctx.state.update(
                    [
                        {"op": "incr", "path": ["fired"], "by": 1},
                        {"op": "set", "path": ["fired_id"], "value": body["id"]},
                    ],
                    durability="majority",
                )
                return None
            if isinstance(body, dict) and "after" in body:
                await ctx.remind(body["name"], {"n": body["name"]}, after=body["after"])
                return ctx.mesh.node
            return None

        return lambda _name: handle


async def serving(daemons: Sequence[Daemon], kind: str, hosts: set[str]) -> None:
    """Until every daemon's kinds table lists ``hosts`` for ``kind``."""

    async def check() -> bool | None:
        for d in daemons:
            if set((await d.call("kinds")).get(kind, {})) != hosts:
                return None
        return True

    await eventually(check, f"{kind!r} served by {sorted(hosts)} everywhere", 10)


async def fired(mesh: Mesh, agent: str) -> tuple[int, str] | None:
    """(times handled, the occurrence id handled last), once handled."""
    got = await mesh.state(f"agent:{agent}").get(default={})
    return (got["fired"], got["fired_id"]) if got.get("fired") else None


async def all_hold_reminders(daemons: Sequence[Daemon], names: Sequence[str]) -> bool | None:
    for d in daemons:
        for name in names:
            if "tick" not in await d.call("agent.reminders", {"agent": name}):
                return None
    return True


async def all_forgot_reminders(daemons: Sequence[Daemon], names: Sequence[str]) -> bool | None:
    for d in daemons:
        for name in names:
            if "tick" in await d.call("agent.reminders", {"agent": name}):
                return None
    return True


async def test_reminders_fire_after_every_daemon_restarted(cluster: LocalCluster) -> None:
    daemons = await start(cluster, 3)
    kind = Reminded()
    names = [f"r/{i}" for i in range(6)]
    async with AsyncExitStack() as stack:
        meshes = [await stack.enter_async_context(Mesh.connect(d.socket_path)) for d in daemons]
        for m in meshes:
            await m.serve_kind("r", kind.factory(m), idle_timeout=None)
        await serving(daemons, "r", {d.name for d in daemons})
        for i, name in enumerate(names):
            await meshes[0].request(name, {"name": "tick", "after": 8.0 + i % 3}, timeout=10)
        await eventually(
            lambda: all_hold_reminders(daemons, names), "reminders replicated everywhere", 10
        )
    for d in daemons:
        d.signal(signal.SIGTERM)
    for d in daemons:
        assert d.wait(30) is not None
    assert kind.seen == []  # none was due before the restart
    await restart(cluster, daemons)
    await cluster.wait_ready()
    await cluster.wait_converged()
    async with AsyncExitStack() as stack:
        meshes = [await stack.enter_async_context(Mesh.connect(d.socket_path)) for d in daemons]
        for m in meshes:
            await m.serve_kind("r", kind.factory(m), idle_timeout=None)
        await serving(daemons, "r", {d.name for d in daemons})

        async def all_fired() -> bool | None:
            waiting = [name for name in names if not await fired(meshes[0], name)]
            for name in waiting:
                # Virtual agents activate on their first message: poke each.
                await meshes[0].send(name, {"poke": True})
            return None if waiting else True

        await eventually(all_fired, "every reminder to fire after the restart", 60)
    # A reminder goes once its delivery is acknowledged. An attempt that reached the agent
    # but whose acknowledgement failed (agents were still activating after the restart) is
    # tried again after its back-off, which doubles up to RETRY_MAX: the agent has seen it
    # (fired) before the reminder is removed.
    await eventually(
        lambda: all_forgot_reminders(daemons, names), "every handled reminder removed", RETRY_MAX
    )


async def test_a_reminder_survives_the_death_of_its_runner_mid_delivery(
    cluster: LocalCluster,
) -> None:
    (solo,) = await start(cluster, 1)
    kind = Reminded(hang_first=True)
    async with Mesh.connect(solo.socket_path) as runner:
        await runner.serve_kind("r", kind.factory(runner), idle_timeout=None)
        await serving([solo], "r", {"n1"})
        await runner.request("r/once", {"name": "tick", "after": 0.5}, timeout=10)
        with anyio.fail_after(20):
            await kind.hanging.wait()
        # The runner dies while the agent handles the reminder (its connection closes).
    assert "tick" in await solo.call("agent.reminders", {"agent": "r/once"})
    async with Mesh.connect(solo.socket_path) as runner:
        await runner.serve_kind("r", kind.factory(runner), idle_timeout=None)
        await serving([solo], "r", {"n1"})

        async def handled() -> tuple[int, str] | None:
            got = await fired(runner, "r/once")
            if got is None:
                await runner.send("r/once", {"poke": True})  # the next activation
            return got

        times, last = await eventually(
            handled, "the reminder to fire again at the next activation", 30
        )
        # Removed once the handler's answer reached the daemon: the runner stays until then
        # (closing it first would leave the occurrence unacknowledged, so still due).
        await eventually(
            lambda: all_forgot_reminders([solo], ["r/once"]), "the reminder removed", 10
        )
    # The same occurrence came again, with the same id, and was handled once.
    assert len(kind.seen) >= 2
    assert kind.seen[0][1] == kind.seen[-1][1] == last
    assert times == 1
