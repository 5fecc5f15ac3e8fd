"""Messaging on real daemons: requests, sends and ordering across hosts, at-least-once through
a daemon crash, signals with wildcards, reconnects, dead hosts, meshctl and the examples.

Every daemon is a real process (LocalCluster, local profile); clients are the real library in
this process or real subprocesses. Every wait is a poll with a deadline; the only timing
assertion is the coarse "returned well before the call's timeout".
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream

from meshd.testing.localcluster import Daemon, LocalCluster
from meshd.testing.poll import eventually, until
from meshd_client import (
    AgentContext,
    Conflict,
    Mesh,
    Message,
    NotFound,
    Signal,
    Timeout,
    Unreachable,
)

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


# ---------------------------------------------------------------------------- helpers


async def start(cluster: LocalCluster, count: int) -> list[Daemon]:
    daemons = cluster.start_many(count)
    await cluster.wait_ready()
    await cluster.wait_converged()
    return daemons


async def resolves(mesh: Mesh, name: str, node: str | None = None, timeout: float = 10.0) -> None:
    """Until ``mesh``'s daemon resolves ``name`` (to ``node``, if given)."""

    async def check() -> bool | None:
        try:
            info = await mesh.lookup(name)
        except NotFound:
            return None
        return True if node is None or info.node == node else None

    await eventually(check, f"{name!r} to resolve on {mesh.node}", timeout)


async def not_found(daemon: Daemon, name: str) -> bool | None:
    try:
        await daemon.call("lookup", {"name": name})
    except NotFound:
        return True
    return None


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


async def echo(ctx: AgentContext, msg: Message) -> dict[str, Any]:
    return {"echo": msg.body, "on": ctx.mesh.node, "from": msg.sender}


class Child:
    """A subprocess whose output lines are collected as they come; stopped by its own pid."""

    def __init__(self, process: Process, argv: Sequence[str]) -> None:
        self.process = process
        self.argv = list(argv)
        self.lines: list[str] = []

    async def _read(self) -> None:
        assert self.process.stdout is not None
        buffer = ""
        async for text in TextReceiveStream(self.process.stdout):
            buffer += text
            *complete, buffer = buffer.split("\n")
            self.lines.extend(complete)
        if buffer:
            self.lines.append(buffer)

    async def line(self, match: Callable[[str], bool], what: str, timeout: float = 10.0) -> str:
        async def check() -> str | None:
            found = next((line for line in self.lines if match(line)), None)
            if found is None and self.process.returncode is not None:
                raise AssertionError(
                    f"{self.argv} exited with {self.process.returncode} before {what}:\n"
                    + "\n".join(self.lines)
                )
            return found

        return await eventually(check, f"{what} from {self.argv[1:]}", timeout)

    def output(self) -> str:
        return "\n".join(self.lines)


@asynccontextmanager
async def child(argv: Sequence[str]) -> AsyncIterator[Child]:
    process = await anyio.open_process(
        list(argv),
        stdout=-1,  # PIPE
        stderr=-2,  # STDOUT
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=str(ROOT),
    )
    handle = Child(process, argv)
    async with anyio.create_task_group() as tg:
        tg.start_soon(handle._read)
        try:
            yield handle
        finally:
            if process.returncode is None:
                process.kill()  # our own child, by its pid
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await process.wait()
            tg.cancel_scope.cancel()
            await process.aclose()


async def run(argv: Sequence[str], timeout: float = 20.0) -> tuple[int, str, str]:
    with anyio.fail_after(timeout):
        result = await anyio.run_process(
            list(argv), check=False, cwd=str(ROOT), env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def meshctl(daemon: Daemon, *args: str) -> list[str]:
    return [sys.executable, "-m", "meshd.cli.meshctl", "--socket", daemon.socket_path, *args]


def example(script: str, *args: str) -> list[str]:
    return [sys.executable, str(EXAMPLES / script), *args]


# ---------------------------------------------------------------------------- requests and sends


async def test_cross_host_request_reply_and_send(cluster: LocalCluster) -> None:
    n1, n2, n3 = await start(cluster, 3)
    seen: list[Message] = []

    async def handler(ctx: AgentContext, msg: Message) -> Any:
        seen.append(msg)
        return await echo(ctx, msg)

    async with (
        Mesh.connect(n2.socket_path) as host,
        Mesh.connect(n1.socket_path) as c1,
        Mesh.connect(n3.socket_path) as c3,
    ):
        agent = await host.serve("echo", handler, kind="echo")
        assert agent.info is not None and agent.info.node == "n2"
        await resolves(c1, "echo", "n2")
        await resolves(c3, "echo", "n2")
        assert await c1.request("echo", {"q": 1}, sender="one") == {
            "echo": {"q": 1},
            "on": "n2",
            "from": "one",
        }
        assert await c3.request("echo", [3], sender="three") == {
            "echo": [3],
            "on": "n2",
            "from": "three",
        }
        assert await c1.health("echo") == "healthy"
        assert await c3.health("echo") == "healthy"

        before = len(seen)
        assert await c1.send("echo", "fire-and-forget", sender="one") is None
        await until(lambda: len(seen) == before + 1, "the send to arrive on n2")
        sent = seen[-1]
        assert (sent.body, sent.is_request, sent.sender) == ("fire-and-forget", False, "one")

        # An agent answering by asking another agent on a third host.
        async def relay(ctx: AgentContext, msg: Message) -> Any:
            return {"relayed": await ctx.request("echo", msg.body)}

        await c3.serve("relay", relay)
        await resolves(c1, "relay", "n3")
        assert await c1.request("relay", "x") == {
            "relayed": {"echo": "x", "on": "n2", "from": "relay"}
        }


async def test_per_sender_ordering_of_200_sends_across_hosts(cluster: LocalCluster) -> None:
    n1, n2 = await start(cluster, 2)
    order: list[int] = []

    async def record(_ctx: AgentContext, msg: Message) -> None:
        order.append(msg.body)

    async with Mesh.connect(n2.socket_path) as host, Mesh.connect(n1.socket_path) as sender:
        await host.serve("ordered", record)
        await resolves(sender, "ordered", "n2")
        for i in range(200):
            await sender.send("ordered", i)
        await until(lambda: len(order) >= 200, "200 sends to arrive", timeout=15)
        await anyio.sleep(0.1)
    assert order == list(range(200))


# ---------------------------------------------------------------------------- at least once


@pytest.mark.parametrize("victim", ["agent_host", "caller_host"])
async def test_at_least_once_through_a_daemon_crash(cluster: LocalCluster, victim: str) -> None:
    """Requests in flight when a daemon is killed -9 are retried by the caller with the same
    ids; the handler runs exactly once per id, and every request is acknowledged.

    The agent remembers the ids it handled (the daemon that remembered them is gone when the
    agent's host is the victim; the agent itself keeps running). Messages the agent handled
    whose replies were lost must be answered from memory, not handled again: the test checks
    that such messages exist, so the de-duplication was really needed."""
    # n1 is everyone's seed and has none itself; the agent's host (n2) and the caller's (n3)
    # rejoin through it when restarted, as daemons configured with seeds do.
    _n1, n2, n3 = await start(cluster, 3)
    victim_daemon = n2 if victim == "agent_host" else n3
    count = 30
    ids = [f"msg-{i}" for i in range(count)]
    handled: list[str] = []
    acked: dict[str, Any] = {}
    retried_errors: list[tuple[float, str]] = []

    async def worker(_ctx: AgentContext, msg: Message) -> Any:
        assert msg.at_least_once
        handled.append(msg.id)
        await anyio.sleep(0.05)
        return {"id": msg.id, "body": msg.body}

    async with Mesh.connect(n2.socket_path) as host, Mesh.connect(n3.socket_path) as caller:
        agent = await host.serve("worker", worker, concurrency=1)
        await resolves(caller, "worker", "n2")

        async def call(i: int) -> None:
            # The documented contract: retry with the same id until acknowledged.
            while True:
                try:
                    acked[ids[i]] = await caller.request(
                        "worker", i, at_least_once=True, id=ids[i], timeout=8
                    )
                    return
                except (NotFound, Unreachable, Timeout) as exc:
                    retried_errors.append((time.monotonic(), exc.kind.value))
                    await anyio.sleep(0.1)

        with anyio.fail_after(40):
            async with anyio.create_task_group() as tg:
                for i in range(count):
                    tg.start_soon(call, i)
                await until(lambda: len(handled) >= 5, "the first messages to be handled")
                victim_daemon.kill()
                at_kill = (len(handled), len(acked))
                assert await anyio.to_thread.run_sync(victim_daemon.wait, 10) is not None
                await anyio.sleep(0.5)  # down for a while: the agent works on, unheard
                lost_replies = set(handled) - set(acked)  # handled, answer not yet received
                victim_daemon.spawn()
                await cluster.wait_ready([victim_daemon])
                watched = host if victim == "agent_host" else caller
                await until(lambda: watched.reconnects >= 1, "the client to reconnect")
                # Everything handled while the victim was down was handled without an answer
                # reaching the caller.
                lost_replies |= set(handled) - set(acked)

    assert sorted(acked) == sorted(ids), "every request must be acknowledged"
    assert all(acked[ids[i]] == {"id": ids[i], "body": i} for i in range(count))
    duplicates = sorted({m for m in handled if handled.count(m) > 1})
    assert duplicates == [], f"handled more than once: {duplicates}"
    assert sorted(handled) == sorted(ids)
    assert lost_replies, "no reply was lost in the crash: the test did not exercise retries"
    if victim == "agent_host":
        assert agent.registrations >= 2, "the agent should have re-registered"
    kinds = sorted({k for _, k in retried_errors})
    window = retried_errors[-1][0] - retried_errors[0][0] if retried_errors else 0.0
    print(
        f"{victim}: (handled, acked) at kill {at_kill}; "
        f"{len(lost_replies)} lost replies answered from memory; caller retries: "
        f"{ {k: sum(1 for _, x in retried_errors if x == k) for k in kinds} } over {window:.1f} s"
    )


async def test_a_handler_its_daemon_crash_interrupted_runs_again_on_retry(
    cluster: LocalCluster,
) -> None:
    """An at-least-once handler whose own call to its daemon failed because that daemon was
    killed (``unreachable``) has no outcome worth remembering: the sender's retry after the
    restart must run it again (its effect is made idempotent with ``once``) and be
    acknowledged — not be answered the remembered ``unreachable`` until the sender gives up.
    (Found by the chaos scenario power-loss: one request per run could hang for its whole
    timeout.)"""
    _n1, n2, n3 = await start(cluster, 3)
    runs: list[str] = []
    proceed = anyio.Event()

    async def worker(ctx: AgentContext, msg: Message) -> str:
        runs.append(msg.id)
        if len(runs) == 1:
            await proceed.wait()  # its daemon is killed meanwhile
        await ctx.state.update([{"op": "incr", "path": ["n"], "by": 1}], "majority", once=msg.id)
        return "done"

    got: dict[str, Any] = {}
    async with Mesh.connect(n2.socket_path) as host, Mesh.connect(n3.socket_path) as caller:
        await host.serve("interrupted", worker)
        await resolves(caller, "interrupted", "n2")

        async def call() -> None:
            got["reply"] = await caller.request(
                "interrupted", 1, at_least_once=True, id="m-1", timeout=30
            )

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await until(lambda: bool(runs), "the handler to start")
                n2.kill()
                assert await anyio.to_thread.run_sync(n2.wait, 10) is not None
                await until(lambda: not host.connected, "the client to notice")
                proceed.set()  # the handler's state update now fails: unreachable
                n2.spawn()
                await cluster.wait_ready([n2])
        assert got["reply"] == "done"
        assert runs == ["m-1", "m-1"]
        assert await host.state("agent:interrupted").get() == {"n": 1}


async def test_an_at_least_once_call_that_waited_out_a_restart_still_gets_its_not_found_grace(
    cluster: LocalCluster,
) -> None:
    """The short grace an at-least-once call gives an agent that is not found (it may be
    re-registering) runs from the first ``not_found``, not from the start of the call: a call
    that spent longer than the grace waiting for its daemon to come back must not give up on
    the first answer it gets."""
    (solo,) = await start(cluster, 1)
    got: dict[str, Any] = {}
    async with Mesh.connect(solo.socket_path) as caller:

        async def call() -> None:
            got["reply"] = await caller.request("later", 1, at_least_once=True, timeout=30)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                solo.kill()
                assert await anyio.to_thread.run_sync(solo.wait, 10) is not None
                await until(lambda: not caller.connected, "the client to notice")
                tg.start_soon(call)
                await anyio.sleep(4)  # longer than the grace, waiting for a connection
                solo.spawn()
                await cluster.wait_ready([solo])
                await until(lambda: caller.connected, "the client to reconnect")
                await anyio.sleep(0.5)  # a retry or two answered not_found meanwhile

                async def handler(ctx: AgentContext, msg: Message) -> str:
                    return "here"

                async with Mesh.connect(solo.socket_path) as host:
                    await host.serve("later", handler)
                    await until(lambda: "reply" in got, "the call to be answered", 20)
        assert got["reply"] == "here"


# ---------------------------------------------------------------------------- signals


async def test_signals_with_wildcards_across_hosts(cluster: LocalCluster) -> None:
    h1, h2, h3, h4 = await start(cluster, 4)
    patterns = {"one": "a.*", "deep": "a.**", "deep2": "a.b.*", "exact": "a.b.c", "none": "z.*"}
    where = {"one": h1, "deep": h2, "deep2": h2, "exact": h3, "none": h4}
    got: dict[str, list[Signal]] = {k: [] for k in patterns}

    async def collect(mesh: Mesh, key: str) -> None:
        async with mesh.subscribe(patterns[key]) as signals:
            async for item in signals:
                got[key].append(item)

    async with (
        Mesh.connect(h1.socket_path) as m1,
        Mesh.connect(h2.socket_path) as m2,
        Mesh.connect(h3.socket_path) as m3,
        Mesh.connect(h4.socket_path) as m4,
        anyio.create_task_group() as tg,
    ):
        meshes = {h1.name: m1, h2.name: m2, h3.name: m3, h4.name: m4}
        for key in patterns:
            tg.start_soon(collect, meshes[where[key].name], key)

        # Subscriptions spread through the registry: probe until every subscriber hears h4.
        probe_topics = {"one": "a.p", "deep": "a.p", "deep2": "a.b.p", "exact": "a.b.c"}

        async def subscribed() -> bool | None:
            for key, topic in probe_topics.items():
                if not any(s.type == "probe" for s in got[key]):
                    await m4.publish(topic, type="probe")
            return (
                True if all(any(s.type == "probe" for s in got[k]) for k in probe_topics) else None
            )

        await eventually(subscribed, "subscriptions to reach the publisher")

        topics = ["a.x", "a.b.c", "a.b.d", "a", "b.c", "a.b", "a.b.c.d", "z"]
        hosts = {t: await m4.publish(t, {"topic": t}, type="real") for t in topics}
        expected = {
            "one": ["a.x", "a.b"],
            "deep": ["a.x", "a.b.c", "a.b.d", "a.b", "a.b.c.d"],
            "deep2": ["a.b.c", "a.b.d"],
            "exact": ["a.b.c"],
            "none": [],
        }

        def real(key: str) -> list[str]:
            return [s.topic for s in got[key] if s.type == "real"]

        await until(lambda: all(len(real(k)) >= len(v) for k, v in expected.items()), "signals")
        await anyio.sleep(0.5)  # anything extra or late would have arrived by now
        tg.cancel_scope.cancel()

    assert {k: real(k) for k in expected} == expected
    # One copy per host with a matching subscriber (h2 has two), none elsewhere.
    assert hosts == {
        "a.x": 2,  # h1, h2
        "a.b.c": 2,  # h2, h3
        "a.b.d": 1,  # h2
        "a": 0,
        "b.c": 0,
        "a.b": 2,  # h1, h2
        "a.b.c.d": 1,  # h2
        "z": 0,  # h4's own z.* wants one more segment
    }
    assert all(s.data == {"topic": s.topic} for k in expected for s in got[k] if s.type == "real")


# ---------------------------------------------------------------------------- restarts and failures


async def test_agent_survives_a_restart_of_its_daemon(cluster: LocalCluster) -> None:
    n1, n2, _n3 = await start(cluster, 3)
    starts: list[str] = []

    class Phoenix:
        async def on_start(self, ctx: AgentContext) -> None:
            starts.append(ctx.name)

        async def handle(self, ctx: AgentContext, msg: Message) -> Any:
            return {"echo": msg.body, "on": ctx.mesh.node}

    async with Mesh.connect(n2.socket_path) as host, Mesh.connect(n1.socket_path) as caller:
        agent = await host.serve("phoenix", Phoenix())
        await resolves(caller, "phoenix", "n2")
        assert await caller.request("phoenix", 1) == {"echo": 1, "on": "n2"}

        n2.kill()
        assert await anyio.to_thread.run_sync(n2.wait, 10) is not None
        # While its daemon is down, the client's calls fail fast; nothing hangs.
        await until(lambda: not host.connected, "the client to notice")
        for call in (
            lambda: host.request("phoenix", 2, timeout=30),
            lambda: host.send("phoenix", 2, timeout=30),
            lambda: host.publish("x.y", 1),
            lambda: host.lookup("phoenix"),
            lambda: host.state("doc").get(),
        ):
            began = time.monotonic()
            with pytest.raises(Unreachable):
                await call()
            assert time.monotonic() - began < 2, "a call hung while the daemon was down"

        n2.spawn()
        respawned = time.monotonic()
        await cluster.wait_ready([n2])
        await until(lambda: agent.registrations >= 2, "the agent to re-register")
        assert host.reconnects >= 1
        print(f"re-registered {time.monotonic() - respawned:.2f} s after the respawn")

        async def answered() -> Any:
            try:
                return await caller.request("phoenix", 3, timeout=2)
            except (NotFound, Unreachable, Timeout):
                return None

        assert await eventually(answered, "the agent to answer again", timeout=15) == {
            "echo": 3,
            "on": "n2",
        }
        print(f"answering n1 again {time.monotonic() - respawned:.2f} s after the respawn")
        assert await host.request("phoenix", 4) == {"echo": 4, "on": "n2"}
        assert agent.stop_reason is None
        assert starts == ["phoenix"], "on_start runs once, not per registration"


async def test_dead_host_fails_fast_then_a_new_agent_takes_the_name(cluster: LocalCluster) -> None:
    n1, n2, n3 = await start(cluster, 3)
    async with (
        Mesh.connect(n3.socket_path) as doomed,
        Mesh.connect(n1.socket_path) as caller,
        Mesh.connect(n2.socket_path) as other,
    ):
        await doomed.serve("svc", echo)
        await resolves(caller, "svc", "n3")
        assert (await caller.request("svc", 1))["on"] == "n3"

        n3.kill()
        began = time.monotonic()
        with pytest.raises(Unreachable):
            await caller.request("svc", 2, timeout=30)
        failed_after = time.monotonic() - began
        assert failed_after < 10, "the call waited instead of failing fast"
        print(f"first call to the dead host failed after {failed_after:.2f} s")
        # From now on: at once, every time.
        for _ in range(3):
            began = time.monotonic()
            with pytest.raises(Unreachable):
                await caller.request("svc", 3, timeout=30)
            assert time.monotonic() - began < 2
        assert await caller.health("svc") == "unreachable"

        # The name is free again once n2 too knows its holder is dead (until then n2 still
        # sees a live entry, and serving it there is a Conflict).
        await cluster.wait_status(["n2"], "n3", "dead", timeout=15)
        await other.serve("svc", echo)

        async def answered() -> Any:
            try:
                return await caller.request("svc", 4, timeout=2)
            except (NotFound, Unreachable, Timeout):
                return None

        assert await eventually(answered, "the new svc to answer") == {
            "echo": 4,
            "on": "n2",
            "from": "",
        }
        assert await caller.health("svc") == "healthy"


async def test_a_suspected_host_fails_fast_before_any_verdict(cluster: LocalCluster) -> None:
    """A silent host (SIGSTOP: no reset, no answer): as soon as the caller's daemon suspects
    it, the circuit is open and calls to its agent fail with ``unreachable`` at once, without
    waiting for their timeout or for the suspicion to become a verdict."""
    n1, _, n3 = await start(cluster, 3)
    async with Mesh.connect(n3.socket_path) as silent, Mesh.connect(n1.socket_path) as caller:
        await silent.serve("quiet", echo)
        await resolves(caller, "quiet", "n3")
        assert (await caller.request("quiet", 1))["on"] == "n3"

        n3.signal(signal.SIGSTOP)
        try:
            await cluster.wait_status(["n1"], "n3", "suspect", timeout=15)
            began = time.monotonic()
            with pytest.raises(Unreachable):
                await caller.request("quiet", 2, timeout=30)
            failed_after = time.monotonic() - began
            # Still only a suspicion on n1 (the minimum suspicion lasts seconds).
            assert (await n1.statuses())["n3"] == "suspect"
            assert failed_after < 1.0, "the call waited instead of failing fast"
        finally:
            n3.signal(signal.SIGCONT)


async def test_agents_of_a_closed_session_are_unregistered_everywhere(
    cluster: LocalCluster,
) -> None:
    daemons = await start(cluster, 3)
    n1, n2, _ = daemons

    async with Mesh.connect(n1.socket_path) as watcher:
        # Graceful: the client closes its mesh.
        async with Mesh.connect(n2.socket_path) as host:
            await host.serve("transient", echo)
            await resolves(watcher, "transient", "n2")
        for d in daemons:
            await eventually(lambda d=d: not_found(d, "transient"), f"unregistered on {d.name}")

        # Abrupt: the serving process is killed; its session just ends.
        name = unique("crash")
        argv = example("echo_asyncio.py", "serve", "--socket", n2.socket_path, "--name", name)
        async with child(argv) as proc:
            await proc.line(lambda line: "serving" in line, "the agent to serve")
            await resolves(watcher, name, "n2")
            proc.process.send_signal(signal.SIGKILL)
            await proc.process.wait()
        for d in daemons:
            await eventually(lambda d=d: not_found(d, name), f"{name} unregistered on {d.name}")
        with pytest.raises(NotFound):
            await watcher.request(name, 1)


# ---------------------------------------------------------------------------- meshctl


async def test_meshctl_messaging_commands(cluster: LocalCluster) -> None:
    n1, n2 = await start(cluster, 2)
    received: list[Any] = []

    async def sink(_ctx: AgentContext, msg: Message) -> None:
        received.append(msg.body)

    async with Mesh.connect(n2.socket_path) as host, Mesh.connect(n1.socket_path) as local:
        await host.serve("echo", echo)
        await host.serve("sink", sink)
        await resolves(local, "echo", "n2")
        await resolves(local, "sink", "n2")

        code, out, err = await run(meshctl(n1, "--json", "request", "echo", '{"a": [1, 2]}'))
        assert code == 0, err
        assert json.loads(out) == {"echo": {"a": [1, 2]}, "on": "n2", "from": ""}

        code, out, err = await run(meshctl(n1, "send", "sink", '"fired"'))
        assert (code, out.strip()) == (0, "sent to sink"), err
        code, out, err = await run(meshctl(n1, "send", "sink", '"surely"', "--at-least-once"))
        assert code == 0, err
        assert "surely" in received  # at-least-once returns once the agent handled it
        await until(lambda: "fired" in received, "the fire-and-forget send")

        code, out, err = await run(meshctl(n1, "health", "echo"))
        assert (code, out.strip()) == (0, "echo: healthy on n2"), err
        code, out, err = await run(meshctl(n1, "--json", "health", "nobody"))
        assert code == 1
        assert json.loads(out)["health"] == "not_found"

        code, out, err = await run(meshctl(n1, "request", "nobody"))
        assert code == 1
        assert err.startswith("meshctl: not_found:"), err
        code, out, err = await run(meshctl(n1, "request", "echo", "{not json"))
        assert code == 1
        assert "meshctl: invalid:" in err

        code, out, err = await run(meshctl(n1, "--json", "publish", "t.none", "1"))
        assert code == 0, err
        assert json.loads(out) == {"hosts": 0}

        async with child(meshctl(n2, "subscribe", "t.*")) as sub:

            async def heard() -> str | None:
                await local.publish("t.probe", type="probe")
                return next((line for line in sub.lines if line.startswith("{")), None)

            await eventually(heard, "meshctl subscribe to hear a probe")
            code, out, err = await run(
                meshctl(n1, "publish", "t.real", '{"k": 1}', "--type", "real", "--subject", "s1")
            )
            assert (code, out.strip()) == (0, "published to 1 host(s)"), err
            line = await sub.line(lambda line: '"real"' in line, "the published signal")
            printed = json.loads(line)
            assert printed["topic"] == "t.real"
            assert printed["event"]["data"] == {"k": 1}
            assert printed["event"]["subject"] == "s1"
            assert printed["event"]["source"] == "meshctl://n1"


# ---------------------------------------------------------------------------- examples


async def test_echo_examples(cluster: LocalCluster) -> None:
    n1, n2 = await start(cluster, 2)
    scripts = ["echo_asyncio.py", "echo_trio.py", "echo_sync.py"]
    async with Mesh.connect(n2.socket_path) as observer, anyio.create_task_group() as tg:

        async def one(script: str) -> None:
            name = unique(script.removesuffix(".py").replace("_", "-"))
            serve = example(script, "serve", "--socket", n1.socket_path, "--name", name)
            async with child(serve) as server:
                await server.line(lambda line: f"{name} serving on n1" in line, "serving", 15)
                await resolves(observer, name, "n1")
                code, out, err = await run(
                    example(
                        script,
                        "call",
                        f"hi from {script}",
                        "--socket",
                        n2.socket_path,
                        "--name",
                        name,
                    )
                )
                assert code == 0, err + out
                assert out.strip() == str({"echo": f"hi from {script}", "by": name, "from": ""})

        for script in scripts:
            tg.start_soon(one, script)


async def test_counter_example(cluster: LocalCluster) -> None:
    n1, n2, n3 = await start(cluster, 3)
    name = unique("counter")
    async with (
        Mesh.connect(n2.socket_path) as observer,
        child(example("counter.py", "serve", "--socket", n1.socket_path, "--name", name)) as srv,
    ):
        await srv.line(lambda line: line == f"{name} started; count = 0", "the counter", 15)
        await resolves(observer, name, "n1")
        code, out, err = await run(
            example("counter.py", "incr", "5", "--socket", n2.socket_path, "--name", name)
        )
        assert (code, out.strip()) == (0, "5"), err
        code, out, err = await run(
            example("counter.py", "incr", "--socket", n3.socket_path, "--name", name)
        )
        assert (code, out.strip()) == (0, "6"), err

        async def read_on_n2() -> str | None:
            code, out, err = await run(
                example("counter.py", "read", "--socket", n2.socket_path, "--name", name)
            )
            assert code == 0, err
            return out.strip() if out.strip() == "6" else None

        assert await eventually(read_on_n2, "the count to replicate to n2") == "6"
        srv.process.send_signal(signal.SIGINT)
        with anyio.fail_after(10):
            await srv.process.wait()


async def test_pubsub_pipeline_example(cluster: LocalCluster) -> None:
    n1, n2, n3 = await start(cluster, 3)
    script = "pubsub_pipeline.py"
    async with (
        Mesh.connect(n1.socket_path) as on_n1,
        Mesh.connect(n3.socket_path) as on_n3,
        child(example(script, "enricher", "--socket", n1.socket_path)) as enricher,
        child(example(script, "sink", "--socket", n2.socket_path)) as sink,
    ):
        await enricher.line(lambda line: "waiting for orders" in line, "the enricher", 15)
        await sink.line(lambda line: "listening" in line, "the sink", 15)

        # Wait until the subscriptions have spread: n3 sends created orders to both n1 and n2,
        # n1 sends priced ones to n2. A priced probe reaching the sink proves the whole path.
        async def ready() -> bool | None:
            to_both = await on_n3.publish(
                "orders.probe.created", {"id": -1, "item": "plum", "qty": 1}, subject="probe"
            )
            to_sink = await on_n1.publish("orders.probe", None, type="probe")
            seen = any(line.startswith("sink: probe") for line in sink.lines)
            return True if (to_both, to_sink) == (2, 1) and seen else None

        await eventually(ready, "the pipeline to connect", timeout=15)

        code, out, err = await run(example(script, "produce", "4", "--socket", n3.socket_path))
        assert code == 0, err
        assert out.strip().splitlines() == [f"produced order {i} (to 2 host(s))" for i in range(4)]
        expected = {
            "order-0": {"id": 0, "item": "apple", "qty": 1, "total": 3},
            "order-1": {"id": 1, "item": "pear", "qty": 2, "total": 8},
            "order-2": {"id": 2, "item": "plum", "qty": 3, "total": 6},
            "order-3": {"id": 3, "item": "apple", "qty": 4, "total": 12},
        }
        for subject, order in expected.items():
            line = await sink.line(lambda line, s=subject: line.startswith(f"sink: {s} "), subject)
            assert line == f"sink: {subject} {order}"


async def test_a_retry_whose_reply_was_let_go_is_told_it_was_handled(
    cluster: LocalCluster,
) -> None:
    """The receiving daemon keeps at-least-once replies within a byte budget (32 MiB): a
    retry of an old message whose reply it no longer holds gets ``conflict`` with
    ``detail.handled`` — not a wrong reply, and the handler does not run again."""
    n1, n2 = await start(cluster, 2)
    runs: list[str] = []
    pad = "x" * 400_000

    async def big(_ctx: AgentContext, msg: Message) -> Any:
        runs.append(msg.body)
        return {"n": len(runs), "pad": pad}

    async with Mesh.connect(n2.socket_path) as host, Mesh.connect(n1.socket_path) as caller:
        await host.serve("big", big)
        await resolves(caller, "big", "n2")
        first = await caller.request("big", "m-0", at_least_once=True, id="m-0", timeout=30)
        assert first["n"] == 1
        for i in range(1, 90):  # 90 × 400 kB of replies: more than the budget holds
            await caller.request("big", f"m-{i}", at_least_once=True, id=f"m-{i}", timeout=30)
        assert len(runs) == 90
        with pytest.raises(Conflict) as gone:
            await caller.request("big", "m-0", at_least_once=True, id="m-0", timeout=30)
        assert gone.value.detail.get("handled") is True
        recent = await caller.request("big", "m-89", at_least_once=True, id="m-89", timeout=30)
        assert recent["n"] == 90  # a recent reply is still held: the same answer
        assert len(runs) == 90
