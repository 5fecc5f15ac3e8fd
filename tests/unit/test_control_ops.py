"""The daemon's own ops built from their collaborators alone (no ``Node``): the membership
table and its watch stream over a real membership core and driver (on a loopback UDP socket),
gossip keys over a real key service, and ``info``/``ops``/``leave``, behind a real API server
on a Unix socket, called through the client's ``Connection``."""

from __future__ import annotations

import base64
import logging
import random
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from membership_helpers import alive, build

from meshd.api.server import ApiServer
from meshd.config.model import Config, MembershipTuning, NodeConfig
from meshd.membership.core import Membership
from meshd.membership.driver import MembershipDriver
from meshd.node.control import DaemonOps, DaemonView, KeyOps, MemberOps
from meshd.node.keys import KeyService
from meshd.routing.stats import RouterStats
from meshd.security.envelope import Envelope
from meshd.security.keyring import Keyring
from meshd.transport.stats import TransportStats
from meshd.transport.udp import PacketEndpoint
from meshd.wire.membership import Dead
from meshd_client.connection import Connection
from meshd_client.protocol.errors import ErrorKind, MeshError

LOG = logging.getLogger("test.control_ops")
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


@dataclass
class Served:
    path: str
    core: Membership
    driver: MembershipDriver
    keyring: Keyring
    started: float
    leaves: list[bool] = field(default_factory=list)


def wall(monotonic: float) -> float:
    return 1_000_000.0 + monotonic


@pytest.fixture
async def served(tmp_path: Path, nursery: trio.Nursery) -> Served:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    addr = sock.getsockname()
    keyring = Keyring([KEY])
    envelope = Envelope(keyring)
    stats = TransportStats()
    core = Membership(
        name="n1",
        addr=addr,
        tuning=MembershipTuning(),
        rng=random.Random(1),
        now=trio.current_time(),
    )
    driver = MembershipDriver(
        core, PacketEndpoint(sock, envelope, stats, 1400, LOG), envelope, stats, LOG
    )
    keys = KeyService(keyring, None, envelope, stats, core.members, "n1", LOG)
    api = ApiServer(str(tmp_path / "api.sock"), "n1", LOG)
    config = Config(node=NodeConfig(name="n1", data_dir=str(tmp_path)))
    served = Served(api.path, core, driver, keyring, trio.current_time())
    view = DaemonView(
        config=config,
        membership=core,
        keyring=keyring,
        transport=stats,
        routing=RouterStats(),
        documents=lambda: 7,
        storage=None,
        tracing=False,
        tracing_rejected={"malformed_traceparent": 2},
        started=served.started,
        wall_time=wall,
    )
    DaemonOps(view, api, lambda: served.leaves.append(True)).register()
    MemberOps(driver, wall).register(api)
    KeyOps(keys).register(api)
    await nursery.start(driver.run)
    await nursery.start(api.serve)
    return served


async def next_event(events: AsyncIterator[Any]) -> Any:
    with trio.fail_after(10):
        return await events.__anext__()


async def hear(served: Served, *msgs: Any) -> None:
    """Gossip about other members, as if it came in a packet."""
    served.core.handle_packet(trio.current_time(), ("127.0.0.1", 9), build(*msgs))
    await served.driver.flush()


async def test_members_are_listed_filtered_watched_and_a_dead_one_removed(served: Served) -> None:
    async with Connection.open(served.path) as conn:
        [me] = await conn.call("members", {})
        assert (me["name"], me["status"]) == ("n1", "alive")
        assert me["since"] >= 1_000_000.0  # shown as wall time
        async with conn.stream("members.watch", {}) as events:
            await hear(served, alive("n2"))
            event = await next_event(events)
            assert (event["kind"], event["member"]["name"]) == ("join", "n2")
            await hear(served, Dead("n2", 0, "n3", True))  # a refused probe: at once
            kinds = [(await next_event(events))["kind"]]
            while kinds[-1] != "dead":
                kinds.append((await next_event(events))["kind"])
        assert [m["name"] for m in await conn.call("members", {"status": "dead"})] == ["n2"]
        for args, kind in (
            ({"status": "sleeping"}, ErrorKind.INVALID),
            ({"status": 3}, ErrorKind.INVALID),
        ):
            with pytest.raises(MeshError) as caught:
                await conn.call("members", args)
            assert caught.value.kind is kind
        for name, kind in (
            ("nobody", ErrorKind.NOT_FOUND),
            ("n1", ErrorKind.INVALID),
            ("", ErrorKind.INVALID),
        ):
            with pytest.raises(MeshError) as caught:
                await conn.call("members.remove", {"node": name})
            assert caught.value.kind is kind
        removed = await conn.call("members.remove", {"node": "n2"})
        assert removed == {"node": "n2", "status": "left", "removed": True}
        assert (await conn.call("members.remove", {"node": "n2"}))["removed"] is False
        assert [m["name"] for m in await conn.call("members", {"status": "left"})] == ["n2"]


async def test_keys_are_listed_installed_and_bad_requests_refused(served: Served) -> None:
    async with Connection.open(served.path) as conn:
        listed = await conn.call("keys", {})
        assert (listed["members"], listed["acknowledged"]) == (1, 1)
        assert len(listed["keys"]) == 1
        installed = await conn.call(
            "keys", {"op": "install", "key": base64.b64encode(OTHER_KEY).decode()}
        )
        assert installed["acknowledged"] == 1 and len(installed["keys"]) == 2
        assert OTHER_KEY in served.keyring.keys
        for args in (
            {"op": "rotate"},
            {"op": "install"},
            {"op": "install", "key": "not base64!"},
            {"op": "install", "key": base64.b64encode(b"short").decode()},
        ):
            with pytest.raises(MeshError) as caught:
                await conn.call("keys", args)
            assert caught.value.kind is ErrorKind.INVALID
        assert len(served.keyring.keys) == 2  # nothing changed


async def test_info_ops_and_leave(served: Served) -> None:
    async with Connection.open(served.path) as conn:
        info = await conn.call("info", {})
        assert info["node"] == "n1" and info["encrypted"] is True and info["keys"] == 1
        assert info["members"]["alive"] == 1
        assert info["store"] == {"enabled": False, "documents": 7}
        assert info["tracing"] == {"enabled": False, "malformed_traceparent": 2}
        assert info["started"] == pytest.approx(wall(served.started), abs=1e-3)
        assert 0 <= info["uptime_s"] <= trio.current_time() - served.started + 0.001
        names = {op["name"] for op in await conn.call("ops", {})}
        assert {"info", "members", "members.watch", "members.remove", "keys", "leave"} <= names
        assert served.leaves == []
        assert await conn.call("leave", {}) == {"leaving": True}
        assert served.leaves == [True]
