"""Resource bounds under attack, on real daemons (issue 11, items 1, 3 and 7): what an
attacker without a key, or a buggy client of the socket, can make a daemon hold. Assertions
are on counts and on memory (VmRSS, with generous bounds), never on timings; the figures
themselves come from ``python -m bench.hostile``."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from raw_api import RawApi

from meshd.testing.localcluster import Daemon, LocalCluster
from meshd_client.protocol import messages
from meshd_client.protocol.framing import HEADER, encode_frame

MIB = 1 << 20


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def until(check: Any, timeout: float = 60.0, what: str = "") -> None:
    """Poll ``check()`` (sync or async) until it holds."""
    with trio.fail_after(timeout):
        while True:
            result = check()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await trio.sleep(0.1)


async def info(daemon: Daemon) -> dict[str, Any]:
    value: dict[str, Any] = await daemon.call("info", timeout=30)
    return value


@contextlib.asynccontextmanager
async def sessions(path: str, count: int) -> AsyncIterator[list[RawApi]]:
    opened: list[RawApi] = []
    try:
        for _ in range(count):
            session = await RawApi.open(path)
            opened.append(session)
            reply = await session.hello("hostile-e2e", timeout=60)
            assert reply is not None and reply["t"] == "hello", reply
        yield opened
    finally:
        for session in opened:
            await session.aclose()


def is_fatal(frame: dict[str, Any] | None, kind: str) -> bool:
    return (
        frame is not None
        and frame.get("t") == "res"
        and frame.get("id") is None
        and frame["error"]["kind"] == kind
    )


# ---------------------------------------------------------------------------- item 1: no key


@pytest.mark.timeout(240)
async def test_connections_announcing_8_mib_without_a_key_hold_no_memory(
    cluster: LocalCluster,
) -> None:
    target, peer = cluster.start_many(2)
    await cluster.wait_ready()
    await cluster.wait_converged()
    before = rss_mib(target.pid)
    junk = b"\xa5" * (256 << 10)
    cut = 0

    async def attack() -> None:
        nonlocal cut
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", target.port)
        except OSError:
            cut += 1  # accepted and reset before this side saw it connected
            return
        try:
            await stream.send_all(struct.pack(">I", 8 * MIB))
            for _ in range(32):  # 8 MiB - 1 would follow; it is refused long before
                await stream.send_all(junk)
            await trio.sleep(5)
        except (trio.BrokenResourceError, OSError):
            cut += 1
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        for _ in range(200):
            nursery.start_soon(attack)
    after = rss_mib(target.pid)
    stats = await info(target)
    refused = stats["stats"]["rejected"]
    # Every connection was refused (its length alone, or the cap on connections without a
    # key): none of the 1.6 GiB was buffered.
    assert (
        refused.get("stream_frame_too_large", 0)
        + refused.get("stream_unauthenticated_busy", 0)
        + refused.get("stream_closed", 0)
        >= 200
    ), refused
    assert refused.get("stream_frame_too_large", 0) >= 1
    assert cut >= 190
    assert after < before + 100, (before, after)
    assert (await peer.statuses())[target.name] == "alive"


@pytest.mark.timeout(240)
async def test_a_flood_of_silent_connections_holds_at_most_the_unauthenticated_cap(
    cluster: LocalCluster,
) -> None:
    target = cluster.add(
        "n1",
        extra=["--set=transport.max_unauthenticated=64", "--set=transport.header_timeout=3s"],
    )
    await cluster.wait_ready()
    base = fd_count(target.pid)
    held: list[socket.socket] = []
    try:
        for _ in range(1000):
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                await sock.connect(("127.0.0.1", target.port))
            except ConnectionResetError:
                sock.close()  # accepted and reset before this side saw it connected
                continue
            held.append(socket.socket(fileno=sock.detach()))
        # Everything was accepted, and all but the cap refused at once.
        await until(lambda: _accepted_at_least(target, 1000))
        peak = fd_count(target.pid)
        assert peak <= base + 64 + 16, (base, peak)
        stats = await info(target)
        assert stats["transport"]["refused_busy"] >= 1000 - 64
        assert stats["stats"]["rejected"]["stream_unauthenticated_busy"] >= 1000 - 64
        # The held ones are closed after the header timeout.
        await until(lambda: fd_count(target.pid) <= base + 4)
        after = await info(target)
        assert after["stats"]["rejected"].get("stream_header_timeout", 0) >= 1
    finally:
        for sock in held:
            sock.close()


async def _accepted_at_least(daemon: Daemon, count: int) -> bool:
    return bool((await info(daemon))["transport"]["accepted"] >= count)


# ---------------------------------------------------------------------------- item 7: partial


@pytest.mark.timeout(240)
async def test_partial_api_frames_are_closed_after_the_configured_timeout(
    cluster: LocalCluster,
) -> None:
    target = cluster.add("n1", extra=["--set=api.partial_frame_timeout=1s"])
    await cluster.wait_ready()
    async with sessions(target.socket_path, 20) as held:
        for session in held:
            await session.send_bytes(HEADER.pack(MIB) + b"\xa5" * (MIB - 1))
        answers = [await session.recv(timeout=120) for session in held]
        assert all(is_fatal(frame, "timeout") for frame in answers), answers[:3]
        assert all([await session.recv(timeout=60) is None for session in held])
    stats = await info(target)
    assert stats["api"]["rejected"]["partial_frame_timeout"] == 20
    assert stats["api"]["buffered"] == 0
    assert "Traceback" not in target.log_text()


@pytest.mark.timeout(240)
async def test_partial_frames_beyond_the_buffer_budget_are_closed_overloaded(
    cluster: LocalCluster,
) -> None:
    target = cluster.add("n1", extra=[f"--set=api.max_buffered={4 * MIB}"])
    await cluster.wait_ready()
    before = rss_mib(target.pid)
    async with sessions(target.socket_path, 40) as held:
        for session in held:
            await session.send_bytes(HEADER.pack(MIB) + b"\xa5" * (MIB - 1))
        stats = await info(target)
        # At most four partial frames of 1 MiB fit; everyone else was told and closed.
        assert stats["api"]["buffered"] <= 4 * MIB
        assert stats["api"]["rejected"]["buffer_budget"] >= 36
        assert rss_mib(target.pid) < before + 64
        closed = 0
        for session in held:
            with trio.move_on_after(0.5):
                frame = await session.recv(timeout=60)
                closed += frame is None or is_fatal(frame, "overloaded")
        assert closed >= 36


@pytest.mark.timeout(240)
async def test_the_session_cap_answers_overloaded(cluster: LocalCluster) -> None:
    target = cluster.add("n1", extra=["--set=api.max_sessions=20"])
    await cluster.wait_ready()
    async with sessions(target.socket_path, 20):
        extra = await RawApi.open(target.socket_path)
        reply = await extra.hello("hostile-e2e", timeout=60)
        assert is_fatal(reply, "overloaded"), reply
        assert reply is not None and reply["error"]["detail"] == {"max_sessions": 20}
        assert await extra.recv(timeout=60) is None
        await extra.aclose()
    # Once they are gone, sessions are served again.
    await until(lambda: _answers(target))
    stats = await info(target)
    assert stats["api"]["rejected"]["session_limit"] >= 1


async def _answers(daemon: Daemon) -> bool:
    try:
        await info(daemon)
    except Exception:
        return False
    return True


# ---------------------------------------------------------------------------- item 3: streams


@pytest.mark.timeout(300)
async def test_5000_subscriptions_open_and_close_and_the_daemon_stays_healthy(
    tmp_path: Path,
) -> None:
    # The LAN profile's timers: a stalled event loop would get this daemon suspected.
    with LocalCluster(tmp_path / "cluster", profile="lan") as cluster:
        target, peer = cluster.start_many(2)
        await cluster.wait_ready(timeout=60)
        await cluster.wait_converged(timeout=60)
        suspicions = (await info(peer))["stats"]["suspicions"]
        count = 5000
        session = await RawApi.open(target.socket_path)
        assert (await session.hello("hostile-e2e", timeout=60) or {}).get("t") == "hello"
        opened = ended = 0
        signals: list[dict[str, Any]] = []

        async def read() -> None:
            nonlocal opened, ended
            while True:
                frame = await session.recv(timeout=240)
                if frame is None:
                    return
                kind = frame["t"]
                assert kind != "res" or frame["ok"], frame
                opened += kind == "res"
                ended += kind == "end"
                if kind == "evt":
                    signals.append(frame["event"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            requests = b"".join(
                encode_frame(messages.request(i, "subscribe", {"pattern": f"e2e.p{i}.*"}))
                for i in range(1, count + 1)
            )
            await session.send_bytes(requests)
            await until(lambda: opened == count, timeout=240)
            assert (await info(target))["api"]["streams"] == count
            # A publisher on the peer learns where the subscribers are (one registry write
            # per batch of patterns) and its signal reaches the last one.
            event = {"id": "1", "source": "e2e", "type": "t"}
            await until(lambda: _published(peer, f"e2e.p{count}.x", event), timeout=60)
            await until(lambda: bool(signals), timeout=30)
            assert signals[0]["topic"] == f"e2e.p{count}.x"
            cancels = b"".join(encode_frame(messages.cancel(i)) for i in range(1, count + 1))
            await session.send_bytes(cancels)
            await until(lambda: ended == count, timeout=240)
            nursery.cancel_scope.cancel()
        await session.aclose()
        stats = await info(target)
        assert stats["api"]["streams"] == 0
        # The peer never doubted the target while all this went on.
        assert (await peer.statuses())[target.name] == "alive"
        assert (await info(peer))["stats"]["suspicions"] == suspicions
        # The patterns are gone from the registry: a publisher reaches no host any more.
        await until(lambda: _published(peer, f"e2e.p{count}.x", event, hosts=0), timeout=60)
        assert "Traceback" not in target.log_text()


async def _published(daemon: Daemon, topic: str, event: dict[str, Any], hosts: int = 1) -> bool:
    value = await daemon.call("publish", {"topic": topic, "event": event}, timeout=30)
    return bool(value["hosts"] == hosts)
