"""The stream server survives whatever a handler meets, and counts it under a reason that
says what happened (real loopback sockets)."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable

import pytest
import trio

from meshd.security.envelope import Envelope
from meshd.security.keyring import Keyring
from meshd.transport.stats import TransportStats
from meshd.transport.streams import STREAM_VERSION, Channel, FramedStream, StreamServer
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
