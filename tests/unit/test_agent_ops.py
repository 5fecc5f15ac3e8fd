"""The agent and placement ops built from their collaborators alone (no ``Node``): a real
membership core (a cluster of one), replication core and driver, registry, routing driver and
placement behind a real API server on a Unix socket, driven by the client library's ``Mesh``
as an application would."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from replication_helpers import tuning

from meshd.api.server import ApiServer
from meshd.config.model import MembershipTuning, PlacementTuning
from meshd.membership.core import Membership
from meshd.node.agent_ops import AgentOps
from meshd.node.lifecycle_ops import PlacementOps
from meshd.node.liveness import MembershipLiveness
from meshd.placement.service import Placement
from meshd.registry.registry import Registry
from meshd.replication.core import Replicator
from meshd.replication.driver import ReplicationDriver
from meshd.routing.driver import RoutingDriver
from meshd_client import Mesh, Message
from meshd_client.agents import AgentContext
from meshd_client.protocol.errors import ErrorKind, MeshError

LOG = logging.getLogger("test.agent_ops")
MALFORMED_TRACEPARENT = "00-not-a-trace-01"


@dataclass
class Served:
    path: str
    placement: Placement
    rejected: dict[str, int]


class _Activations:
    def __init__(self) -> None:
        self.placement: Placement | None = None

    def _p(self) -> Placement:
        assert self.placement is not None
        return self.placement

    async def ensure_active(self, name: str, kind: str | None, deadline: float) -> Any:
        return await self._p().ensure_active(name, kind, deadline)

    def may_run(self, kind: str) -> bool:
        return self._p().may_run(kind)

    async def activate_local(self, name: str, kind: str, deadline: float) -> Any:
        return await self._p().activate_local(name, kind, deadline)


@pytest.fixture
async def served(tmp_path: Path, nursery: trio.Nursery) -> Served:
    now = trio.current_time()
    members = Membership(
        name="n1",
        addr=("127.0.0.1", 1),
        tuning=MembershipTuning(),
        rng=random.Random(1),
        now=now,
    )
    core = Replicator(node="n1", tuning=tuning(), rng=random.Random(1), now=now)
    docs = ReplicationDriver(core, LOG, None)
    registry = Registry(
        node="n1",
        epoch=1,
        docs=docs,
        liveness=MembershipLiveness(members),
        wall_ms=lambda: 1_000_000,
    )
    core.on_open = registry.on_open
    core.on_drop = registry.on_drop
    docs.set_members([], ["n1"])
    activations = _Activations()
    routing = RoutingDriver(
        node="n1", registry=registry, docs=docs, membership=members, log=LOG, activator=activations
    )
    docs.doc_listeners.append(routing.on_doc_event)
    placement = Placement(
        node="n1",
        membership=members,
        registry=registry,
        docs=docs,
        host=routing,
        tuning=PlacementTuning(),
        log=LOG,
    )
    activations.placement = placement
    docs.doc_listeners.append(placement.on_doc_event)
    rejected: dict[str, int] = {}
    api = ApiServer(str(tmp_path / "api.sock"), "n1", LOG)
    AgentOps(routing, registry, placement, None, rejected).register(api)
    PlacementOps("n1", placement, routing, members).register(api)
    await nursery.start(docs.run)
    await nursery.start(routing.run)
    await nursery.start(placement.run)
    registry.open_own()
    await nursery.start(api.serve)
    return Served(api.path, placement, rejected)


def echo() -> Callable[[AgentContext, Message], Awaitable[Any]]:
    async def handle(_ctx: AgentContext, msg: Message) -> Any:
        if msg.body == "fail":
            raise ValueError("asked to")
        return {"echo": msg.body}

    return handle


async def test_an_agent_is_served_asked_sent_to_and_found(served: Served) -> None:
    got: list[Any] = []

    async def note(_ctx: AgentContext, msg: Message) -> None:
        got.append(msg.body)

    with trio.fail_after(20):
        async with Mesh.connect(served.path) as mesh:
            await mesh.serve("echo", echo())
            await mesh.serve("sink", note)
            assert await mesh.request("echo", 1) == {"echo": 1}
            await mesh.send("sink", "hello", at_least_once=True)
            assert got == ["hello"]
            assert await mesh.health("echo") == "healthy"
            assert await mesh.health("nobody") == "not_found"
            with pytest.raises(MeshError) as failed:
                await mesh.request("echo", "fail")
            assert failed.value.kind is ErrorKind.INTERNAL
            with pytest.raises(MeshError) as missing:
                await mesh.request("nobody", 1, timeout=2.0)
            assert missing.value.kind is ErrorKind.NOT_FOUND
            # A malformed trace context is ignored (the call works) and counted.
            asked = {"to": "echo", "body": 2, "traceparent": MALFORMED_TRACEPARENT}
            assert await mesh.call("request", asked) == {"echo": 2}
            assert served.rejected == {"malformed_traceparent": 1}


async def test_a_reply_for_no_waiting_delivery_is_not_found(served: Served) -> None:
    async with Mesh.connect(served.path) as mesh:
        for args, kind in (
            ({"agent": "echo", "id": "m1", "ok": True}, ErrorKind.NOT_FOUND),
            ({"agent": "echo"}, ErrorKind.INVALID),
        ):
            with pytest.raises(MeshError) as caught:
                await mesh.call("agent.reply", args)
            assert caught.value.kind is kind


async def test_a_published_signal_reaches_a_subscriber(served: Served) -> None:
    with trio.fail_after(20):
        async with Mesh.connect(served.path) as mesh:
            async with mesh.subscribe("orders.*") as signals:
                # The subscription is written to this node's routing table in a batch.
                while await mesh.publish("orders.created", {"n": 1}) == 0:
                    await trio.sleep(0.05)
                signal = await signals.__anext__()
                assert signal.topic == "orders.created" and signal.data == {"n": 1}
            with pytest.raises(MeshError) as caught:
                await mesh.call("publish", {"topic": "t", "event": {"id": "1"}})
            assert caught.value.kind is ErrorKind.INVALID


async def test_a_kind_is_served_spawned_placed_and_drained(served: Served) -> None:
    with trio.fail_after(30):
        async with Mesh.connect(served.path) as mesh:
            # (keep_majority would need this host's lease, which membership pings renew.)
            await mesh.serve_kind(
                "worker", lambda _name: echo(), capacity=4, strategy="allow_duplicates"
            )
            # The runner is announced in this node's registry document, in a batch.
            while "worker" not in await mesh.call("kinds", {}):
                await trio.sleep(0.05)
            info = await mesh.spawn("worker", "worker/1")
            assert (info.name, info.node) == ("worker/1", "n1")
            assert await mesh.request("worker/1", 3) == {"echo": 3}
            where = await mesh.call("placement", {"kind": "worker", "name": "worker/1"})
            assert where["owner"] == "n1" and where["hosts"]["n1"]["capacity"] == 4
            assert where["strategy"] == "allow_duplicates"
            assert set(await mesh.call("kinds", {})) == {"worker"}
            with pytest.raises(MeshError) as caught:
                await mesh.drain("nobody")
            assert caught.value.kind is ErrorKind.NOT_FOUND
            drained = await mesh.drain()
            assert drained["node"] == "n1" and drained["draining"] is True
            with pytest.raises(MeshError) as bad:
                await mesh.call("kind.serve", {"kind": "worker", "strategy": "sometimes"})
            assert bad.value.kind is ErrorKind.INVALID
