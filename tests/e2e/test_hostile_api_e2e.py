"""Hostile arguments against every API op of a real daemon: each call is accepted or refused
with a typed error a client can act on — never ``internal``, never a traceback in the log."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from meshd.testing.localcluster import LocalCluster
from meshd_client.connection import Connection
from meshd_client.protocol.errors import ErrorKind, Invalid, MeshError

# Every argument name an op reads, and values of every wrong shape (no bignums: the client's
# own encoder would refuse them before they reach the daemon).
KEYS = (
    "name", "kind", "capabilities", "metadata", "durability", "doc", "ops", "path", "once",
    "prefix", "limit", "node", "status", "op", "key", "to", "body", "from", "id",
    "at_least_once", "timeout", "topic", "event", "pattern", "agent", "ok", "error",
    "capacity", "strategy", "every_ms", "at_ms", "after_ms", "data",
)  # fmt: skip
VALUES: tuple[Any, ...] = (
    -1, 2**63 - 1, 1.5, float("inf"), "", "x" * 5000, "a.*", None, True,
    ["a", 1], {"a": [1]}, b"\x00\xff",
)  # fmt: skip
# A valid call of each op that takes arguments: each hostile value replaces one argument of
# it, so the check of every argument is reached (not only of the first one looked at).
EVENT = {"id": "1", "source": "s", "type": "t"}
SET_K = [{"op": "set", "path": ["k"], "value": 1}]
BASE: dict[str, dict[str, Any]] = {
    "register": {"name": "fz", "kind": "k", "capabilities": ["c"], "metadata": {"m": 1}},
    "unregister": {"name": "fz"},
    "lookup": {"name": "fz"},
    "agents": {"kind": "k", "limit": 5},
    "agent.serve": {"name": "fz-a", "kind": "k", "capabilities": ["c"]},
    "agent.reply": {"agent": "fz", "id": "1", "ok": True, "body": 1},
    "send": {"to": "fz", "body": 1, "timeout": 0.5, "id": "m1", "from": "me"},
    "request": {"to": "fz", "body": 1, "timeout": 0.5, "at_least_once": True},
    "publish": {"topic": "a.b", "event": EVENT},
    "subscribe": {"pattern": "a.*"},
    "health": {"name": "fz"},
    "state.get": {"doc": "d", "path": ["k"]},
    "state.update": {"doc": "d", "ops": SET_K, "durability": "local", "once": "o"},
    "state.watch": {"doc": "d"},
    "docs.digest": {"prefix": "state/"},
    "kind.serve": {"kind": "fzk", "capacity": 5, "strategy": "allow_duplicates"},
    "spawn": {"kind": "fzk", "name": "fzk/1", "timeout": 1},
    "placement": {"kind": "fzk", "name": "x"},
    "agent.remind": {"agent": "fz", "name": "r", "after_ms": 100_000, "every_ms": 0},
    "agent.forget": {"agent": "fz", "name": "r"},
    "agent.reminders": {"agent": "fz"},
    "members": {"status": "alive"},
    "members.remove": {"node": "nosuch"},
    "keys": {"op": "list"},
}
# Ops that would stop or empty this daemon, which the test needs alive.
SKIP = {"leave", "drain"}
ACTIONABLE = {kind for kind in ErrorKind if kind is not ErrorKind.INTERNAL}


async def attempt(conn: Connection, op: str, stream: bool, args: dict[str, Any]) -> None:
    """One call; a stream is closed after its first event (or a moment: it was accepted)."""
    try:
        with anyio.move_on_after(0.02 if stream else 2.0):
            if stream:
                async with conn.stream(op, args) as events:
                    async for _ in events:
                        break
            else:
                await conn.call(op, args, timeout=2)
    except MeshError as exc:
        assert exc.kind in ACTIONABLE, (op, args, exc.kind, exc.message)


@pytest.mark.timeout(180)
async def test_every_op_refuses_bad_arguments_with_a_typed_error(cluster: LocalCluster) -> None:
    (daemon,) = cluster.start_many(1)
    await cluster.wait_ready()
    async with Connection.open(daemon.socket_path, client="hostile") as conn:
        ops = await conn.call("ops")
        assert {"state.update", "register", "agent.serve", "storage"} <= {o["name"] for o in ops}
        for entry in ops:
            name, stream = entry["name"], entry["stream"]
            if name in SKIP:
                continue
            base = BASE.get(name, {})
            await attempt(conn, name, stream, {})
            await attempt(conn, name, stream, base)
            for key in dict.fromkeys([*base, *KEYS]):
                for value in VALUES:
                    await attempt(conn, name, stream, {**base, key: value})
        api = await conn.call("info")
    assert api["node"] == "n1"
    assert "Traceback" not in daemon.log_text()
    assert "API op failed" not in daemon.log_text()


async def test_the_reported_cases_name_the_field(cluster: LocalCluster) -> None:
    (daemon,) = cluster.start_many(1)
    await cluster.wait_ready()
    cases = [
        ("register", {"name": "x", "capabilities": 1}, "capabilities"),
        ("register", {"name": "x", "capabilities": "abc"}, "capabilities"),
        ("drain", {"node": [1]}, "node"),
        ("drain", {"node": 5}, "node"),
        ("send", {"to": "a", "at_least_once": "yes"}, "at_least_once"),
        ("agents", {"limit": -1}, "limit"),
    ]
    async with Connection.open(daemon.socket_path, client="hostile") as conn:
        for op, args, field in cases:
            with pytest.raises(Invalid) as caught:
                await conn.call(op, args)
            assert caught.value.detail.get("field") == field, (op, args, caught.value.message)
            assert field in caught.value.message
        # A drain of a host that is not a member: not found (not "unreachable").
        with pytest.raises(MeshError) as missing:
            await conn.call("drain", {"node": "nosuch"})
        assert missing.value.kind is ErrorKind.NOT_FOUND
        # agent.serve without capabilities (null) is fine: none.
        async with conn.stream("agent.serve", {"name": "y", "capabilities": None}) as events:
            first = await events.__anext__()
        assert first["entry"]["capabilities"] == []
    assert "Traceback" not in daemon.log_text()
