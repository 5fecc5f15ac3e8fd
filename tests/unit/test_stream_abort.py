"""Giving up on a peer resets its connection: bytes still in the kernel's send buffer are
discarded, not delivered once a partition heals (real loopback sockets)."""

from __future__ import annotations

import os

import pytest
import trio

from meshd.security.envelope import Envelope
from meshd.security.keyring import Keyring
from meshd.transport.stats import TransportStats
from meshd.transport.streams import FramedStream

CHUNK = b"x" * 4096


async def _fill_then_close(abort: bool) -> tuple[int, int]:
    """Write into a peer that does not read until the kernel buffers are full, close (or
    abort), then let the peer read everything it can; returns the bytes written completely
    and the bytes the peer got."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    accepted: list[trio.SocketStream] = []
    async with trio.open_nursery() as nursery:

        async def accept() -> None:
            accepted.append(await listener.accept())  # type: ignore[arg-type]

        nursery.start_soon(accept)
        client = await trio.open_tcp_stream("127.0.0.1", port)
        stream = FramedStream(
            client, Envelope(Keyring([os.urandom(32)])), TransportStats(), ("127.0.0.1", port)
        )
        written = 0
        with trio.move_on_after(1.0):  # until the buffers are full and send_all blocks
            while written < 1 << 30:
                await client.send_all(CHUNK)
                written += len(CHUNK)
        assert written < 1 << 30, "the kernel buffered everything: nothing to test"
        await (stream.abort() if abort else stream.aclose())
    server = accepted[0]
    got = 0
    try:
        with trio.fail_after(10):
            while chunk := await server.receive_some(1 << 20):
                got += len(chunk)
    except trio.BrokenResourceError:
        pass  # the reset
    finally:
        await server.aclose()
        await listener.aclose()
    return written, got


@pytest.mark.parametrize("abort", [False, True])
async def test_abort_discards_unsent_bytes_a_close_delivers_them(abort: bool) -> None:
    written, got = await _fill_then_close(abort)
    if abort:
        assert got < written  # what still sat in our send buffer never arrives...
    else:
        assert got >= written  # ...while a graceful close delivers the whole backlog
