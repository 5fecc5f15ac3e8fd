"""The API outbox on a real socket pair: order, corking, a full socket, bounds, failure."""

from __future__ import annotations

import socket

import trio

from meshd.api.outbox import CORK_FRAMES, OUTGOING_BYTES, OUTGOING_FRAMES, Outbox


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return b"".join(chunks)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


async def test_a_frame_is_written_at_once_when_nothing_is_queued() -> None:
    a, b = _pair()
    out = Outbox(a)
    out.push(b"one")
    assert _read_all(b) == b"one"
    assert not out.frames and out.bytes == 0


async def test_corked_frames_leave_together_in_order_when_uncorked() -> None:
    a, b = _pair()
    out = Outbox(a)
    out.corked = True
    for i in range(5):
        out.push(b"%d," % i)
    assert _read_all(b) == b""
    assert out.bytes == 10
    out.uncork()
    assert _read_all(b) == b"0,1,2,3,4,"


async def test_a_cork_holds_at_most_cork_frames() -> None:
    a, b = _pair()
    out = Outbox(a)
    out.corked = True
    for _ in range(CORK_FRAMES):
        out.push(b"x")
    assert len(_read_all(b)) == CORK_FRAMES  # the last push wrote them all


async def test_a_full_socket_leaves_the_rest_to_the_writer_in_order() -> None:
    a, b = _pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    out = Outbox(a)
    payload = [bytes([i % 251]) * 50_000 for i in range(8)]
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(out.writer)
        for p in payload:
            out.push(p)
        assert out.blocked and out.bytes > 0
        with trio.fail_after(10):
            while len(received) < sum(map(len, payload)):
                received += _read_all(b)
                await trio.sleep(0.001)
            await out.drain()
        nursery.cancel_scope.cancel()
    assert bytes(received) == b"".join(payload)
    assert not out.blocked and out.bytes == 0


async def test_backlogged_past_the_frame_or_byte_bound() -> None:
    a, _b = _pair()
    out = Outbox(a)
    out.blocked = True  # as if the socket were full: everything queues
    for _ in range(OUTGOING_FRAMES - 1):
        out.push(b"x")
    assert not out.backlogged()
    out.push(b"x")
    assert out.backlogged()
    big = Outbox(a)
    big.blocked = True
    big.push(b"y" * OUTGOING_BYTES)
    assert big.backlogged()
    assert big.over_hard_limit((12 << 20) + 1)
    assert not big.over_hard_limit(12 << 20)
    assert not Outbox(a).over_hard_limit(1024)


async def test_a_failed_socket_drops_what_is_queued_and_wakes_waiters() -> None:
    a, b = _pair()
    out = Outbox(a)
    out.corked = True
    out.push(b"lost")
    b.close()
    out.uncork()  # the write fails: the peer is gone
    assert out.broken and not out.frames and out.bytes == 0
    with trio.fail_after(1):
        await out.wait_room()  # already set: does not wait
        await out.drain()
    out.push(b"more")
    assert out.bytes == 4 and out.frames  # queued, but a broken outbox never writes
    out.flush()
    assert out.frames
