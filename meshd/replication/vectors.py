"""Yjs/Yrs state vectors (lib0 v1 encoding): ``varuint n``, then n pairs ``client, clock``.

Decoding them lets a node tell, without touching the document, whether a peer has something
it lacks (some client's clock is higher there) — the question anti-entropy asks per document.
"""

from __future__ import annotations

from typing import Final

MAX_CLIENTS: Final = 1 << 16


class VectorError(ValueError):
    pass


def _varuint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if pos >= len(data):
            raise VectorError("truncated state vector")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise VectorError("varuint too long")


def decode(data: bytes) -> dict[int, int]:
    count, pos = _varuint(data, 0)
    if count > MAX_CLIENTS:
        raise VectorError("too many clients in state vector")
    vector: dict[int, int] = {}
    for _ in range(count):
        client, pos = _varuint(data, pos)
        clock, pos = _varuint(data, pos)
        vector[client] = clock
    if pos != len(data):
        raise VectorError("trailing bytes after state vector")
    return vector


def encode(vector: dict[int, int]) -> bytes:
    """The canonical encoding of ``vector``: clients in ascending order, zero clocks left out.

    Yrs writes clients in hash-map order, which depends on the order updates arrived, so two
    replicas holding the same operations can encode their vectors differently; peers compare
    these bytes (digests hash them, compaction's agreement check compares them)."""
    out = bytearray()
    items = sorted((client, clock) for client, clock in vector.items() if clock > 0)
    for number in (len(items), *(v for pair in items for v in pair)):
        rest = number
        while rest > 0x7F:
            out.append((rest & 0x7F) | 0x80)
            rest >>= 7
        out.append(rest)
    return bytes(out)


def has_news(mine: dict[int, int], theirs: dict[int, int]) -> bool:
    """True if ``mine`` has operations ``theirs`` lacks."""
    return any(clock > theirs.get(client, 0) for client, clock in mine.items())
