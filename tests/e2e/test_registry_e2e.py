"""The agent registry and shared state on real daemons: resolution everywhere, sessions,
conflicts, crashes, majority writes, joins and restarts. Every wait is a poll with a timeout."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from meshd.testing.localcluster import Daemon, LocalCluster
from meshd.testing.poll import eventually
from meshd_client.connection import Connection
from meshd_client.protocol.errors import ErrorKind, MeshError, NotFound

T = TypeVar("T")

SET_DOC = [
    {"op": "set", "path": ["color"], "value": "blue"},
    {"op": "set", "path": ["limits"], "value": {"cpu": 2, "tags": ["a", "b"]}},
    {"op": "incr", "path": ["hits"], "by": 3},
]
DOC_VALUE = {"color": "blue", "limits": {"cpu": 2, "tags": ["a", "b"]}, "hits": 3}


# ---------------------------------------------------------------------------- helpers


async def lookup(daemon: Daemon, name: str) -> dict[str, Any] | None:
    try:
        entry: dict[str, Any] = await daemon.call("lookup", {"name": name})
        return entry
    except NotFound:
        return None


async def resolved_everywhere(
    daemons: Iterable[Daemon], name: str, timeout: float = 10.0
) -> dict[str, dict[str, Any]]:
    """Until ``name`` resolves on every daemon; the entry each one returns."""
    out: dict[str, dict[str, Any]] = {}
    for daemon in daemons:

        async def check(d: Daemon = daemon) -> dict[str, Any] | None:
            return await lookup(d, name)

        out[daemon.name] = await eventually(check, f"{name!r} on {daemon.name}", timeout)
    return out


async def gone_everywhere(daemons: Iterable[Daemon], name: str, timeout: float = 10.0) -> None:
    for daemon in daemons:

        async def check(d: Daemon = daemon) -> bool | None:
            return True if await lookup(d, name) is None else None

        await eventually(check, f"{name!r} to stop resolving on {daemon.name}", timeout)


async def state_value(daemon: Daemon, doc: str) -> Any:
    try:
        return await daemon.call("state.get", {"doc": doc})
    except NotFound:
        return None


async def state_everywhere(
    daemons: Iterable[Daemon], doc: str, expected: Any, timeout: float = 10.0
) -> None:
    for daemon in daemons:

        async def check(d: Daemon = daemon) -> bool | None:
            return True if await state_value(d, doc) == expected else None

        await eventually(check, f"state {doc!r} = {expected!r} on {daemon.name}", timeout)


async def next_event(
    events: AsyncIterator[Any], match: Callable[[Any], bool], what: str, timeout: float = 10.0
) -> Any:
    """The first event of a stream that ``match`` accepts."""
    try:
        with anyio.fail_after(timeout):
            async for event in events:
                if match(event):
                    return event
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None
    raise AssertionError(f"stream ended while waiting for {what}")


def meshctl_argv(sock: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "meshd.cli.meshctl", "--socket", sock, *args]


def meshctl(sock: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        meshctl_argv(sock, *args), capture_output=True, text=True, timeout=30, check=False
    )


async def run_meshctl(sock: str, *args: str) -> subprocess.CompletedProcess[str]:
    return await anyio.to_thread.run_sync(lambda: meshctl(sock, *args))


class LineReader:
    """Lines of a child process's stdout, read with a timeout."""

    def __init__(self, process: Process) -> None:
        assert process.stdout is not None
        self._buffer = BufferedByteReceiveStream(process.stdout)
        self.lines: list[str] = []

    async def until(self, needle: str, timeout: float) -> str | None:
        """The first line (from now on) containing ``needle``, or None after ``timeout``."""
        with anyio.move_on_after(timeout):
            while True:
                raw = await self._buffer.receive_until(b"\n", 1 << 16)
                line = raw.decode(errors="replace")
                self.lines.append(line)
                if needle in line:
                    return line
        return None


@contextlib.asynccontextmanager
async def meshctl_events(daemon: Daemon) -> AsyncIterator[LineReader]:
    """``meshctl events`` on ``daemon`` as a child process, subscribed when this yields."""
    process = await anyio.open_process(
        meshctl_argv(daemon.socket_path, "events"),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**daemon.env, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
    )
    try:
        reader = LineReader(process)
        # The subscription starts some time after the process does: register probes until
        # one shows up, so that nothing the test does next can slip by before it.
        for attempt in range(40):
            probe = f"events-probe-{attempt}"
            await daemon.call("register", {"name": probe})  # released when the call's
            if await reader.until(probe, timeout=0.5) is not None:  # connection closes
                break
        else:
            raise AssertionError(f"meshctl events never printed a probe: {reader.lines}")
        yield reader
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        with anyio.move_on_after(5):
            await process.wait()
        if process.returncode is None:
            process.kill()
        await process.aclose()


async def started(cluster: LocalCluster, count: int) -> list[Daemon]:
    daemons = cluster.start_many(count)
    await cluster.wait_ready()
    await cluster.wait_converged()
    return daemons


# ---------------------------------------------------------------------------- registry


async def test_registration_resolves_everywhere_and_shows_in_meshctl(
    cluster: LocalCluster,
) -> None:
    daemons = await started(cluster, 4)
    n1, _, _, n4 = daemons
    async with meshctl_events(n4) as events:
        async with Connection.open(n1.socket_path, client="test") as conn:
            reply = await conn.call(
                "register",
                {
                    "name": "web-1",
                    "kind": "http",
                    "capabilities": ["serve", "tls"],
                    "metadata": {"port": 8080, "zone": "z1"},
                },
            )
            assert reply["name"] == "web-1" and reply["node"] == "n1"
            entries = await resolved_everywhere(daemons, "web-1")
            for where, entry in entries.items():
                assert entry == reply, where
                assert entry["kind"] == "http"
                assert entry["capabilities"] == ["serve", "tls"]
                assert entry["metadata"] == {"port": 8080, "zone": "z1"}
                assert entry["entry_id"].startswith("n1/")
                assert isinstance(entry["registered_at"], int)
            for daemon in daemons:
                for query in (
                    {"capability": "tls"},
                    {"kind": "http"},
                    {"node": "n1"},
                    {"kind": "http", "capability": "serve"},
                ):
                    found = await daemon.call("agents", query)
                    assert found["count"] == 1, (daemon.name, query, found)
                    assert found["agents"][0]["entry_id"] == reply["entry_id"]
                none = await daemon.call("agents", {"capability": "nope"})
                assert none == {"count": 0, "agents": []}
                assert (await daemon.call("agents", {"kind": "http", "limit": 0}))["count"] == 1

            table = await run_meshctl(n4.socket_path, "agents")
            assert table.returncode == 0, table.stderr
            row = next(line for line in table.stdout.splitlines() if "web-1" in line)
            for cell in ("n1", "http", "serve, tls", "port=8080", "zone=z1"):
                assert cell in row, (cell, row)
            as_json = json.loads((await run_meshctl(n4.socket_path, "--json", "agents")).stdout)
            assert as_json == {"count": 1, "agents": [reply]}
            by_cap = await run_meshctl(n4.socket_path, "--json", "agents", "--capability", "nope")
            assert json.loads(by_cap.stdout)["count"] == 0

            line = await events.until("web-1", timeout=10)
            assert line is not None, events.lines
            assert line.split() == ["registered", "web-1", "on", "n1"]
        # The connection closed: the agent went with it.
        line = await events.until("web-1", timeout=10)
        assert line is not None, events.lines
        assert line.split() == ["unregistered", "web-1", "on", "n1"]


async def test_closing_the_session_unregisters_cluster_wide(cluster: LocalCluster) -> None:
    daemons = await started(cluster, 3)
    n2 = daemons[1]
    async with Connection.open(n2.socket_path, client="test") as conn:
        for name in ("worker-a", "worker-b"):
            await conn.call("register", {"name": name, "kind": "worker"})
        await resolved_everywhere(daemons, "worker-a")
        await resolved_everywhere(daemons, "worker-b")
        async with Connection.open(n2.socket_path, client="other") as other:
            await other.call("register", {"name": "survivor", "kind": "worker"})
            await resolved_everywhere(daemons, "survivor")
            # An explicit unregister removes one name; the other stays with the session.
            assert await conn.call("unregister", {"name": "worker-b"}) == {"removed": True}
            await gone_everywhere(daemons, "worker-b")
            assert await lookup(daemons[0], "worker-a") is not None
    for name in ("worker-a", "survivor"):
        await gone_everywhere(daemons, name)
    for daemon in daemons:
        assert (await daemon.call("agents", {"kind": "worker"}))["count"] == 0


async def test_conflict_while_held_then_free_after_the_holder_crashes(
    cluster: LocalCluster,
) -> None:
    n1, n2, n3 = await started(cluster, 3)
    async with contextlib.AsyncExitStack() as stack:
        holder = await stack.enter_async_context(Connection.open(n1.socket_path, client="a"))
        first = await holder.call("register", {"name": "leader", "kind": "lock"})
        await resolved_everywhere([n1, n2, n3], "leader")

        contender = await stack.enter_async_context(Connection.open(n2.socket_path, client="b"))
        with pytest.raises(MeshError) as caught:
            await contender.call("register", {"name": "leader", "kind": "lock"})
        assert caught.value.kind is ErrorKind.CONFLICT
        assert caught.value.kind.value == "conflict"
        assert caught.value.detail["holder"]["node"] == "n1"
        assert "n1" in caught.value.message
        # The refused registration left nothing behind: the name still resolves to n1.
        for daemon in (n1, n2, n3):
            assert (await lookup(daemon, "leader")) == first

        watch2 = await stack.enter_async_context(contender.stream("registry.watch"))
        watcher3 = await stack.enter_async_context(Connection.open(n3.socket_path, client="c"))
        watch3 = await stack.enter_async_context(watcher3.stream("registry.watch"))
        n1.kill()
        for where, events in (("n2", watch2), ("n3", watch3)):
            event = await next_event(
                events,
                lambda e: e["kind"] == "unregistered" and e["name"] == "leader",
                f"'leader' unregistered on {where}",
                timeout=15,
            )
            assert event["entry"]["entry_id"] == first["entry_id"]
        await gone_everywhere([n2, n3], "leader")

        taken = await contender.call("register", {"name": "leader", "kind": "lock"})
        assert taken["node"] == "n2"
        entries = await resolved_everywhere([n2, n3], "leader")
        assert {e["entry_id"] for e in entries.values()} == {taken["entry_id"]}


async def test_fresh_daemon_gets_every_entry_and_document(cluster: LocalCluster) -> None:
    daemons = await started(cluster, 3)
    names = [f"agent-{i}" for i in range(9)]
    async with contextlib.AsyncExitStack() as stack:
        conns = [
            await stack.enter_async_context(Connection.open(d.socket_path, client="t"))
            for d in daemons
        ]
        registered = {}
        for i, name in enumerate(names):
            reply = await conns[i % 3].call(
                "register", {"name": name, "kind": "job", "capabilities": [f"c{i % 2}"]}
            )
            registered[name] = reply
        await daemons[0].call("state.update", {"doc": "config", "ops": SET_DOC})
        await daemons[1].call(
            "state.update", {"doc": "notes", "ops": [{"op": "set", "path": ["k"], "value": "v"}]}
        )
        for name in names:
            await resolved_everywhere(daemons, name)
        await state_everywhere(daemons, "config", DOC_VALUE)
        await state_everywhere(daemons, "notes", {"k": "v"})

        fresh = cluster.add("n4", seeds=[daemons[0].addr])
        await cluster.wait_ready([fresh])

        async def all_there() -> dict[str, Any] | None:
            found: dict[str, Any] = await fresh.call("agents", {"kind": "job"})
            return found if found["count"] == len(names) else None

        found = await eventually(all_there, "n4 to resolve every agent")
        assert {a["name"]: a for a in found["agents"]} == registered
        assert (await fresh.call("agents", {"capability": "c1", "limit": 0}))["count"] == 4
        await state_everywhere([fresh], "config", DOC_VALUE)
        await state_everywhere([fresh], "notes", {"k": "v"})
        listed = {d["name"] for d in await fresh.call("state.list")}
        assert {"config", "notes"} <= listed


async def test_restarted_daemon_does_not_bring_back_its_old_registrations(
    cluster: LocalCluster,
) -> None:
    n1, n2, n3 = await started(cluster, 3)
    async with Connection.open(n2.socket_path, client="old") as conn:
        old = await conn.call("register", {"name": "old-agent", "kind": "ephemeral"})
        await resolved_everywhere([n1, n2, n3], "old-agent")
        n2.kill()
        assert n2.wait(5) is not None
    # Back on the same name and port right away, before the others may have noticed.
    n2.spawn()
    await cluster.wait_ready([n2])
    await cluster.wait_converged({"n1", "n2", "n3"})
    await gone_everywhere([n1, n2, n3], "old-agent")
    # The new process registers normally; once that has spread, the old entry is still gone.
    async with Connection.open(n2.socket_path, client="new") as conn:
        new = await conn.call("register", {"name": "new-agent", "kind": "ephemeral"})
        assert new["entry_id"].split("/")[1] != old["entry_id"].split("/")[1]  # a new epoch
        await resolved_everywhere([n1, n2, n3], "new-agent")
        for daemon in (n1, n2, n3):
            assert await lookup(daemon, "old-agent") is None
            kinds = await daemon.call("agents", {"kind": "ephemeral"})
            assert [a["name"] for a in kinds["agents"]] == ["new-agent"]
        # The name itself is free again.
        again = await conn.call("register", {"name": "old-agent"})
        assert again["node"] == "n2" and again["entry_id"] != old["entry_id"]


# ---------------------------------------------------------------------------- state


async def test_state_update_read_watch_and_meshctl(cluster: LocalCluster) -> None:
    n1, n2, n3 = await started(cluster, 3)
    async with (
        Connection.open(n3.socket_path, client="watcher") as watcher,
        watcher.stream("state.watch", {"doc": "settings"}) as changes,
    ):
        first = await next_event(changes, lambda _e: True, "the current value")
        assert first == {"kind": "current", "value": None}

        result = await n1.call("state.update", {"doc": "settings", "ops": SET_DOC})
        assert result["acked"] == ["n1"]

        await state_everywhere([n2], "settings", DOC_VALUE)
        assert await n2.call("state.get", {"doc": "settings", "path": ["limits", "cpu"]}) == 2
        seen = await next_event(
            changes, lambda e: e["value"] == DOC_VALUE, "the change on n3's watch"
        )
        assert seen["kind"] in ("opened", "updated")

        await n2.call(
            "state.update",
            {"doc": "settings", "ops": [{"op": "set", "path": ["color"], "value": "red"}]},
        )
        changed = {**DOC_VALUE, "color": "red"}
        await next_event(changes, lambda e: e["value"] == changed, "the second change")

    out = await run_meshctl(n2.socket_path, "state", "get", "settings")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == changed
    compact = await run_meshctl(n3.socket_path, "--json", "state", "get", "settings")
    assert json.loads(compact.stdout) == changed
    listed = json.loads((await run_meshctl(n3.socket_path, "--json", "state", "list")).stdout)
    assert [d["name"] for d in listed] == ["settings"]
    missing = await run_meshctl(n2.socket_path, "state", "get", "nope")
    assert missing.returncode == 1 and "not_found" in missing.stderr


async def test_majority_write_survives_killing_a_minority(cluster: LocalCluster) -> None:
    daemons = await started(cluster, 5)
    n1 = daemons[0]
    result = await n1.call(
        "state.update", {"doc": "ledger", "ops": SET_DOC, "durability": "majority"}
    )
    # Kill the writer and one of the peers that acknowledged, right away.
    holder = next(name for name in result["acked"] if name != "n1")
    n1.kill()
    cluster[holder].kill()
    assert result["needed"] == 3 and result["total"] == 5
    assert len(result["acked"]) >= 3 and result["acked"][0] == "n1"
    survivors = [d for d in daemons if d.name not in ("n1", holder)]
    await state_everywhere(survivors, "ledger", DOC_VALUE, timeout=15)


async def test_majority_write_fails_when_most_members_do_not_answer(
    cluster: LocalCluster,
) -> None:
    daemons = await started(cluster, 5)
    n1 = daemons[0]
    hung = daemons[2:]
    for daemon in hung:
        daemon.signal(signal.SIGSTOP)  # members still, but they never answer
    try:
        with pytest.raises(MeshError) as caught:
            await n1.call(
                "state.update",
                {"doc": "ledger", "ops": SET_DOC, "durability": "majority"},
                timeout=15,
            )
    finally:
        for daemon in hung:
            daemon.signal(signal.SIGCONT)
    error = caught.value
    assert error.kind is ErrorKind.TIMEOUT and error.kind.value == "timeout"
    held = error.detail["acked"]
    assert held[0] == "n1" and set(held) <= {"n1", "n2"}
    assert error.detail["needed"] == 3 and error.detail["total"] == 5
    assert f"{len(held)} of 5" in error.message and "3 needed" in error.message
    # It is applied where it was written, and spreads.
    await state_everywhere(daemons, "ledger", DOC_VALUE, timeout=15)


async def test_a_once_keyed_majority_write_that_fails_is_withdrawn_everywhere_it_went(
    cluster: LocalCluster,
) -> None:
    """What makes at-least-once handlers exactly-once across a failover: the handler's
    ``once`` write that reached no majority is taken back on every daemon that got it, so a
    retry takes effect once."""
    daemons = await started(cluster, 5)
    n1 = daemons[0]

    def handled(msg_id: str) -> list[dict[str, Any]]:
        return [
            {"op": "append", "path": ["handled"], "values": [msg_id]},
            {"op": "incr", "path": ["count"], "by": 1},
        ]

    async def once_write(msg_id: str, **extra: Any) -> dict[str, Any]:
        args = {"doc": "c1", "ops": handled(msg_id), "durability": "majority", "once": msg_id}
        result: dict[str, Any] = await n1.call("state.update", args, **extra)
        return result

    seed = [
        {"op": "set", "path": ["handled"], "value": []},
        {"op": "set", "path": ["count"], "value": {"$counter": 0}},
    ]
    await n1.call("state.update", {"doc": "c1", "ops": seed, "durability": "majority"})
    hung = daemons[2:]
    for daemon in hung:
        daemon.signal(signal.SIGSTOP)
    try:
        with pytest.raises(MeshError) as caught:
            await once_write("r1", timeout=15)
        # n1 and n2 held it; both give it back.
        await state_everywhere(daemons[:2], "c1", {"handled": [], "count": 0}, timeout=15)
    finally:
        for daemon in hung:
            daemon.signal(signal.SIGCONT)
    error = caught.value
    assert error.kind is ErrorKind.TIMEOUT
    assert error.detail["withdrawn"] is True and "withdrawn" in error.message
    # The next write is acknowledged by a majority that holds everything before it.
    assert (await once_write("r2", timeout=15))["needed"] == 3
    await state_everywhere(daemons, "c1", {"handled": ["r2"], "count": 1}, timeout=15)
    # The withdrawn key is not "applied": its retry takes effect, once.
    assert "duplicate" not in await once_write("r1", timeout=15)
    assert (await once_write("r1", timeout=15))["duplicate"] is True
    await state_everywhere(daemons, "c1", {"handled": ["r2", "r1"], "count": 2}, timeout=15)


async def test_majority_counts_dead_members_until_they_are_reaped(cluster: LocalCluster) -> None:
    """``majority`` means a majority of the cluster, not of the members that look alive:
    once three of five are declared dead, the two survivors are still a minority, so a write
    they both hold is not acknowledged (as Akka's WriteMajority: a crashed member and a
    partitioned one look the same from here)."""
    daemons = await started(cluster, 5)
    n1 = daemons[0]
    for daemon in daemons[2:]:
        daemon.kill()
    for daemon in daemons[2:]:
        await cluster.wait_status(["n1", "n2"], daemon.name, "dead", timeout=15)
    with pytest.raises(MeshError) as caught:
        await n1.call(
            "state.update",
            {"doc": "ledger", "ops": SET_DOC, "durability": "majority"},
            timeout=15,
        )
    error = caught.value
    assert error.kind is ErrorKind.TIMEOUT
    assert sorted(error.detail["acked"]) == ["n1", "n2"]
    assert error.detail["needed"] == 3 and error.detail["total"] == 5
    # An operator removes the dead (meshctl remove): the cluster is n1 and n2 now.
    for daemon in daemons[2:]:
        await n1.call("members.remove", {"node": daemon.name})
        await cluster.wait_status(["n1", "n2"], daemon.name, "left", timeout=15)
    result = await n1.call(
        "state.update",
        {"doc": "ledger", "ops": SET_DOC, "durability": "majority"},
        timeout=15,
    )
    assert sorted(result["acked"]) == ["n1", "n2"]
    assert result["needed"] == 2 and result["total"] == 2
