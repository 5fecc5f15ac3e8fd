"""The stream server survives whatever a handler meets, and counts it under a reason that
says what happened (real loopback sockets)."""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from meshd.security.envelope import Envelope
from meshd.security.keyring import Keyring
from meshd.transport.stats import TransportStats
from meshd.transport.streams import (
    STREAM_VERSION,
    Channel,
    FramedStream,
    StreamError,
    StreamServer,
)
from meshd_client.protocol import cbor

KEY = os.urandom(32)


async def _serve_one(
    handler: Callable[[FramedStream], Awaitable[None]], caplog: pytest.LogCaptureFixture
) -> TransportStats:
    """Open one stream on the MEMBERSHIP channel, send its header and nothing more, and
    wait until the server is done with it."""
    stats = TransportStats()
    server = StreamServer(Envelope(Keyring([KEY])), stats, logging.getLogger("test.streams"))
    server.register(Channel.MEMBERSHIP, handler)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    with caplog.at_level(logging.DEBUG, logger="test.streams"):
        async with trio.open_nursery() as nursery:

            async def accept_one() -> None:
                raw = await listener.accept()
                await server.handle(raw)  # type: ignore[arg-type]

            nursery.start_soon(accept_one)
            raw = await trio.open_tcp_stream("127.0.0.1", port)
            client = FramedStream(raw, Envelope(Keyring([KEY])), TransportStats(), ("x", port))
            await client.send(cbor.dumps([STREAM_VERSION, int(Channel.MEMBERSHIP)]))
            with trio.fail_after(10):
                while stats.tcp_accepted == 0 or not stats.rejected:
                    await trio.sleep(0.01)
            await client.aclose()
    await listener.aclose()
    return stats


async def test_a_peer_that_stalls_past_the_channel_deadline_is_counted_not_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def stalls(stream: FramedStream) -> None:
        with trio.fail_after(0.05):
            await stream.receive()  # the peer never sends its request

    stats = await _serve_one(stalls, caplog)
    assert stats.rejected == {"stream_timeout": 1}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_handler_bug_is_logged_with_its_traceback_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(_stream: FramedStream) -> None:
        raise ValueError("a bug")

    stats = await _serve_one(broken, caplog)
    assert stats.rejected == {"stream_handler_error": 1}
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None


async def test_one_exchange_connections_are_capped_apart_from_persistent_links(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stats = TransportStats()
    server = StreamServer(
        Envelope(Keyring([KEY])), stats, logging.getLogger("test.streams"), max_exchanges=1
    )
    release = trio.Event()
    served: list[str] = []

    async def hold(name: str, stream: FramedStream) -> None:
        served.append(name)
        await release.wait()

    server.register(Channel.MEMBERSHIP, lambda s: hold("exchange", s))
    server.register(Channel.ROUTING, lambda s: hold("link", s), persistent=True)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    clients: list[FramedStream] = []
    async with trio.open_nursery() as nursery:

        async def accept_all() -> None:
            while True:
                raw = await listener.accept()
                nursery.start_soon(server.handle, raw)

        nursery.start_soon(accept_all)
        for channel in (Channel.MEMBERSHIP, Channel.MEMBERSHIP, Channel.ROUTING, Channel.ROUTING):
            raw = await trio.open_tcp_stream("127.0.0.1", port)
            client = FramedStream(raw, Envelope(Keyring([KEY])), TransportStats(), ("x", port))
            await client.send(cbor.dumps([STREAM_VERSION, int(channel)]))
            clients.append(client)
        with trio.fail_after(10):
            while len(served) < 3 or stats.tcp_refused_busy < 1:
                await trio.sleep(0.01)
        # The second exchange was refused; both links were served.
        assert sorted(served) == ["exchange", "link", "link"]
        assert stats.tcp_refused_busy == 1
        release.set()
        for client in clients:
            await client.aclose()
        nursery.cancel_scope.cancel()
    await listener.aclose()


# ---------------------------------------------------------------------------- before a key


class Listening:
    """A StreamServer serving every connection to a loopback listener (real sockets)."""

    def __init__(self, server: StreamServer, nursery: trio.Nursery) -> None:
        self.server = server
        self.nursery = nursery
        self.port = 0
        self.served: list[FramedStream] = []
        self.release = trio.Event()

    async def start(self) -> None:
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        self.port = listener.socket.getsockname()[1]

        async def accept_all() -> None:
            async with listener:
                while True:
                    raw = await listener.accept()
                    self.nursery.start_soon(self.server.handle, raw)

        self.nursery.start_soon(accept_all)

    async def hold(self, stream: FramedStream) -> None:
        self.served.append(stream)
        await self.release.wait()

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", self.port)


def _server(**limits: Any) -> StreamServer:
    return StreamServer(
        Envelope(Keyring([KEY])), TransportStats(), logging.getLogger("test.streams"), **limits
    )


async def _serving(nursery: trio.Nursery, **limits: Any) -> Listening:
    """A server on a loopback port whose ROUTING links are held until ``release``."""
    serving = Listening(_server(**limits), nursery)
    serving.server.register(Channel.ROUTING, serving.hold, persistent=True)
    await serving.start()
    return serving


async def _until(check: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not check():
            await trio.sleep(0.01)


async def _closed_by_server(raw: trio.SocketStream) -> bool:
    """True once the server closed (or reset) the connection."""
    with trio.fail_after(10):
        try:
            return await raw.receive_some(1) == b""
        except trio.BrokenResourceError:
            return True


def _header() -> bytes:
    return FramedStream(
        trio.testing.memory_stream_pair()[0], Envelope(Keyring([KEY])), TransportStats(), ("x", 0)
    ).seal([cbor.dumps([STREAM_VERSION, int(Channel.ROUTING)])])


async def test_a_huge_first_frame_is_refused_before_any_of_it_is_read(
    nursery: trio.Nursery,
) -> None:
    serving = await _serving(nursery)
    raw = await serving.connect()
    # 8 MiB announced, a good part of it sent, no key: the length alone is refused (so the
    # server resets the connection, maybe while this is still sending).
    with contextlib.suppress(trio.BrokenResourceError):
        await raw.send_all(struct.pack(">I", 8 << 20) + b"\x00" * (1 << 20))
    assert await _closed_by_server(raw)
    stats = serving.server.stats
    await _until(lambda: serving.server.unauthenticated == 0)
    assert stats.rejected == {"stream_frame_too_large": 1}
    assert stats.tcp_frames_in == 0
    assert serving.server.preauth_bytes == 0


async def test_the_header_is_read_exactly_and_then_frames_of_any_size_arrive(
    nursery: trio.Nursery,
) -> None:
    serving = await _serving(nursery)
    raw = await serving.connect()
    client = FramedStream(raw, Envelope(Keyring([KEY])), TransportStats(), ("x", serving.port))
    sizes = [10, 3 << 20, 5, 300 << 10, 1, 1 << 20]
    payloads = [bytes([i]) * size for i, size in enumerate(sizes)]
    # The header and every frame after it in one write: the server must not have read past
    # the header before it opened (it reads exactly what the header announced).
    await raw.send_all(_header() + client.seal(payloads[:1]))
    await _until(lambda: len(serving.served) == 1)
    (stream,) = serving.served
    assert stream.authenticated
    assert stream.buffered == 0
    assert await stream.receive() == payloads[0]
    nursery.start_soon(client.send_many, payloads[1:])
    for payload in payloads[1:]:
        assert await stream.receive() == payload
    assert serving.server.unauthenticated == 0
    serving.release.set()
    await client.aclose()


async def test_unauthenticated_connections_are_capped_and_the_excess_refused_at_once(
    nursery: trio.Nursery,
) -> None:
    serving = await _serving(nursery, max_unauthenticated=2)
    silent = [await serving.connect(), await serving.connect()]
    await _until(lambda: serving.server.unauthenticated == 2)
    refused = await serving.connect()
    assert await _closed_by_server(refused)
    stats = serving.server.stats
    assert stats.tcp_refused_busy == 1
    assert stats.rejected == {"stream_unauthenticated_busy": 1}
    # A connection that authenticates makes room for the next one.
    await silent[0].send_all(_header())
    await _until(lambda: len(serving.served) == 1 and serving.server.unauthenticated == 1)
    late = await serving.connect()
    await late.send_all(_header())
    await _until(lambda: len(serving.served) == 2)
    assert stats.tcp_refused_busy == 1
    serving.release.set()
    for raw in [*silent, refused, late]:
        await raw.aclose()


async def test_bytes_announced_before_a_key_share_one_budget(nursery: trio.Nursery) -> None:
    serving = await _serving(nursery, max_preauth_bytes=300)
    first = await serving.connect()
    await first.send_all(struct.pack(">I", 200) + b"\x00" * 50)  # 204 bytes held, waiting
    await _until(lambda: serving.server.preauth_bytes == 204)
    second = await serving.connect()
    await second.send_all(struct.pack(">I", 200))  # would make 408: refused
    assert await _closed_by_server(second)
    stats = serving.server.stats
    assert stats.rejected == {"stream_preauth_budget": 1}
    assert stats.tcp_refused_busy == 1
    await first.aclose()
    await _until(lambda: serving.server.preauth_bytes == 0 and serving.server.unauthenticated == 0)


async def test_a_silent_connection_is_closed_after_the_header_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    serving = await _serving(nursery, header_timeout=3.0)
    raw = await serving.connect()
    await raw.send_all(b"\x00\x00")  # half a length, then nothing
    assert await _closed_by_server(raw)
    assert serving.server.stats.rejected == {"stream_header_timeout": 1}
    assert serving.server.unauthenticated == 0


async def test_a_connection_reset_by_its_peer_is_counted(nursery: trio.Nursery) -> None:
    serving = await _serving(nursery)
    raw = await serving.connect()
    await raw.send_all(_header())
    await _until(lambda: len(serving.served) == 1)
    (stream,) = serving.served
    await FramedStream(raw, Envelope(Keyring([KEY])), TransportStats(), ("x", 0)).abort()
    with pytest.raises(StreamError, match="closed"):
        await stream.receive()
    assert serving.server.stats.tcp_resets == 1
    serving.release.set()
