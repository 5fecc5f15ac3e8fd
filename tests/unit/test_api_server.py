"""The real ApiServer on a Unix socket, with small test ops registered on it (no daemon),
driven by the real client Connection (anyio on trio here) and by a raw socket peer for what a
well-behaved client never sends."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from raw_api import RawApi

from meshd.api.handles import Stream
from meshd.api.server import ApiServer
from meshd.api.session import Session
from meshd_client.connection import Connection
from meshd_client.protocol import errors, messages
from meshd_client.protocol.errors import MeshError
from meshd_client.protocol.framing import HEADER, encode_frame

MAX_IN_FLIGHT = 128
LOG = logging.getLogger("test.api")


# ---------------------------------------------------------------------------- test ops


@dataclass
class Ops:
    """Ops registered on the server, and what they observed."""

    gates: dict[str, trio.Event] = field(default_factory=dict)
    entered: dict[str, int] = field(default_factory=dict)
    stream_ended: dict[int, str] = field(default_factory=dict)  # request id -> how
    emitted: dict[int, int] = field(default_factory=dict)  # request id -> events so far
    stream_failures: list[MeshError] = field(default_factory=list)
    closed_sessions: list[int] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    def gate(self, name: str) -> trio.Event:
        return self.gates.setdefault(name, trio.Event())

    def note(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def until(self, check: Any, timeout: float = 10.0) -> None:
        """Until ``check()`` holds: woken by the ops, and polling for server-side state."""
        with trio.fail_after(timeout):
            while not check():
                with trio.move_on_after(0.01):
                    await self.changed.wait()

    # request ops ----------------------------------------------------------------------

    async def echo(self, _s: Session, req: messages.Request) -> Any:
        return req.args

    async def wait_gate(self, _s: Session, req: messages.Request) -> Any:
        name = req.args["gate"]
        self.entered[name] = self.entered.get(name, 0) + 1
        self.note()
        await self.gate(name).wait()
        return {"gate": name, "id": req.id}

    async def boom(self, _s: Session, _req: messages.Request) -> Any:
        raise RuntimeError("a bug in an op")

    async def not_found(self, _s: Session, _req: messages.Request) -> Any:
        raise errors.NotFound("nothing here", detail={"what": "x"})

    async def huge(self, _s: Session, _req: messages.Request) -> Any:
        return "x" * (2 << 20)

    async def hook(self, session: Session, _req: messages.Request) -> Any:
        def bad_hook(_s: Session) -> None:
            raise RuntimeError("a failing hook must not stop the others")

        def good_hook(s: Session) -> None:
            self.closed_sessions.append(s.id)
            self.note()

        session.close_hooks.append(bad_hook)
        session.close_hooks.append(good_hook)
        return session.id

    async def drop(self, session: Session, _req: messages.Request) -> Any:
        session.close_connection()  # the daemon going away, as the client sees it

    # stream ops -----------------------------------------------------------------------

    async def ticks(self, _s: Session, req: messages.Request, stream: Stream) -> None:
        burst = req.args.get("burst", 1)
        try:
            for i in range(req.args.get("count", 10**9)):
                stream.emit({"n": i})
                self.emitted[req.id] = i + 1
                if (i + 1) % burst == 0:
                    await trio.sleep(0.002)
            self.stream_ended[req.id] = "finished"
        except trio.Cancelled:
            self.stream_ended[req.id] = "cancelled"
            raise
        except errors.Closed:
            self.stream_ended[req.id] = "closed"  # a write found the client gone first
            raise
        finally:
            self.note()

    async def flood_offer(self, _s: Session, req: messages.Request, stream: Stream) -> None:
        """The shape of the daemon's own stream ops (agent.serve, subscribe, registry.watch):
        events offered from elsewhere, the op waiting in until_failed next to other work."""

        async def produce() -> None:
            i = 0
            while True:
                stream.offer({"i": i, "pad": "p" * 1000})
                i += 1
                await trio.sleep(0)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                await stream.until_failed()
        except BaseException as exc:
            self._record_failure(exc)
            raise
        finally:
            self.note()

    async def flood_emit(self, _s: Session, req: messages.Request, stream: Stream) -> None:
        try:
            i = 0
            while True:
                stream.emit({"i": i, "pad": "p" * 1000})
                i += 1
                await trio.sleep(0)
        except MeshError as exc:
            self.stream_failures.append(exc)
            raise
        finally:
            self.note()

    def _record_failure(self, exc: BaseException) -> None:
        if isinstance(exc, MeshError):
            self.stream_failures.append(exc)
        elif isinstance(exc, BaseExceptionGroup):
            found, _ = exc.split(MeshError)
            if found is not None:
                self.stream_failures.extend(e for e in found.exceptions if isinstance(e, MeshError))

    async def stream_fail(self, _s: Session, _req: messages.Request, stream: Stream) -> None:
        stream.emit({"first": True})
        raise errors.NotFound("the thing went away")

    async def offer_then_fail(self, _s: Session, _req: messages.Request, stream: Stream) -> None:
        stream.emit({"first": True})
        await trio.sleep(0.01)  # the session's writer is idle, waiting for the next frame
        stream.offer({"notice": "lost"})  # queued for the writer...
        raise errors.Conflict("lost a name conflict")  # ...and the end must not overtake it

    async def stream_crash(self, _s: Session, _req: messages.Request, stream: Stream) -> None:
        stream.emit({"first": True})
        await trio.sleep(0)
        raise RuntimeError("a bug in a stream op")

    def register(self, api: ApiServer) -> None:
        api.add_op("echo", self.echo)
        api.add_op("wait", self.wait_gate)
        api.add_op("boom", self.boom)
        api.add_op("not_found", self.not_found)
        api.add_op("huge", self.huge)
        api.add_op("hook", self.hook)
        api.add_op("drop", self.drop)
        api.add_stream_op("ticks", self.ticks)
        api.add_stream_op("flood_offer", self.flood_offer)
        api.add_stream_op("flood_emit", self.flood_emit)
        api.add_stream_op("stream_fail", self.stream_fail)
        api.add_stream_op("stream_crash", self.stream_crash)
        api.add_stream_op("offer_then_fail", self.offer_then_fail)


@dataclass
class Server:
    api: ApiServer
    ops: Ops

    @property
    def path(self) -> str:
        return self.api.path


@pytest.fixture
async def server(tmp_path: Path, nursery: trio.Nursery) -> Server:
    api = ApiServer(str(tmp_path / "api.sock"), "testnode", LOG)
    ops = Ops()
    ops.register(api)
    await nursery.start(api.serve)
    return Server(api, ops)


# ---------------------------------------------------------------------------- raw peer


async def raw(server: Server) -> RawApi:
    return await RawApi.open(server.path)


async def assert_fatal(
    peer: RawApi, kind: str, match: str = "", timeout: float = 5.0
) -> dict[str, Any]:
    """The session-level error frame (id null), then the connection is closed."""
    frame = await peer.recv(timeout)
    assert frame is not None, "closed without saying why"
    assert frame["t"] == "res"
    assert frame["id"] is None
    assert frame["ok"] is False
    assert frame["error"]["kind"] == kind, frame
    assert match in frame["error"]["message"], frame
    assert await peer.recv(timeout) is None, "the session should be closed"
    return frame


# ---------------------------------------------------------------------------- handshake


async def test_hello_negotiates_and_identifies_the_daemon(server: Server) -> None:
    async with Connection.open(server.path, client="unit/1") as conn:
        assert conn.version == messages.API_VERSION
        assert conn.node == "testnode"
        assert conn.daemon.startswith("meshd/")
        assert await conn.call("echo", {"a": 1}) == {"a": 1}
        assert server.api.stats.active_sessions == 1
        (session,) = server.api.sessions.values()
        assert session.client == "unit/1"
        assert session.creds.pid == os.getpid()
    await server.ops.until(lambda: server.api.stats.active_sessions == 0)


async def test_raw_hello_reply(server: Server) -> None:
    peer = await raw(server)
    await peer.send({"t": "hello", "versions": [7, 1, 3], "client": "x"})
    reply = await peer.recv()
    assert reply is not None
    assert reply.pop("daemon").startswith("meshd/")
    assert reply == {"t": "hello", "version": 1, "node": "testnode"}


async def test_no_common_version_is_refused_and_closed(server: Server) -> None:
    peer = await raw(server)
    await peer.send({"t": "hello", "versions": [2, 3], "client": "future"})
    frame = await assert_fatal(peer, "invalid", "no common protocol version")
    assert frame["error"]["detail"] == {"supported": list(messages.SUPPORTED_VERSIONS)}
    assert server.api.stats.rejected.get("session_invalid") == 1


async def test_first_frame_must_be_a_hello(server: Server) -> None:
    peer = await raw(server)
    await peer.send(messages.request(1, "echo", {}))
    await assert_fatal(peer, "invalid", "hello")


async def test_malformed_hello_is_refused(server: Server) -> None:
    peer = await raw(server)
    await peer.send({"t": "hello", "versions": "1"})
    await assert_fatal(peer, "invalid", "versions")


async def test_garbage_before_the_hello(server: Server) -> None:
    peer = await raw(server)
    await peer.send_bytes(HEADER.pack(3) + b"\xff\xfe\xfd")
    await assert_fatal(peer, "invalid", "bad frame")


async def test_a_second_hello_is_an_error_but_the_session_goes_on(server: Server) -> None:
    peer = await raw(server)
    await peer.handshake()
    await peer.send(messages.hello("again"))
    frame = await peer.recv()
    assert frame is not None
    assert frame["id"] is None and frame["error"]["kind"] == "invalid"
    await peer.send(messages.request(1, "echo", {"still": "here"}))
    assert await peer.recv() == messages.ok(1, {"still": "here"})


async def test_client_that_never_says_hello_is_not_waited_for_forever(
    server: Server, autojump_clock: trio.testing.MockClock
) -> None:
    peer = await raw(server)
    # The autojump clock skips to the daemon's 10 s hello timeout as soon as all is idle.
    await assert_fatal(peer, "timeout", "no hello", timeout=60)


# ---------------------------------------------------------------------------- requests


async def test_replies_come_in_completion_order_not_request_order(server: Server) -> None:
    peer = await raw(server)
    await peer.handshake()
    await peer.send(messages.request(1, "wait", {"gate": "slow"}))
    await peer.send(messages.request(2, "echo", {"fast": True}))
    assert await peer.recv() == messages.ok(2, {"fast": True})
    server.ops.gate("slow").set()
    assert await peer.recv() == messages.ok(1, {"gate": "slow", "id": 1})


async def test_concurrent_calls_on_one_connection(server: Server) -> None:
    async with Connection.open(server.path) as conn:
        slow_result: list[Any] = []

        async def slow() -> None:
            slow_result.append(await conn.call("wait", {"gate": "g"}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            await server.ops.until(lambda: server.ops.entered.get("g") == 1)
            for i in range(5):
                assert await conn.call("echo", {"i": i}) == {"i": i}
            assert slow_result == []
            server.ops.gate("g").set()
        assert slow_result[0]["gate"] == "g"


async def test_unknown_op_is_invalid_and_the_session_goes_on(server: Server) -> None:
    async with Connection.open(server.path) as conn:
        with pytest.raises(errors.Invalid, match="unknown op"):
            await conn.call("no.such.op")
        assert await conn.call("echo", {"ok": 1}) == {"ok": 1}


async def test_op_errors_keep_their_kind(server: Server) -> None:
    async with Connection.open(server.path) as conn:
        with pytest.raises(errors.NotFound, match="nothing here") as caught:
            await conn.call("not_found")
        assert caught.value.detail == {"what": "x"}
        with pytest.raises(errors.Internal, match="boom failed"):
            await conn.call("boom")
        with pytest.raises(errors.Invalid, match="too large"):
            await conn.call("huge")
        assert await conn.call("echo") == {}
    assert server.api.stats.errors_by_kind == {"not_found": 1, "internal": 1}


async def test_a_bad_request_is_answered_with_its_id_and_the_session_goes_on(
    server: Server,
) -> None:
    peer = await raw(server)
    await peer.handshake()
    await peer.send({"t": "req", "id": 4, "op": "", "args": {}})
    frame = await peer.recv()
    assert frame is not None
    assert (frame["id"], frame["ok"], frame["error"]["kind"]) == (4, False, "invalid")
    await peer.send({"t": "req", "id": 5, "op": "echo", "args": [1]})
    frame = await peer.recv()
    assert frame is not None
    assert (frame["id"], frame["error"]["kind"]) == (5, "invalid")
    await peer.send(messages.request(6, "echo", {"x": 1}))
    assert await peer.recv() == messages.ok(6, {"x": 1})


async def test_request_id_already_in_flight_is_refused(server: Server) -> None:
    peer = await raw(server)
    await peer.handshake()
    await peer.send(messages.request(9, "wait", {"gate": "dup"}))
    await server.ops.until(lambda: server.ops.entered.get("dup") == 1)
    await peer.send(messages.request(9, "echo", {}))
    frame = await peer.recv()
    assert frame is not None
    assert (frame["id"], frame["error"]["kind"]) == (9, "invalid")
    assert "in flight" in frame["error"]["message"]
    server.ops.gate("dup").set()
    assert await peer.recv() == messages.ok(9, {"gate": "dup", "id": 9})
    # Once answered, the id may be used again.
    await peer.send(messages.request(9, "echo", {"again": True}))
    assert await peer.recv() == messages.ok(9, {"again": True})


async def test_too_many_requests_in_flight_is_overloaded(server: Server) -> None:
    ops = server.ops
    async with Connection.open(server.path) as conn:
        results: list[Any] = []

        async def blocked() -> None:
            results.append(await conn.call("wait", {"gate": "many"}))

        async with trio.open_nursery() as nursery:
            for _ in range(MAX_IN_FLIGHT):
                nursery.start_soon(blocked)
            await ops.until(lambda: ops.entered.get("many") == MAX_IN_FLIGHT)
            with pytest.raises(errors.Overloaded, match="in flight"):
                await conn.call("echo", {"one": "too many"})
            ops.gate("many").set()
        assert len(results) == MAX_IN_FLIGHT
        # The capacity is back.
        assert await conn.call("echo", {"after": 1}) == {"after": 1}
    assert server.api.stats.errors_by_kind.get("overloaded") == 1


async def test_in_flight_limit_is_per_session(server: Server) -> None:
    ops = server.ops
    async with (
        Connection.open(server.path) as busy,
        Connection.open(server.path) as other,
        trio.open_nursery() as nursery,
    ):
        for _ in range(MAX_IN_FLIGHT):
            nursery.start_soon(busy.call, "wait", {"gate": "per-session"})
        await ops.until(lambda: ops.entered.get("per-session") == MAX_IN_FLIGHT)
        assert await other.call("echo", {"fine": True}) == {"fine": True}
        ops.gate("per-session").set()


# ---------------------------------------------------------------------------- streams


async def test_stream_events_then_client_cancel(server: Server) -> None:
    async with Connection.open(server.path) as conn:
        got = []
        async with conn.stream("ticks") as events:
            async for event in events:
                got.append(event["n"])
                if len(got) == 5:
                    break
        assert got == [0, 1, 2, 3, 4]
        await server.ops.until(lambda: "cancelled" in server.ops.stream_ended.values())
        assert await conn.call("echo", {"after": "cancel"}) == {"after": "cancel"}
        (session,) = server.api.sessions.values()
        await server.ops.until(lambda: not session._requests)


async def test_raw_cancel_ends_the_stream_and_frees_its_id(server: Server) -> None:
    peer = await raw(server)
    await peer.handshake()
    await peer.send(messages.request(5, "ticks", {}))
    assert await peer.recv() == messages.ok(5, None)
    first = await peer.recv()
    assert first == messages.event(5, {"n": 0})
    await peer.send(messages.cancel(5))
    while True:
        frame = await peer.recv()
        assert frame is not None
        if frame["t"] == "end":
            break
        assert frame["t"] == "evt" and frame["id"] == 5
    assert frame == messages.end(5)
    assert server.ops.stream_ended[5] == "cancelled"
    await peer.send(messages.request(5, "echo", {"reused": True}))
    assert await peer.recv() == messages.ok(5, {"reused": True})


async def test_a_consumer_that_falls_behind_is_told_and_the_daemon_stops_the_stream(
    server: Server,
) -> None:
    """The client buffers 1,024 events per stream. A consumer that falls further behind gets
    what was buffered, then Overloaded (like a daemon-side overload), and the daemon is told
    to stop producing: nothing keeps running for a stream nobody reads."""
    ops = server.ops
    async with Connection.open(server.path) as conn:
        async with conn.stream("ticks", {"burst": 20}) as events:
            (rid,) = ops.emitted  # the Connection's first request id
            await ops.until(lambda: ops.emitted[rid] > 1500)  # the consumer reads nothing
            got = []
            with pytest.raises(errors.Overloaded):
                async for event in events:
                    got.append(event["n"])
            assert got == list(range(1024))
        await ops.until(lambda: rid in ops.stream_ended, timeout=5)
        assert ops.stream_ended[rid] == "cancelled"
        # The connection is fine, and a new stream works.
        async with conn.stream("ticks", {"count": 2}) as events:
            assert [e["n"] async for e in events] == [0, 1]


async def test_cancel_of_an_unknown_id_is_ignored(server: Server) -> None:
    peer = await raw(server)
    await peer.handshake()
    await peer.send(messages.cancel(12345))
    await peer.send(messages.request(1, "echo", {}))
    assert await peer.recv() == messages.ok(1, {})


async def test_a_stream_that_finishes_ends_normally(server: Server) -> None:
    async with Connection.open(server.path) as conn:
        async with conn.stream("ticks", {"count": 3}) as events:
            got = [e["n"] async for e in events]
        assert got == [0, 1, 2]


async def test_a_stream_op_error_ends_the_stream_with_that_error(server: Server) -> None:
    async with Connection.open(server.path) as conn:
        got = []
        with pytest.raises(errors.NotFound, match="went away"):
            async with conn.stream("stream_fail") as events:
                async for event in events:
                    got.append(event)
        assert got == [{"first": True}]


async def test_an_event_queued_before_a_stream_ends_reaches_the_client_first(
    server: Server,
) -> None:
    """A frame handed to an idle writer leaves the queue empty before the writer has sent
    it; the stream's end, written directly, must still come after it (a losing agent is
    told who won before its stream ends)."""
    async with Connection.open(server.path) as conn:
        for _ in range(20):
            got = []
            with pytest.raises(errors.Conflict):
                async with conn.stream("offer_then_fail") as events:
                    async for event in events:
                        got.append(event)
            assert got == [{"first": True}, {"notice": "lost"}]


async def test_a_crashing_stream_op_ends_the_stream_with_internal(server: Server) -> None:
    """A bug in a stream op must end the stream (``end`` with ``internal``), not leave the
    client waiting for events forever."""
    async with Connection.open(server.path) as conn:
        got = []
        with trio.fail_after(5), pytest.raises(errors.Internal):
            async with conn.stream("stream_crash") as events:
                async for event in events:
                    got.append(event)
        assert got == [{"first": True}]
        assert await conn.call("echo", {"ok": True}) == {"ok": True}


async def test_raw_crashing_stream_op_sends_one_res_and_an_end(server: Server) -> None:
    peer = await raw(server)
    await peer.handshake()
    await peer.send(messages.request(3, "stream_crash", {}))
    assert await peer.recv() == messages.ok(3, None)
    assert await peer.recv() == messages.event(3, {"first": True})
    end = await peer.recv()
    assert end is not None
    assert end["t"] == "end" and end["id"] == 3, end
    assert end["error"]["kind"] == "internal"


@pytest.mark.parametrize("op", ["flood_offer", "flood_emit"])
async def test_a_stream_whose_client_does_not_read_ends_overloaded(server: Server, op: str) -> None:
    ops = server.ops
    slow = await raw(server)
    await slow.handshake()
    await slow.send(messages.request(1, op, {}))
    # The client reads nothing: the socket buffer fills, then the bounded queue.
    await ops.until(lambda: ops.stream_failures, timeout=15)
    assert isinstance(ops.stream_failures[0], errors.Overloaded)
    # Meanwhile the daemon serves everybody else.
    async with Connection.open(server.path) as other:
        for i in range(3):
            assert await other.call("echo", {"i": i}) == {"i": i}
    # The slow client finally reads: its events, then the end of the stream.
    assert await slow.recv() == messages.ok(1, None)
    events = 0
    while True:
        frame = await slow.recv()
        assert frame is not None
        if frame["t"] != "evt":
            break
        assert frame["event"]["i"] == events
        events += 1
    assert events >= 1000
    assert frame["t"] == "end" and frame["id"] == 1, frame
    assert frame["error"]["kind"] == "overloaded"
    # The session itself is fine.
    await slow.send(messages.request(2, "echo", {"alive": True}))
    assert await slow.recv() == messages.ok(2, {"alive": True})


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "data",
    [
        HEADER.pack(4) + b"\xff\xff\xff\xff",
        HEADER.pack(2) + b"\x82\x01",  # truncated array
        encode_frame({"t": "req"})[:4] + b"\xc1\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
        HEADER.pack(3) + b"\x83\x01\x02",  # an array, not a map: wrong length, then garbage
        HEADER.pack(2) + b"\x81\x01",  # a well-formed array: not a map
        HEADER.pack((1 << 20) + 1),  # oversized: refused from the header alone
        b"\xff\xff\xff\xff",
    ],
    ids=["garbage", "truncated", "tag", "short", "array", "oversized", "huge-header"],
)
async def test_garbage_after_hello_gets_an_error_frame_and_close(
    server: Server, data: bytes
) -> None:
    peer = await raw(server)
    await peer.handshake()
    await peer.send_bytes(data)
    await assert_fatal(peer, "invalid", "bad frame")
    assert server.api.stats.rejected.get("session_invalid") == 1


async def test_garbage_closes_only_that_session(server: Server) -> None:
    async with Connection.open(server.path) as good:
        bad = await raw(server)
        await bad.handshake()
        await bad.send_bytes(HEADER.pack(1) + b"\xff")
        await assert_fatal(bad, "invalid")
        assert await good.call("echo", {"fine": 1}) == {"fine": 1}


# ---------------------------------------------------------------------------- session end


async def test_session_close_runs_close_hooks(server: Server) -> None:
    ops = server.ops
    async with Connection.open(server.path) as conn:
        session_id = await conn.call("hook")
        assert ops.closed_sessions == []
    await ops.until(lambda: session_id in ops.closed_sessions)
    assert server.api.sessions == {}


async def test_close_hooks_run_after_garbage_too(server: Server) -> None:
    ops = server.ops
    peer = await raw(server)
    await peer.handshake()
    await peer.send(messages.request(1, "hook", {}))
    frame = await peer.recv()
    assert frame is not None
    session_id = frame["value"]
    await peer.send_bytes(HEADER.pack(1) + b"\xff")
    await assert_fatal(peer, "invalid")
    await ops.until(lambda: session_id in ops.closed_sessions)


async def test_closing_the_session_cancels_its_streams_and_requests(server: Server) -> None:
    ops = server.ops
    peer = await raw(server)
    await peer.handshake()
    await peer.send(messages.request(1, "ticks", {}))
    await peer.send(messages.request(2, "wait", {"gate": "never"}))
    await ops.until(lambda: ops.entered.get("never") == 1)
    await peer.stream.aclose()
    # The stream ends either way: cancelled when the session sees the end of input first,
    # or failing with ``closed`` when its next event meets the closed socket first.
    await ops.until(lambda: ops.stream_ended.get(1) in ("cancelled", "closed"))
    await ops.until(lambda: server.api.stats.active_sessions == 0)
    assert ops.entered.get("never") == 1 and not server.api.sessions


async def test_daemon_closing_the_connection_fails_pending_calls_with_closed(
    server: Server,
) -> None:
    async with Connection.open(server.path) as conn:
        outcome: list[BaseException] = []

        async def pending() -> None:
            try:
                await conn.call("wait", {"gate": "forever"})
            except MeshError as exc:
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pending)
            await server.ops.until(lambda: server.ops.entered.get("forever") == 1)
            with pytest.raises(errors.Closed):
                await conn.call("drop")
        assert len(outcome) == 1 and isinstance(outcome[0], errors.Closed)
        assert conn.lost.is_set()
        assert conn.closed
        with pytest.raises(errors.Closed):
            await conn.call("echo")


async def test_connecting_where_nothing_listens(tmp_path: Path) -> None:
    with pytest.raises(errors.Unreachable, match="not running"):
        async with Connection.open(str(tmp_path / "missing.sock")):
            pass
    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("")
    with pytest.raises(errors.Unreachable):
        async with Connection.open(str(not_a_socket)):
            pass


async def test_a_stale_socket_file_is_replaced(tmp_path: Path, nursery: trio.Nursery) -> None:
    path = tmp_path / "stale.sock"
    import socket

    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # bound, never listening: what a crashed daemon leaves behind
    api = ApiServer(str(path), "fresh", LOG)
    Ops().register(api)
    await nursery.start(api.serve)
    async with Connection.open(str(path)) as conn:
        assert conn.node == "fresh"


async def test_a_second_server_on_a_live_socket_refuses(server: Server) -> None:
    other = ApiServer(server.path, "intruder", LOG)
    with pytest.raises(OSError, match="another daemon"):
        await other.serve()
    async with Connection.open(server.path) as conn:
        assert conn.node == "testnode"


async def test_notes_running_in_tasks_are_bounded_and_the_excess_is_counted(
    server: Server,
) -> None:
    from meshd.api import session as api_session

    limit = api_session.MAX_IN_FLIGHT
    ops = server.ops
    peer = await raw(server)
    await peer.handshake()
    for _ in range(limit + 5):
        await peer.send(messages.note("wait", {"gate": "notes"}))
    await peer.send(messages.request(1, "echo", {"still": "served"}))
    assert await peer.recv() == messages.ok(1, {"still": "served"})
    await ops.until(lambda: ops.entered.get("notes") == limit)
    assert server.api.stats.rejected.get("note_overloaded") == 5
    ops.gate("notes").set()  # the running notes end: room for more
    (session,) = server.api.sessions.values()
    await ops.until(lambda: session._notes == 0)
    ops.gates.pop("notes")
    await peer.send(messages.note("wait", {"gate": "again"}))
    await ops.until(lambda: ops.entered.get("again") == 1)


# ---------------------------------------------------------------------------- resource bounds


async def quiet(_s: Session, _req: messages.Request, stream: Stream) -> None:
    """A stream that only waits (as a subscription with no signal does)."""
    await stream.until_failed()


async def bounded(tmp_path: Path, nursery: trio.Nursery, **limits: Any) -> Server:
    api = ApiServer(str(tmp_path / "bounded.sock"), "testnode", LOG, **limits)
    ops = Ops()
    ops.register(api)
    api.add_stream_op("quiet", quiet)
    await nursery.start(api.serve)
    return Server(api, ops)


@pytest.mark.parametrize("rid", [-1, 2**63, 2**64 - 1, -(2**63)])
async def test_an_out_of_range_request_id_is_answered_with_id_null(
    server: Server, rid: int
) -> None:
    peer = await raw(server)
    await peer.handshake()
    await peer.send({"t": "req", "id": rid, "op": "echo", "args": {}})
    frame = await peer.recv()
    assert frame is not None
    assert (frame["id"], frame["ok"], frame["error"]["kind"]) == (None, False, "invalid")
    await peer.send(messages.request(1, "echo", {}))
    assert await peer.recv() == messages.ok(1, {})


async def test_a_hello_larger_than_a_hello_is_refused_before_it_is_buffered(
    server: Server,
) -> None:
    peer = await raw(server)
    await peer.send_bytes(HEADER.pack(64 << 10) + b"\x00" * 100)
    await assert_fatal(peer, "invalid", "exceeds")


async def test_a_partial_frame_is_closed_after_its_timeout(
    tmp_path: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await bounded(tmp_path, nursery, partial_frame_timeout=30.0)
    peer = await raw(server)
    await peer.handshake()
    # A frame announced whole but sent in drips: the drips do not buy it more time.
    await peer.send_bytes(HEADER.pack(1000) + b"\xa1")
    await server.ops.until(lambda: server.api.buffered == 1004)
    sent = 0
    with trio.move_on_after(120):
        while sent < 500:
            await trio.sleep(1)
            try:
                await peer.send_bytes(b"\x00")
            except trio.BrokenResourceError:
                break
            sent += 1
    assert sent < 500
    await assert_fatal(peer, "timeout", "did not arrive whole")
    assert server.api.stats.rejected["partial_frame_timeout"] == 1
    await server.ops.until(lambda: server.api.buffered == 0 and not server.api.sessions)


async def test_frames_that_arrive_whole_in_time_are_never_timed_out(
    tmp_path: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await bounded(tmp_path, nursery, partial_frame_timeout=5.0)
    peer = await raw(server)
    await peer.handshake()
    for i in range(10):
        data = encode_frame(messages.request(i, "echo", {"i": i}))
        await peer.send_bytes(data[:7])
        await trio.sleep(4)  # each frame finishes within 5 s of its first byte
        await peer.send_bytes(data[7:])
        assert await peer.recv() == messages.ok(i, {"i": i})
        await trio.sleep(60)  # idle between frames costs nothing
    assert not server.api.stats.rejected
    assert server.api.buffered == 0


async def test_partial_frames_share_one_budget_and_the_excess_is_closed_overloaded(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    server = await bounded(tmp_path, nursery, max_buffered=300 << 10)
    first = await raw(server)
    await first.handshake()
    await first.send_bytes(HEADER.pack(200 << 10) + b"\x00" * (100 << 10))
    await server.ops.until(lambda: server.api.buffered == (200 << 10) + 4)
    second = await raw(server)
    await second.handshake()
    await second.send_bytes(HEADER.pack(200 << 10) + b"\x00" * 10)
    await assert_fatal(second, "overloaded", "partial frames")
    assert server.api.stats.rejected["buffer_budget"] == 1
    # The first one completes its frame (not a valid one: the session ends), and the bytes
    # it held are given back.
    await first.send_bytes(b"\x00" * (100 << 10))
    await assert_fatal(first, "invalid", "bad frame")
    await server.ops.until(lambda: server.api.buffered == 0)
    third = await raw(server)
    await third.handshake()
    await third.send_bytes(HEADER.pack(200 << 10) + b"\x00")
    await server.ops.until(lambda: server.api.buffered == (200 << 10) + 4)


async def test_sessions_past_the_cap_are_told_overloaded_and_closed(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    server = await bounded(tmp_path, nursery, max_sessions=2)
    first, second = await raw(server), await raw(server)
    await first.handshake()
    await second.handshake()
    third = await raw(server)
    await third.send(messages.hello("third"))
    frame = await assert_fatal(third, "overloaded", "too many sessions")
    assert frame["error"]["detail"] == {"max_sessions": 2}
    assert server.api.stats.rejected["session_limit"] == 1
    await first.stream.aclose()
    await server.ops.until(lambda: len(server.api.sessions) == 1)
    async with Connection.open(server.path) as conn:
        assert await conn.call("echo", {"in": True}) == {"in": True}


async def test_streams_are_capped_per_session_and_per_daemon(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    server = await bounded(tmp_path, nursery, max_streams=3, max_streams_total=4)
    a, b = await raw(server), await raw(server)
    await a.handshake()
    await b.handshake()
    for i in range(1, 5):
        await a.send(messages.request(i, "quiet", {}))
    replies = {}
    for _ in range(4):
        reply = await a.recv()
        assert reply is not None
        replies[reply["id"]] = reply  # answered in any order: a refusal comes at once
    assert [replies[i]["ok"] for i in range(1, 5)] == [True, True, True, False]
    refused = replies[4]
    assert refused["error"]["kind"] == "overloaded"
    assert "this session" in refused["error"]["message"]
    await b.send(messages.request(1, "quiet", {}))
    assert await b.recv() == messages.ok(1, None)
    await b.send(messages.request(2, "quiet", {}))
    frame = await b.recv()
    assert frame is not None and frame["error"]["kind"] == "overloaded"
    assert "this daemon" in frame["error"]["message"]
    assert server.api.open_streams == 4
    await a.send(messages.cancel(1))
    assert await a.recv() == messages.end(1)
    await b.send(messages.request(3, "quiet", {}))
    assert await b.recv() == messages.ok(3, None)
    await a.stream.aclose()
    await server.ops.until(lambda: server.api.open_streams == 2)


async def test_a_client_that_never_reads_pins_a_bounded_number_of_bytes(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    server = await bounded(tmp_path, nursery)
    failures: list[MeshError] = []

    async def big_events(_s: Session, _req: messages.Request, stream: Stream) -> None:
        try:
            for _ in range(10_000):
                stream.emit({"pad": b"\xa5" * (256 << 10)})
                await trio.sleep(0)
        except MeshError as exc:
            failures.append(exc)
            raise

    server.api.add_stream_op("big_events", big_events)
    peer = await raw(server)
    await peer.handshake()
    await peer.send(messages.request(1, "big_events", {}))
    await server.ops.until(lambda: bool(server.api.sessions))
    (session,) = server.api.sessions.values()
    peak = 0
    with trio.fail_after(30):
        while not failures:
            peak = max(peak, session.outbox.bytes)
            await trio.sleep(0)
    assert isinstance(failures[0], errors.Overloaded)
    # At most the bound was queued (and one frame over it).
    assert peak <= (4 << 20) + (257 << 10)


def test_fanout_listeners_come_and_go_in_any_order() -> None:
    from meshd.api.fanout import Fanout

    fanout: Fanout[int] = Fanout()
    seen: list[tuple[int, int]] = []
    removers = [fanout.add(lambda e, i=i: seen.append((i, e))) for i in range(5)]
    removers[2]()
    removers[2]()  # idempotent
    fanout(7)
    assert seen == [(0, 7), (1, 7), (3, 7), (4, 7)]
    for remove in removers:
        remove()
    fanout(8)
    assert len(fanout) == 0 and len(seen) == 4
