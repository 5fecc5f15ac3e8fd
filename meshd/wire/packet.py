"""Compound UDP packets: ``[version, msg, msg, ...]`` where each msg is an encoded message.

Messages travel as CBOR byte strings holding their own encoding. A sender appends pre-encoded
gossip until the packet is full without re-encoding anything; a receiver gets every message's
exact bytes from one decoding call, so it can drop gossip it has already seen before paying
for validation.
"""

from __future__ import annotations

from typing import Final

from meshd.wire.membership import Message, from_wire
from meshd.wire.validate import WireError
from meshd_client.protocol import cbor

PROTOCOL_VERSION: Final = 1
MAX_MESSAGES: Final = 255
# Array header (up to 256 items with the version: 3 bytes) plus the version (1 byte).
PACKET_OVERHEAD: Final = 4
# Byte-string header of one message (messages are shorter than 65,536 bytes: at most 3).
ITEM_OVERHEAD: Final = 3


def build(parts: list[bytes]) -> bytes:
    """A packet from pre-encoded messages."""
    return cbor.dumps([PROTOCOL_VERSION, *parts])


def size(parts: list[bytes]) -> int:
    """An upper bound of :func:`build`'s output length."""
    return PACKET_OVERHEAD + sum(len(p) + ITEM_OVERHEAD for p in parts)


def split(data: bytes) -> list[bytes]:
    """Check the envelope of a packet and return each message's bytes, not yet validated."""
    try:
        value = cbor.loads(data)
    except cbor.CodecError as exc:
        raise WireError(str(exc)) from None
    if type(value) is not list or len(value) < 2 or len(value) > MAX_MESSAGES + 1:
        raise WireError("packet: expected [version, message, ...]")
    version = value[0]
    if type(version) is not int:
        raise WireError("packet: missing version")
    if version != PROTOCOL_VERSION:
        raise WireError(f"packet: unsupported protocol version {version}")
    parts = value[1:]
    for part in parts:
        if type(part) is not bytes:
            raise WireError("packet: messages must be byte strings")
    return parts


def decode_part(part: bytes) -> Message:
    try:
        return from_wire(cbor.loads(part))
    except cbor.CodecError as exc:
        raise WireError(str(exc)) from None


def parse(data: bytes) -> list[Message]:
    """Decode and validate every message; any bad message rejects the whole packet."""
    return [decode_part(part) for part in split(data)]
