"""Security on real daemons: key rotation on a live cluster, wrong keys, garbage input."""

from __future__ import annotations

import base64
import os
import socket

from meshd.testing.localcluster import LocalCluster
from meshd.testing.poll import eventually
from meshd_client.connection import Connection
from meshd_client.protocol.errors import Invalid
from meshd_client.protocol.framing import HEADER


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


async def test_key_rotation_on_a_live_cluster(cluster: LocalCluster) -> None:
    cluster.start_many(3)
    await cluster.wait_ready()
    await cluster.wait_converged()
    old, new = cluster.key, new_key()
    assert old is not None
    n1 = cluster["n1"]
    installed = await n1.call("keys", {"op": "install", "key": new})
    assert installed["acknowledged"] == 3 and len(installed["keys"]) == 2
    used = await cluster["n2"].call("keys", {"op": "use", "key": new})
    assert used["acknowledged"] == 3
    assert list(used["primaries"].values()) == [3]
    removed = await cluster["n3"].call("keys", {"op": "remove", "key": old})
    assert removed["acknowledged"] == 3 and len(removed["keys"]) == 1
    # Gossip keeps flowing under the new key: a member killed now is still detected.
    cluster["n3"].kill()
    await cluster.wait_status(["n1", "n2"], "n3", "dead", timeout=30)
    # A daemon holding only the removed key cannot join; one with the new key can.
    stale = cluster.add("stale", seeds=[n1.addr], extra=[f"--key={old}"])
    cluster.key = new
    fresh = cluster.add("fresh", seeds=[n1.addr])
    await cluster.wait_ready([fresh])
    await cluster.wait_converged({"n1", "n2", "fresh"})
    await cluster.wait_answering(stale)

    async def refused() -> bool | None:
        rejected = (await n1.call("info"))["stats"]["rejected"]
        return True if rejected.get("stream_unknown_key", 0) >= 1 else None

    await eventually(refused, "n1 to refuse the stale key's join", 15)
    info = await stale.call("info")
    assert info["joined"] is False
    statuses = await n1.statuses()
    assert "stale" not in statuses


async def test_removing_the_primary_key_is_refused(cluster: LocalCluster) -> None:
    cluster.start_many(2)
    await cluster.wait_ready()
    result = await cluster["n1"].call("keys", {"op": "remove", "key": cluster.key})
    assert result["acknowledged"] == 0
    assert all("primary" in r["error"] for r in result["results"].values())


async def test_a_daemon_with_another_key_or_label_cannot_join(cluster: LocalCluster) -> None:
    a = cluster.add("a")
    other = cluster.add("other-key", seeds=[a.addr], extra=[f"--key={new_key()}"])
    other_label = cluster.add("other-label", seeds=[a.addr], extra=["--label=elsewhere"])
    await cluster.wait_ready([a])
    await cluster.wait_answering(other)
    await cluster.wait_answering(other_label)

    async def both_refused() -> bool | None:
        rejected = (await a.call("info"))["stats"]["rejected"]
        return (
            True
            if rejected.get("stream_unknown_key", 0) >= 1
            and rejected.get("stream_auth_failed", 0) >= 1
            else None
        )

    await eventually(both_refused, "both joins refused", 15)
    assert set(await a.statuses()) == {"a"}
    assert (await other.call("info"))["joined"] is False
    assert (await other_label.call("info"))["joined"] is False


async def test_garbage_from_the_network_is_counted_and_survived(cluster: LocalCluster) -> None:
    a, b = cluster.start_many(2)
    await cluster.wait_ready()
    payloads = [
        b"",
        b"\x00",
        b"\x01" + os.urandom(40),
        os.urandom(1400),
        b"\x02hello",
        b"\x00\x00" + b"\x82\x01\x41x",
        os.urandom(9000),
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for data in payloads * 20:
            udp.sendto(data, ("127.0.0.1", a.port))
    for data in payloads:
        with socket.create_connection(("127.0.0.1", a.port), timeout=5) as tcp:
            tcp.sendall(HEADER.pack(len(data)) + data)
    with socket.create_connection(("127.0.0.1", a.port), timeout=5) as tcp:
        tcp.sendall(HEADER.pack(2**31))  # claims a 2 GiB frame

    async def counted() -> bool | None:
        rejected = (await a.call("info"))["stats"]["rejected"]
        return (
            True
            if sum(rejected.values()) >= len(payloads)
            and rejected.get("stream_frame_too_large", 0) >= 1
            else None
        )

    await eventually(counted, "every kind of garbage counted", 15)
    await cluster.wait_converged({"n1", "n2"})
    assert a.running() and b.running()


async def test_bad_api_frames_get_an_error_and_the_daemon_survives(
    cluster: LocalCluster,
) -> None:
    a = cluster.add("a")
    await cluster.wait_ready()
    # Garbage instead of a hello: the session ends with an error frame.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.connect(a.socket_path)
        raw.sendall(HEADER.pack(5) + b"\xff\xff\xff\xff\xff")
        raw.settimeout(5)
        reply = raw.recv(65536)
        assert b"invalid" in reply
    # An oversized frame header.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.connect(a.socket_path)
        raw.sendall(HEADER.pack(1 << 30))
        raw.settimeout(5)
        assert b"invalid" in raw.recv(65536)
    # Unknown ops and bad arguments are errors with kinds, on a session that keeps working.
    async with Connection.open(a.socket_path) as conn:
        try:
            await conn.call("no.such.op")
        except Invalid as exc:
            assert "unknown op" in exc.message
        else:
            raise AssertionError("unknown op accepted")
        try:
            await conn.call("members", {"status": "sleepy"})
        except Invalid:
            pass
        else:
            raise AssertionError("bad status accepted")
        assert (await conn.call("info"))["node"] == "a"
