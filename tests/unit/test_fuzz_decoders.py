"""Every decoder that takes bytes from outside the process, fuzzed: each input is either
accepted or refused with the module's own typed error — nothing raises anything else — and
nothing holds more memory than its bound.

The decoders fuzzed elsewhere are not repeated here: UDP packets and gossip messages
(tests/unit/test_wire_membership.py), replication messages (test_replication_messages.py),
routing messages (test_routing_pure.py), API framing (test_api_protocol.py), CBOR itself
(test_cbor_safe.py) and every API op's arguments on a real daemon
(tests/e2e/test_hostile_api_e2e.py). This file adds the envelope, the TCP stream header and
frames (through the real StreamServer on real sockets), chunk reassembly, API client frames
and the storage records. Examples are derandomized, so every run tries the same inputs.
"""

from __future__ import annotations

import logging
import struct
import typing
import zlib
from typing import Any

import cbor2
import trio
import trio.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from meshd.replication.messages import Chunk, Reassembler
from meshd.security.envelope import Envelope, SealError, SealErrorReason
from meshd.security.keyring import Keyring
from meshd.storage import records
from meshd.transport.stats import TransportStats
from meshd.transport.streams import (
    HEADER_MAX_FRAME,
    STREAM_VERSION,
    Channel,
    FramedStream,
    StreamError,
    StreamServer,
)
from meshd.wire.validate import WireError
from meshd_client.protocol import cbor, messages
from meshd_client.protocol.errors import MeshError
from meshd_client.protocol.framing import HEADER, FrameDecoder, FrameError

FUZZ = settings(
    max_examples=examples(200),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
KEY = bytes(range(32))
SECURE = Envelope(Keyring([KEY]), label="fuzz")
PLAIN = Envelope(None, label="fuzz")

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=16)
    | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=16,
)


def mutate(data: bytes, edits: list[tuple[int, int, str]]) -> bytes:
    """``data`` with bytes flipped, deleted or inserted at the given positions."""
    out = bytearray(data)
    for position, byte, action in edits:
        if not out:
            out.append(byte)
            continue
        at = position % len(out)
        if action == "flip":
            out[at] ^= byte or 1
        elif action == "delete":
            del out[at]
        else:
            out.insert(at, byte)
    return bytes(out)


edit_lists = st.lists(
    st.tuples(
        st.integers(0, 1 << 16), st.integers(0, 255), st.sampled_from(["flip", "delete", "insert"])
    ),
    min_size=1,
    max_size=4,
)


# ---------------------------------------------------------------------------- the envelope


@FUZZ
@given(st.binary(max_size=300))
@example(b"")
@example(b"\x01" + b"\x00" * 32)
@example(b"\x00\x04fuzz")
@example(b"\x00\xff")
def test_envelope_opens_or_raises_seal_error(data: bytes) -> None:
    for envelope in (SECURE, PLAIN):
        try:
            envelope.open(data)
            envelope.open(bytearray(data))
        except SealError:
            pass


@FUZZ
@given(st.binary(max_size=200), edit_lists)
def test_a_tampered_envelope_never_opens_to_other_bytes(payload: bytes, edits: Any) -> None:
    sealed = SECURE.seal(payload)
    tampered = mutate(sealed, edits)
    try:
        opened = SECURE.open(tampered)
    except SealError:
        return
    # Only an untouched envelope opens (an edit may undo another), and to the payload.
    assert tampered == sealed and opened == payload


# ---------------------------------------------------------------------------- TCP streams


def _header(envelope: Envelope = SECURE) -> bytes:
    sealed = envelope.seal(cbor.dumps([STREAM_VERSION, int(Channel.ROUTING)]))
    return struct.pack(">I", len(sealed)) + sealed


SEAL_REASONS = typing.get_args(SealErrorReason)
# What a connection may be counted under (``stream_*`` by the server, ``link_*`` by the test
# handler below): never ``stream_handler_error``, the mark of an unexpected exception.
KNOWN_REASONS = {
    *(
        f"{layer}_{reason}"
        for layer in ("stream", "link")
        for reason in ("frame_too_large", "closed", *SEAL_REASONS)
    ),
    "stream_header_timeout",
    "stream_bad_header",
    "stream_unknown_channel",
    "stream_preauth_budget",
}


def serve_bytes(data: bytes, *, authenticated_prefix: bool) -> tuple[TransportStats, list[bytes]]:
    """Run the real StreamServer on one side of a socket pair whose other side sends ``data``
    (after a valid header when ``authenticated_prefix``) and closes; the frames the channel
    handler received, and the server's counters."""
    stats = TransportStats()
    received: list[bytes] = []

    async def handler(stream: FramedStream) -> None:
        while True:
            try:
                received.append(await stream.receive())
            except StreamError as exc:
                stats.reject(f"link_{exc.reason}")
                return
            assert stream.buffered <= (256 << 10)

    async def main() -> None:
        server = StreamServer(SECURE, stats, logging.getLogger("test.fuzz"), header_timeout=5)
        server.register(Channel.ROUTING, handler, persistent=True)
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listener.socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            theirs = await trio.open_tcp_stream("127.0.0.1", port)
            nursery.start_soon(server.handle, await listener.accept())
            prefix = _header() if authenticated_prefix else b""
            try:
                await theirs.send_all(prefix + data)
                await theirs.send_eof()
            except trio.BrokenResourceError:
                pass  # the server refused and reset the connection first
        await theirs.aclose()
        await listener.aclose()
        assert server.unauthenticated == 0 and server.preauth_bytes == 0

    trio.run(main)
    return stats, received


@FUZZ
@given(st.binary(max_size=400))
@example(struct.pack(">I", 8 << 20) + b"\x00" * 100)
@example(struct.pack(">I", HEADER_MAX_FRAME + 1))
@example(struct.pack(">I", 0))
@example(_header(PLAIN))
@example(_header()[:-1])
def test_a_stream_header_is_accepted_or_counted_under_a_known_reason(data: bytes) -> None:
    stats, received = serve_bytes(data, authenticated_prefix=False)
    assert set(stats.rejected) <= KNOWN_REASONS, stats.rejected
    assert stats.tcp_frames_in <= 1 + len(received)


@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=5), st.binary(max_size=64))
def test_frames_after_the_header_arrive_intact_or_end_the_stream(
    payloads: list[bytes], tail: bytes
) -> None:
    frames = b"".join(
        struct.pack(">I", len(sealed)) + sealed for sealed in map(SECURE.seal, payloads)
    )
    stats, received = serve_bytes(frames + tail, authenticated_prefix=True)
    assert received[: len(payloads)] == payloads
    assert set(stats.rejected) <= KNOWN_REASONS, stats.rejected


@FUZZ
@given(st.binary(max_size=600), st.integers(1, 64))
def test_a_framed_stream_reads_only_stream_errors(data: bytes, piece: int) -> None:
    """FramedStream on a stream that is not a socket (the other read path)."""

    async def main() -> None:
        left, right = trio.testing.memory_stream_pair()
        stream = FramedStream(
            left, SECURE, TransportStats(), ("x", 0), first_frame_max=HEADER_MAX_FRAME
        )
        for start in range(0, len(data), piece):
            await right.send_all(data[start : start + piece])
        await right.aclose()
        while True:
            try:
                await stream.receive()
            except StreamError:
                return
            assert stream.buffered <= (256 << 10)

    trio.run(main)


# ---------------------------------------------------------------------------- chunk reassembly


chunks = st.builds(
    Chunk,
    transfer=st.integers(0, 8),
    index=st.integers(0, 5),
    total=st.integers(1, 6),
    data=st.binary(max_size=40),
)


@FUZZ
@given(st.lists(chunks, max_size=40))
def test_reassembly_holds_bounded_bytes_and_raises_only_wire_errors(
    sequence: list[Chunk],
) -> None:
    assembler = Reassembler(max_bytes=100, max_transfers=3)
    for chunk in sequence:
        if chunk.index >= chunk.total:
            continue  # refused by the decoder before it gets here
        try:
            whole = assembler.add(chunk)
        except WireError:
            continue
        if whole is not None:
            assert len(whole) <= 100
        held = assembler._parts
        assert len(held) <= 3
        assert all(size <= 100 for size in assembler._sizes.values())


# ---------------------------------------------------------------------------- API frames


frame_maps = st.dictionaries(
    st.sampled_from(["t", "id", "op", "args", "versions", "client", "x"]),
    values
    | st.sampled_from(["req", "cancel", "note", "hello", "res"])
    | st.integers(min_value=-(2**64), max_value=2**64),
    max_size=5,
)


@FUZZ
@given(frame_maps)
@example({"t": "req", "id": 2**64 - 1, "op": "info"})
@example({"t": "req", "id": -1, "op": "info"})
@example({"t": "hello", "versions": [1] * 17})
def test_client_frames_parse_or_raise_invalid_and_bad_ids_are_never_echoed(
    frame: dict[str, Any],
) -> None:
    try:
        parsed = messages.parse_client_frame(frame)
    except MeshError as exc:
        assert exc.kind.value == "invalid"
        rid = messages.usable_id(frame)
        assert rid is None or 0 <= rid <= messages.MAX_REQUEST_ID
        return
    assert isinstance(parsed, messages.Hello | messages.Request | messages.Cancel | messages.Note)


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=8), st.integers(8, 512))
@example([HEADER.pack(100) + b"\xa0" * 50, b"\xa0" * 50], 100)
def test_the_api_decoder_holds_at_most_one_partial_frame(
    pieces: list[bytes], max_frame: int
) -> None:
    decoder = FrameDecoder(max_frame)
    for piece in pieces:
        try:
            decoder.feed(piece)
            while decoder.next_frame() is not None:
                pass
        except FrameError:
            return
        # What stays buffered is one frame that has not arrived whole, within the limit.
        head = decoder.head_size
        if head is None:
            assert decoder.buffered < HEADER.size
        else:
            assert head <= max_frame
            assert decoder.buffered < HEADER.size + head


# ---------------------------------------------------------------------------- storage records


def _records_file(items: list[tuple[str, int, bytes]]) -> bytes:
    return b"".join(records.encode_update(doc, epoch, update) for doc, epoch, update in items)


record_items = st.lists(
    st.tuples(st.text(min_size=1, max_size=10), st.integers(0, 2**32), st.binary(max_size=40)),
    max_size=6,
)


@FUZZ
@given(st.binary(max_size=400))
@example(b"\xff" * 8)
@example(struct.pack(">II", 3, zlib.crc32(b"\x81\x01")) + b"\x81\x01")
def test_scanning_arbitrary_bytes_never_raises(data: bytes) -> None:
    scan = records.scan(data)
    assert scan.end <= len(data)
    assert len(scan.records) == len(scan.ends)
    assert (scan.problem is None) == (scan.end == len(data))


@FUZZ
@given(record_items, edit_lists)
def test_a_damaged_log_yields_a_prefix_of_what_was_written(
    items: list[tuple[str, int, bytes]], edits: Any
) -> None:
    data = _records_file(items)
    written = records.scan(data)
    assert written.problem is None and len(written.records) == len(items)
    # The scan stops at the first damaged record: what it returns was written, in order.
    scan = records.scan(mutate(data, edits))
    assert scan.records == written.records[: len(scan.records)]


@FUZZ
@given(values)
def test_any_cbor_value_as_a_record_payload_is_refused_with_record_error(value: Any) -> None:
    try:
        payload = cbor2.dumps(value)
    except (ValueError, TypeError, OverflowError):
        return
    try:
        records.decode_payload(payload)
    except records.RecordError:
        pass
