"""API ops built from their collaborators alone (no ``Node``): the registry, state,
reminder and storage ops over a real replication core and driver, registry, state service,
reminders and store (on disk, in the test's directory), behind a real API server on a Unix
socket, called through the client's ``Connection``."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from fakes import StaticLiveness
from replication_helpers import tuning

from meshd.api.server import ApiServer
from meshd.config.model import StorageTuning
from meshd.node.data_ops import RegistryOps, StateOps
from meshd.node.lifecycle_ops import ReminderOps
from meshd.node.storage_ops import StorageOps
from meshd.placement.reminders import Reminders
from meshd.registry.registry import Registry
from meshd.replication.core import Replicator
from meshd.replication.driver import ReplicationDriver
from meshd.state.service import StateService
from meshd.storage.driver import StorageDriver
from meshd.storage.files import OsFiles
from meshd.storage.store import Store
from meshd_client.connection import Connection
from meshd_client.protocol.errors import ErrorKind, MeshError

LOG = logging.getLogger("test.data_ops")
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def next_event(events: AsyncIterator[Any]) -> Any:
    with trio.fail_after(10):
        return await events.__anext__()


@dataclass
class Served:
    api: ApiServer
    driver: ReplicationDriver
    registry: Registry
    storage: StorageDriver
    rejected: dict[str, int]

    @property
    def path(self) -> str:
        return self.api.path


def encoded(core: Replicator, name: str) -> tuple[int, bytes] | None:
    replica = core.store.get(name)
    return None if replica is None else (replica.epoch, replica.full_update())


@pytest.fixture
async def served(tmp_path: Path, nursery: trio.Nursery) -> Served:
    core = Replicator(node="n1", tuning=tuning(), rng=random.Random(1), now=trio.current_time())
    store = Store(OsFiles(), str(tmp_path / "store"))
    store.recover()
    storage = StorageDriver(
        store,
        StorageTuning(),
        LOG,
        names=lambda: [r.name for r in core.store],
        encode=lambda name: encoded(core, name),
        count=lambda: len(core.store),
    )
    driver = ReplicationDriver(core, LOG, storage)
    registry = Registry(
        node="n1",
        epoch=1,
        docs=driver,
        liveness=StaticLiveness(["n1"]),
        wall_ms=lambda: 1_000_000,
    )
    core.on_open = registry.on_open
    core.on_drop = registry.on_drop
    driver.set_members([], ["n1"])  # a cluster of one: a majority is this node
    rejected: dict[str, int] = {}
    api = ApiServer(str(tmp_path / "api.sock"), "n1", LOG)
    RegistryOps(registry, driver.wait).register(api)
    StateOps(StateService(driver), driver.store, None, rejected).register(api)
    ReminderOps(Reminders(driver, lambda: [])).register(api)
    StorageOps(storage, driver.store, lambda: driver.acks_held, 0.005).register(api)
    await nursery.start(storage.run)
    await nursery.start(driver.run)
    registry.open_own()
    await nursery.start(api.serve)
    return Served(api, driver, registry, storage, rejected)


async def test_a_name_registers_resolves_lists_and_goes_with_its_session(served: Served) -> None:
    async with Connection.open(served.path) as watcher:
        async with watcher.stream("registry.watch") as events:
            async with Connection.open(served.path) as conn:
                entry = await conn.call(
                    "register", {"name": "svc/a", "kind": "svc", "capabilities": ["x"]}
                )
                assert entry["name"] == "svc/a" and entry["node"] == "n1"
                event = await next_event(events)
                assert (event["kind"], event["name"]) == ("registered", "svc/a")
                assert (await conn.call("lookup", {"name": "svc/a"}))["entry_id"] == entry[
                    "entry_id"
                ]
                listed = await conn.call("agents", {"capability": "x"})
                assert listed["count"] == 1 and listed["agents"][0]["name"] == "svc/a"
                assert await conn.call("agents", {"limit": 0, "kind": "svc"}) == {
                    "count": 1,
                    "agents": [],
                }
                await conn.call("register", {"name": "svc/b"})
            # The session that registered them closed: both are gone, cluster-wide.
            seen = [await next_event(events) for _ in range(3)]
            assert {(e["kind"], e["name"]) for e in seen} == {
                ("registered", "svc/b"),
                ("unregistered", "svc/a"),
                ("unregistered", "svc/b"),
            }
        with pytest.raises(MeshError) as caught:
            await watcher.call("lookup", {"name": "svc/b"})
        assert caught.value.kind is ErrorKind.NOT_FOUND
    assert served.registry.lookup("svc/a") is None


async def test_unregister_and_majority_durability(served: Served) -> None:
    async with Connection.open(served.path) as conn:
        out = await conn.call("register", {"name": "svc/m", "durability": "majority"})
        assert out["durability"] == {"acked": ["n1"], "needed": 1, "total": 1}
        removed = await conn.call("unregister", {"name": "svc/m", "durability": "majority"})
        assert removed["removed"] is True and removed["durability"]["needed"] == 1
        for op, args in (
            ("unregister", {"name": "svc/m"}),
            ("register", {"name": "svc/x", "durability": "all"}),
        ):
            with pytest.raises(MeshError) as caught:
                await conn.call(op, args)
            expected = ErrorKind.NOT_FOUND if op == "unregister" else ErrorKind.INVALID
            assert caught.value.kind is expected
        assert caught.value.detail == {"field": "durability"}


async def test_state_documents_are_read_changed_listed_and_watched(served: Served) -> None:
    async with Connection.open(served.path) as conn:
        async with conn.stream("state.watch", {"doc": "cfg"}) as events:
            assert await next_event(events) == {"kind": "current", "value": None}
            ops = [{"op": "set", "path": ["a"], "value": 1}, {"op": "incr", "path": ["n"]}]
            assert await conn.call("state.update", {"doc": "cfg", "ops": ops}) == {
                "acked": ["n1"],
                "needed": 1,
                "total": 1,
            }
            seen = await next_event(events)
            assert seen["value"] == {"a": 1, "n": 1}
        assert await conn.call("state.get", {"doc": "cfg", "path": ["n"]}) == 1
        once = {"doc": "cfg", "ops": ops[1:], "durability": "majority", "once": "m1"}
        assert "duplicate" not in await conn.call("state.update", once)
        assert (await conn.call("state.update", once))["duplicate"] is True
        assert await conn.call("state.get", {"doc": "cfg"}) == {"a": 1, "n": 2}
        assert [d["name"] for d in await conn.call("state.list")] == ["cfg"]
        digest = await conn.call("docs.digest", {"prefix": "state/"})
        assert digest["count"] == 1 and set(digest["docs"]) == {"state/cfg"}
        everything = await conn.call("docs.digest")
        assert everything["count"] == len(served.driver.store) == 2  # and n1's registry doc
        # A malformed trace context is counted and ignored, never an error.
        traced = {"doc": "cfg", "ops": ops[:1], "traceparent": TRACEPARENT[:-3]}
        await conn.call("state.update", traced)
        assert served.rejected == {"malformed_traceparent": 1}
        with pytest.raises(MeshError) as caught:
            await conn.call("state.get", {"doc": "missing"})
        assert caught.value.kind is ErrorKind.NOT_FOUND


async def test_reminders_are_set_listed_and_forgotten(served: Served) -> None:
    async with Connection.open(served.path) as conn:
        out = await conn.call(
            "agent.remind",
            {"agent": "a1", "name": "tick", "at_ms": 5_000, "every_ms": 1_000, "data": [1]},
        )
        assert out == {"agent": "a1", "name": "tick", "due_ms": 5_000, "every_ms": 1_000}
        listed = await conn.call("agent.reminders", {"agent": "a1"})
        assert set(listed) == {"tick"} and listed["tick"]["data"] == [1]
        assert await conn.call("agent.forget", {"agent": "a1", "name": "tick"}) == {"removed": True}
        assert await conn.call("agent.reminders", {"agent": "a1"}) == {}
        for op, args in (
            ("agent.forget", {"agent": "a1", "name": "tick"}),
            ("agent.remind", {"agent": "a1", "name": "x", "every_ms": -1}),
        ):
            with pytest.raises(MeshError) as caught:
                await conn.call(op, args)
            expected = ErrorKind.NOT_FOUND if op == "agent.forget" else ErrorKind.INVALID
            assert caught.value.kind is expected


async def test_storage_status_and_a_snapshot_on_demand(served: Served, tmp_path: Path) -> None:
    async with Connection.open(served.path) as conn:
        ops = [{"op": "set", "path": ["k"], "value": "v"}]
        await conn.call("state.update", {"doc": "d", "ops": ops, "durability": "majority"})
        status = await conn.call("storage")
        assert status["enabled"] is True and status["healthy"] is True
        assert status["directory"] == str(tmp_path / "store")
        assert status["documents"] == 2 and status["durable"] == status["appended"] > 0
        assert status["sync_interval"] == 0.005 and status["acks_held"] == 0
        after = await conn.call("storage.snapshot")
        assert after["snapshots"] == status["snapshots"] + 1 and after["snapshot_bytes"] > 0


async def test_storage_ops_without_storage(tmp_path: Path, nursery: trio.Nursery) -> None:
    api = ApiServer(str(tmp_path / "bare.sock"), "n1", LOG)
    core = Replicator(node="n1", tuning=tuning(), rng=random.Random(1), now=0.0)
    StorageOps(None, core.store, lambda: 0, 0.005).register(api)
    await nursery.start(api.serve)
    async with Connection.open(api.path) as conn:
        assert await conn.call("storage") == {"enabled": False, "documents": 0}
        with pytest.raises(MeshError) as caught:
            await conn.call("storage.snapshot")
        assert caught.value.kind is ErrorKind.INVALID
        assert "storage.enabled = false" in caught.value.message
