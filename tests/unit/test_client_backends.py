"""The client library against a real meshd daemon, under asyncio and under trio, and the
synchronous wrapper from plain threads.

One daemon (a real ``python -m meshd run`` process, via LocalCluster) serves the whole module;
it is stopped by pid at the end. Each test runs its scenario once per backend with
``anyio.run(..., backend=...)``; names are unique per run, so tests never see each other's
agents, documents or topics.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest

from meshd.testing.localcluster import Daemon, LocalCluster
from meshd.testing.poll import eventually, until
from meshd_client import (
    AgentContext,
    Conflict,
    Internal,
    Invalid,
    Mesh,
    MeshError,
    Message,
    NotFound,
    Signal,
    Timeout,
    Unreachable,
)
from meshd_client import sync as sync_client
from meshd_client.sync import SyncAgentContext

T = TypeVar("T")
BACKENDS = ["asyncio", "trio"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    cluster = LocalCluster(tmp_path_factory.mktemp("backends") / "cluster", profile="local")
    solo = cluster.add("solo")
    try:
        anyio.run(cluster.wait_ready)
        yield solo
    finally:
        cluster.stop_all()  # SIGTERM, then SIGKILL, by pid: only the process started here
        if "Traceback" in solo.log_text():
            print(f"--- daemon log ---\n{solo.log_text()[-4000:]}")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run(backend: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return anyio.run(fn, *args, backend=backend)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def gone(mesh: Mesh, name: str) -> None:
    async def check() -> bool | None:
        try:
            await mesh.lookup(name)
        except NotFound:
            return True
        return None

    await eventually(check, f"{name!r} to be unregistered")


async def echo(ctx: AgentContext, msg: Message) -> dict[str, Any]:
    return {"echo": msg.body, "by": ctx.name, "from": msg.sender, "request": msg.is_request}


# ---------------------------------------------------------------------------- connect


def test_connect(daemon: Daemon, backend: str) -> None:
    async def scenario() -> None:
        async with Mesh.connect(daemon.socket_path, client="backends-test") as mesh:
            assert mesh.node == "solo"
            assert mesh.connected
            assert mesh.reconnects == 0
            info = await mesh.call("info")
            assert info["node"] == "solo"

    run(backend, scenario)


def test_connect_to_nothing_is_unreachable(tmp_path: Path, backend: str) -> None:
    async def scenario() -> None:
        with pytest.raises(Unreachable):
            async with Mesh.connect(str(tmp_path / "none.sock"), connect_timeout=1):
                pass

    run(backend, scenario)


# ---------------------------------------------------------------------------- agents


def test_function_agent_request_reply(daemon: Daemon, backend: str) -> None:
    name = unique("echo")

    async def scenario() -> None:
        async with Mesh.connect(daemon.socket_path) as mesh:
            agent = await mesh.serve(
                name, echo, kind="echo", capabilities=["echo", "test"], metadata={"v": 1}
            )
            assert agent.info is not None
            assert (agent.info.name, agent.info.node, agent.info.kind) == (name, "solo", "echo")
            reply = await mesh.request(name, {"hello": [1, 2]}, sender="caller")
            assert reply == {
                "echo": {"hello": [1, 2]},
                "by": name,
                "from": "caller",
                "request": True,
            }
            assert await mesh.request(name, None) == {
                "echo": None,
                "by": name,
                "from": "",
                "request": True,
            }
            info = await mesh.lookup(name)
            assert (info.node, info.capabilities, info.metadata) == (
                "solo",
                ("echo", "test"),
                {"v": 1},
            )
            assert name in [a.name for a in await mesh.find("test")]
            assert name in [a.name for a in await mesh.agents(kind="echo", node="solo")]
            assert await mesh.health(name) == "healthy"
            assert agent.handled == 2

    run(backend, scenario)


class Lifecycle:
    def __init__(self) -> None:
        self.events: list[Any] = []

    async def on_start(self, ctx: AgentContext) -> None:
        self.events.append(("start", ctx.name))

    async def handle(self, ctx: AgentContext, msg: Message) -> Any:
        self.events.append(("handle", msg.body))
        await ctx.state.incr("calls")
        return {"calls": await ctx.state.get("calls"), "body": msg.body}

    async def on_stop(self, ctx: AgentContext, reason: str) -> None:
        self.events.append(("stop", reason))


def test_class_agent_with_on_start_and_on_stop(daemon: Daemon, backend: str) -> None:
    name = unique("klass")

    async def scenario() -> None:
        handler = Lifecycle()
        async with Mesh.connect(daemon.socket_path) as mesh:
            agent = await mesh.serve(name, handler)
            assert handler.events == [("start", name)]  # before serve() returned
            assert await mesh.request(name, "a") == {"calls": 1, "body": "a"}
            assert await mesh.request(name, "b") == {"calls": 2, "body": "b"}
            # The agent's state document is readable by anyone.
            assert await mesh.state(f"agent:{name}").get("calls") == 2
            agent.stop()
            with anyio.fail_after(5):
                await agent.wait()
            assert handler.events[-1] == ("stop", "stopped")
            assert agent.stop_reason == "stopped"
            await gone(mesh, name)
            with pytest.raises(NotFound):
                await mesh.request(name, "c")
        assert handler.events == [
            ("start", name),
            ("handle", "a"),
            ("handle", "b"),
            ("stop", "stopped"),
        ]

    run(backend, scenario)


def test_closing_the_mesh_stops_its_agents(daemon: Daemon, backend: str) -> None:
    name = unique("closing")

    async def scenario() -> None:
        handler = Lifecycle()
        async with Mesh.connect(daemon.socket_path) as mesh:
            await mesh.serve(name, handler)
        assert handler.events[-1][0] == "stop"
        async with Mesh.connect(daemon.socket_path) as other:
            await gone(other, name)

    run(backend, scenario)


def test_send_is_fire_and_forget(daemon: Daemon, backend: str) -> None:
    name = unique("sink")

    async def scenario() -> None:
        seen: list[Message] = []

        async def record(_ctx: AgentContext, msg: Message) -> str:
            seen.append(msg)
            return "ignored: nobody waits for a reply to a send"

        async with Mesh.connect(daemon.socket_path) as mesh:
            await mesh.serve(name, record)
            for i in range(3):
                assert await mesh.send(name, {"i": i}, sender="s") is None
            await until(lambda: len(seen) == 3, "three messages")
            assert [m.body for m in seen] == [{"i": 0}, {"i": 1}, {"i": 2}]
            assert all(not m.is_request and not m.at_least_once and m.sender == "s" for m in seen)
            assert len({m.id for m in seen}) == 3

    run(backend, scenario)


def test_at_least_once(daemon: Daemon, backend: str) -> None:
    name = unique("alo")
    send_id, req_id, other_id = unique("send"), unique("req"), unique("req")

    async def scenario() -> None:
        handled: list[str] = []

        async def record(_ctx: AgentContext, msg: Message) -> Any:
            assert msg.at_least_once
            handled.append(msg.id)
            return {"n": len(handled), "body": msg.body}

        async with Mesh.connect(daemon.socket_path) as mesh:
            await mesh.serve(name, record)
            # A send with at_least_once returns only once the agent handled it.
            await mesh.send(name, "x", at_least_once=True, id=send_id)
            assert handled == [send_id]
            # A retry with the same id does not run the handler again, and gets the same reply.
            first = await mesh.request(name, "y", at_least_once=True, id=req_id)
            again = await mesh.request(name, "y", at_least_once=True, id=req_id)
            assert first == again == {"n": 2, "body": "y"}
            await mesh.send(name, "x", at_least_once=True, id=send_id)
            assert handled == [send_id, req_id]
            # Another id is another message.
            assert await mesh.request(name, "z", at_least_once=True, id=other_id) == {
                "n": 3,
                "body": "z",
            }
            assert handled == [send_id, req_id, other_id]

    run(backend, scenario)


def test_at_least_once_ids_belong_to_the_receiving_agent(daemon: Daemon, backend: str) -> None:
    """Senders choose message ids; the same id sent to two agents is two messages. (The
    daemon once remembered ids across agents, so the second agent never got its message
    while its sender was told it had been handled.)"""
    first, second = unique("alo-a"), unique("alo-b")
    shared_id = unique("shared")

    async def scenario() -> None:
        handled: list[tuple[str, str]] = []

        async def record(ctx: AgentContext, msg: Message) -> str:
            handled.append((ctx.name, msg.id))
            return ctx.name

        async with Mesh.connect(daemon.socket_path) as mesh:
            await mesh.serve(first, record)
            await mesh.serve(second, record)
            assert await mesh.request(first, 1, at_least_once=True, id=shared_id) == first
            assert await mesh.request(second, 1, at_least_once=True, id=shared_id) == second
            await mesh.send(second, 2, at_least_once=True, id=shared_id)  # a retry: remembered
            assert handled == [(first, shared_id), (second, shared_id)]

    run(backend, scenario)


def test_turn_based_ordering_with_concurrency_one(daemon: Daemon, backend: str) -> None:
    name = unique("turns")

    async def scenario() -> None:
        log: list[tuple[str, int]] = []

        async def handler(_ctx: AgentContext, msg: Message) -> None:
            log.append(("start", msg.body))
            await anyio.sleep(0.005)
            log.append(("end", msg.body))

        async with Mesh.connect(daemon.socket_path) as mesh:
            await mesh.serve(name, handler, concurrency=1)
            for i in range(20):
                await mesh.send(name, i)  # returns when handed over, not when handled
            await until(lambda: len(log) == 40, "twenty messages handled")
        expected = [(what, i) for i in range(20) for what in ("start", "end")]
        assert log == expected, "messages overlapped or ran out of order"

    run(backend, scenario)


def test_concurrency_lets_handlers_overlap(daemon: Daemon, backend: str) -> None:
    name = unique("wide")

    async def scenario() -> None:
        active = 0
        peak = 0
        four_running = anyio.Event()

        async def handler(_ctx: AgentContext, msg: Message) -> int:
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            if active == 4:
                four_running.set()
            with anyio.fail_after(5):  # only four at once can release each other
                await four_running.wait()
            await anyio.sleep(0.01)
            active -= 1
            return int(msg.body)

        async with Mesh.connect(daemon.socket_path) as mesh:
            await mesh.serve(name, handler, concurrency=4)
            results: dict[int, int] = {}

            async def call(i: int) -> None:
                results[i] = await mesh.request(name, i)

            async with anyio.create_task_group() as tg:
                for i in range(12):
                    tg.start_soon(call, i)
        assert results == {i: i for i in range(12)}
        assert peak == 4

    run(backend, scenario)


# ---------------------------------------------------------------------------- errors


def test_errors_are_typed(daemon: Daemon, backend: str) -> None:
    name = unique("typed")

    async def scenario() -> None:
        async with (
            Mesh.connect(daemon.socket_path) as mesh,
            Mesh.connect(daemon.socket_path) as other,
        ):
            with pytest.raises(NotFound):
                await mesh.request(unique("nobody"), 1)
            with pytest.raises(NotFound):
                await mesh.send(unique("nobody"), 1)
            with pytest.raises(NotFound):
                await mesh.lookup(unique("nobody"))
            assert await mesh.health(unique("nobody")) == "not_found"
            with pytest.raises(Invalid):
                await mesh.call("send", {"to": 5})
            with pytest.raises(Invalid):
                await mesh.call("request", {"to": name, "timeout": -1})
            with pytest.raises(Invalid):
                await mesh.call("request", {"to": name, "at_least_once": "yes"})
            with pytest.raises(Invalid):
                await mesh.call("no.such.op")
            with pytest.raises(Invalid):
                await mesh.publish("bad..topic", 1)
            with pytest.raises(Invalid):
                await mesh.publish("wild.*", 1)
            with pytest.raises(Invalid):
                await mesh.state(unique("doc")).update([{"op": "explode", "path": ["x"]}])
            with pytest.raises(Invalid):
                await mesh.serve("", echo)
            with pytest.raises(Invalid), anyio.fail_after(5):
                async with mesh.subscribe("**.a") as signals:
                    async for _ in signals:
                        pass
            await mesh.serve(name, echo)
            with pytest.raises(Conflict):
                await other.serve(name, echo)  # another client
            with pytest.raises(Conflict):
                await mesh.serve(name, echo)  # this client again
            # Still served by the first one.
            assert (await other.request(name, 1))["by"] == name
            assert isinstance(NotFound("x"), MeshError)

    run(backend, scenario)


def test_errors_inside_stream_blocks_come_out_as_themselves(daemon: Daemon, backend: str) -> None:
    class Mine(Exception):
        pass

    async def scenario() -> None:
        async with Mesh.connect(daemon.socket_path) as mesh:
            with pytest.raises(Mine):
                async with mesh.subscribe(f"{unique('mine')}.*"):
                    raise Mine
            with pytest.raises(Mine):
                async with mesh.watch_registry():
                    raise Mine
            with pytest.raises(NotFound):
                async with mesh.state(unique("doc")).watch():
                    await mesh.lookup(unique("nobody"))
            assert mesh.connected

    run(backend, scenario)


def test_handler_failures_reach_the_caller_typed(daemon: Daemon, backend: str) -> None:
    name = unique("failing")

    async def scenario() -> None:
        async def handler(_ctx: AgentContext, msg: Message) -> Any:
            if msg.body == "bug":
                raise ValueError("boom")
            if msg.body == "busy":
                raise Conflict("try later", detail={"retry": 1})
            if msg.body == "slow":
                await anyio.sleep(3)
            return "fine"

        async with Mesh.connect(daemon.socket_path) as mesh:
            agent = await mesh.serve(name, handler, concurrency=2)
            with pytest.raises(Internal, match="ValueError: boom"):
                await mesh.request(name, "bug")
            with pytest.raises(Conflict, match="try later") as caught:
                await mesh.request(name, "busy")
            assert caught.value.detail == {"retry": 1}
            with pytest.raises(Internal):
                await mesh.send(name, "bug", at_least_once=True)
            await mesh.send(name, "bug")  # fire-and-forget: the sender never hears of it
            with pytest.raises(Timeout):
                await mesh.request(name, "slow", timeout=0.5)
            assert await mesh.request(name, "ok") == "fine"  # the agent is still serving
            assert agent.stop_reason is None

    run(backend, scenario)


# ---------------------------------------------------------------------------- state


def test_state_get_set_incr_watch(daemon: Daemon, backend: str) -> None:
    doc_name = unique("doc")

    async def scenario() -> None:
        async with Mesh.connect(daemon.socket_path) as mesh:
            doc = mesh.state(doc_name)
            assert await doc.get() == {}
            with pytest.raises(NotFound):
                await doc.get("missing")
            assert await doc.get("missing", default=7) == 7
            await doc.set("color", "blue")
            await doc.set(["limits"], {"cpu": 2})
            await doc.set(["limits", "mem"], 512)
            await doc.incr("hits")
            await doc.incr("hits", 4)
            await doc.set("log", [])
            await doc.append("log", "a", "b")
            assert await doc.get("hits") == 5
            assert await doc.get(["limits", "cpu"]) == 2
            assert await doc.get() == {
                "color": "blue",
                "limits": {"cpu": 2, "mem": 512},
                "hits": 5,
                "log": ["a", "b"],
            }
            await doc.delete("color")
            assert "color" not in await doc.get()
            result = await doc.update([{"op": "incr", "path": ["hits"], "by": 1}], "majority")
            assert isinstance(result, dict)
            async with doc.watch() as values:
                with anyio.fail_after(5):
                    first = await values.__anext__()
                    assert first["hits"] == 6
                    await doc.incr("hits")
                    while (await values.__anext__())["hits"] != 7:
                        pass

    run(backend, scenario)


# ---------------------------------------------------------------------------- signals


async def collect(items: AsyncIterator[Signal], into: list[Signal]) -> None:
    async for signal in items:
        into.append(signal)


async def wait_subscribed(
    mesh: Mesh, probes: dict[str, list[Signal]], topics_by_sink: dict[str, str]
) -> None:
    """Publish probe signals until every subscription has seen one (a subscription starts
    working shortly after subscribe() returns)."""

    async def check() -> bool | None:
        for sink, topic in topics_by_sink.items():
            if not any(s.type == "probe" for s in probes[sink]):
                await mesh.publish(topic, None, type="probe")
        return True if all(any(s.type == "probe" for s in v) for v in probes.values()) else None

    await eventually(check, "subscriptions to take effect")


def test_subscribe_and_publish_with_wildcards(daemon: Daemon, backend: str) -> None:
    p = unique("sig")

    async def scenario() -> None:
        got: dict[str, list[Signal]] = {"one": [], "deep": [], "exact": []}
        async with (
            Mesh.connect(daemon.socket_path) as mesh,
            Mesh.connect(daemon.socket_path) as pub,
        ):
            async with (
                mesh.subscribe(f"{p}.*") as one,
                mesh.subscribe(f"{p}.**") as deep,
                mesh.subscribe(f"{p}.x.y") as exact,
                anyio.create_task_group() as tg,
            ):
                tg.start_soon(collect, one, got["one"])
                tg.start_soon(collect, deep, got["deep"])
                tg.start_soon(collect, exact, got["exact"])
                await wait_subscribed(
                    pub, got, {"one": f"{p}.probe", "deep": f"{p}.probe", "exact": f"{p}.x.y"}
                )
                hosts = {}
                for topic in (f"{p}.a", f"{p}.x.y", f"{p}.x.z", p, f"other.{p}", f"{p}.b"):
                    hosts[topic] = await pub.publish(
                        topic, {"t": topic}, type="real", subject="s", extensions={"ext": 1}
                    )
                expected = {
                    "one": [f"{p}.a", f"{p}.b"],
                    "deep": [f"{p}.a", f"{p}.x.y", f"{p}.x.z", f"{p}.b"],
                    "exact": [f"{p}.x.y"],
                }

                def real(sink: str) -> list[str]:
                    return [s.topic for s in got[sink] if s.type == "real"]

                await until(
                    lambda: all(len(real(k)) >= len(v) for k, v in expected.items()), "signals"
                )
                await anyio.sleep(0.2)  # anything extra would have arrived by now
                assert {k: real(k) for k in expected} == expected
                tg.cancel_scope.cancel()
            # One daemon: a signal goes to this host once, or nowhere.
            assert hosts == {
                f"{p}.a": 1,
                f"{p}.x.y": 1,
                f"{p}.x.z": 1,
                p: 0,
                f"other.{p}": 0,
                f"{p}.b": 1,
            }
            signal = next(s for s in got["exact"] if s.type == "real")
            assert signal.data == {"t": f"{p}.x.y"}
            assert signal.subject == "s"
            assert signal.extensions.get("ext") == 1
            assert signal.source.startswith("meshd://solo/")
            assert signal.specversion == "1.0"

    run(backend, scenario)


def test_a_subscriber_that_falls_behind_keeps_its_subscription(
    daemon: Daemon, backend: str
) -> None:
    """Signals are at most once: a subscriber that stops reading loses signals, but once it
    reads again its subscription works (it is re-opened, never silently ended)."""
    p = unique("lag")

    async def scenario() -> None:
        got: list[Signal] = []
        paused = False
        resume = anyio.Event()

        async def reader(signals: AsyncIterator[Signal]) -> None:
            async for signal in signals:
                got.append(signal)
                if paused:
                    await resume.wait()

        def types() -> list[str]:
            return [s.type for s in got]

        async with (
            Mesh.connect(daemon.socket_path) as mesh,
            Mesh.connect(daemon.socket_path) as pub,
            mesh.subscribe(f"{p}.*") as signals,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(reader, signals)
            await wait_subscribed(pub, {"s": got}, {"s": f"{p}.probe"})
            paused = True
            await pub.publish(f"{p}.pause", type="pause")
            await until(lambda: "pause" in types(), "the reader to stop reading")
            # More than both client-side buffers (1,024 each) while nobody reads.
            for i in range(2300):
                await pub.publish(f"{p}.flood", i, type="flood")
            paused = False
            resume.set()
            with anyio.fail_after(10):
                while "marker" not in types():
                    await pub.publish(f"{p}.marker", type="marker")
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        flood = [s.data for s in got if s.type == "flood"]
        assert 0 < len(flood) < 2300, "the subscriber should have lost signals"
        assert flood == sorted(flood)

    run(backend, scenario)


def test_watch_registry(daemon: Daemon, backend: str) -> None:
    name = unique("watched")

    async def scenario() -> None:
        async with (
            Mesh.connect(daemon.socket_path) as mesh,
            Mesh.connect(daemon.socket_path) as srv,
            mesh.watch_registry() as events,
        ):
            agent = await srv.serve(name, echo, kind="watched")
            with anyio.fail_after(5):
                async for event in events:
                    if event.name == name:
                        break
            assert event.kind == "registered"
            assert (event.agent.name, event.agent.node, event.agent.kind) == (
                name,
                "solo",
                "watched",
            )
            agent.stop()
            with anyio.fail_after(5):
                async for event in events:
                    if event.name == name:
                        break
            assert event.kind == "unregistered"

    run(backend, scenario)


# ---------------------------------------------------------------------------- sync wrapper


def test_sync_mesh_basics_from_plain_threads(daemon: Daemon, backend: str) -> None:
    echo_name = unique("sync-echo")
    relay_name = unique("sync-relay")
    calls: list[str] = []
    lock = threading.Lock()

    def sync_echo(ctx: SyncAgentContext, msg: Message) -> Any:
        assert threading.current_thread() is not threading.main_thread()
        with lock:
            calls.append(msg.id)
        if msg.body == "bug":
            raise RuntimeError("sync boom")
        return {"echo": msg.body, "by": ctx.name}

    def relay(ctx: SyncAgentContext, msg: Message) -> Any:
        # A blocking handler calling other agents and state from its worker thread.
        ctx.state.incr("relayed")
        return {"via": ctx.name, "reply": ctx.request(echo_name, msg.body)}

    with sync_client.Mesh(daemon.socket_path, backend=backend) as mesh:  # type: ignore[arg-type]
        assert mesh.node == "solo"
        agent = mesh.serve(echo_name, sync_echo, kind="sync", concurrency=4)
        assert agent.info is not None and agent.info.node == "solo"
        mesh.serve(relay_name, relay)
        assert mesh.request(echo_name, "hi") == {"echo": "hi", "by": echo_name}

        def call(i: int) -> Any:
            return mesh.request(echo_name, i)

        with ThreadPoolExecutor(max_workers=8) as pool:
            replies = list(pool.map(call, range(24)))
        assert replies == [{"echo": i, "by": echo_name} for i in range(24)]

        assert mesh.request(relay_name, "r") == {
            "via": relay_name,
            "reply": {"echo": "r", "by": echo_name},
        }
        assert mesh.state(f"agent:{relay_name}").get("relayed") == 1

        before = len(calls)
        mesh.send(echo_name, "fire")
        deadline = time.monotonic() + 5
        while len(calls) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) == before + 1

        alo_id = unique("sync-alo")
        mesh.send(echo_name, "once", at_least_once=True, id=alo_id)
        mesh.send(echo_name, "once", at_least_once=True, id=alo_id)
        assert calls.count(alo_id) == 1

        with pytest.raises(NotFound):
            mesh.request(unique("nobody"), 1)
        with pytest.raises(Internal, match="sync boom"):
            mesh.request(echo_name, "bug")
        with pytest.raises(Conflict):
            mesh.serve(echo_name, sync_echo)
        assert mesh.health(echo_name) == "healthy"
        assert mesh.lookup(echo_name).kind == "sync"
        assert echo_name in [a.name for a in mesh.agents(kind="sync")]

        doc = mesh.state(unique("sync-doc"))
        doc.set("a", 1)
        doc.incr("n", 2)
        doc.set("l", [])
        doc.append("l", "x")
        assert doc.get() == {"a": 1, "n": 2, "l": ["x"]}
        assert doc.get("missing", default=None) is None

        topic = unique("sync-topic")
        with mesh.subscribe(f"{topic}.*") as signals:
            stop = threading.Event()

            def probe() -> None:
                while not stop.is_set():
                    mesh.publish(f"{topic}.probe", type="probe")
                    time.sleep(0.05)

            prober = threading.Thread(target=probe)
            prober.start()
            try:
                first = next(signals)
            finally:
                stop.set()
                prober.join()
            assert first.topic == f"{topic}.probe"
            assert mesh.publish(f"{topic}.real", {"k": 1}, type="real") == 1
            real = next(s for s in signals if s.type == "real")
            assert real.data == {"k": 1}

        with mesh.watch_registry() as events:
            late = unique("sync-late")
            mesh.serve(late, sync_echo)
            event = next(e for e in events if e.name == late)
            assert event.kind == "registered"

        agent.stop()
        assert agent.wait(timeout=5)
        assert agent.stop_reason == "stopped"


def test_a_sync_script_that_raises_before_close_exits_with_its_traceback(daemon: Daemon) -> None:
    script = (
        "from meshd_client.sync import Mesh\n"
        f"mesh = Mesh({daemon.socket_path!r})\n"
        "mesh.lookup\n"
        "raise SystemError('the script failed before close()')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert "the script failed before close()" in done.stderr
    assert "Traceback" in done.stderr
