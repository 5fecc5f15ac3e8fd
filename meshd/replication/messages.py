"""Replication messages on the REPLICATION channel (CBOR arrays, type code first).

Fast path:   PUSH (a delta, optionally asking for an ACK) and ACK.
Repair:      DIGEST → BUCKETS → SYNC → UPDATES (one anti-entropy round).
Agreement:   QUERY → VECTORS (state vectors of named documents; compaction checks them).
Framing:     CHUNK carries a slice of an encoded message too large for one frame.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from meshd.wire.validate import WireError, expect_bool, expect_bytes, expect_list, expect_uint
from meshd_client.protocol import cbor

MAX_DOC_NAME: Final = 256
MAX_UPDATE: Final = 128 << 20  # one document's update after reassembly
MAX_VECTOR: Final = 1 << 20
MAX_DOCS_PER_MESSAGE: Final = 100_000
DIGEST_BUCKETS: Final = 256
DIGEST_SIZE: Final = DIGEST_BUCKETS * 8
MAX_HOPS: Final = 16


class Kind(enum.IntEnum):
    PUSH = 1
    ACK = 2
    DIGEST = 3
    BUCKETS = 4
    SYNC = 5
    UPDATES = 6
    CHUNK = 7
    QUERY = 8
    VECTORS = 9


@dataclass(frozen=True, slots=True)
class DocVector:
    doc: str
    epoch: int
    sv: bytes

    def to_wire(self) -> list[Any]:
        return [self.doc, self.epoch, self.sv]


@dataclass(frozen=True, slots=True)
class DocUpdate:
    doc: str
    epoch: int
    update: bytes

    def to_wire(self) -> list[Any]:
        return [self.doc, self.epoch, self.update]


@dataclass(frozen=True, slots=True)
class Push:
    """A delta of ``doc``. ``ack`` non-zero asks the receiver to confirm it holds the update;
    ``hops`` bounds how far receivers forward it (rumor mongering)."""

    doc: str
    epoch: int
    update: bytes
    ack: int = 0
    hops: int = 0

    def to_wire(self) -> list[Any]:
        return [Kind.PUSH, self.doc, self.epoch, self.update, self.ack, self.hops]


@dataclass(frozen=True, slots=True)
class Ack:
    """Answer to a PUSH that asked for one; ``sv`` is the receiver's state vector after
    applying, so the writer can check the receiver really holds the write (and repair)."""

    ack: int
    ok: bool
    sv: bytes = b""

    def to_wire(self) -> list[Any]:
        return [Kind.ACK, self.ack, self.ok, self.sv]


@dataclass(frozen=True, slots=True)
class Digest:
    """One 64-bit hash per bucket of documents (XOR of each document's name/epoch/vector
    hash): equal buckets need no further talk."""

    round: int
    buckets: bytes

    def to_wire(self) -> list[Any]:
        return [Kind.DIGEST, self.round, self.buckets]


@dataclass(frozen=True, slots=True)
class Buckets:
    """The responder's state vectors for every document in the buckets that differ."""

    round: int
    docs: tuple[DocVector, ...]
    buckets: tuple[int, ...] = field(default=())

    def to_wire(self) -> list[Any]:
        return [Kind.BUCKETS, self.round, [d.to_wire() for d in self.docs], list(self.buckets)]


@dataclass(frozen=True, slots=True)
class Sync:
    """What the responder lacks (updates), and what the initiator wants (its vectors)."""

    round: int
    updates: tuple[DocUpdate, ...]
    want: tuple[DocVector, ...]

    def to_wire(self) -> list[Any]:
        return [
            Kind.SYNC,
            self.round,
            [u.to_wire() for u in self.updates],
            [w.to_wire() for w in self.want],
        ]


@dataclass(frozen=True, slots=True)
class Updates:
    round: int
    updates: tuple[DocUpdate, ...]

    def to_wire(self) -> list[Any]:
        return [Kind.UPDATES, self.round, [u.to_wire() for u in self.updates]]


@dataclass(frozen=True, slots=True)
class Chunk:
    transfer: int
    index: int
    total: int
    data: bytes

    def to_wire(self) -> list[Any]:
        return [Kind.CHUNK, self.transfer, self.index, self.total, self.data]


@dataclass(frozen=True, slots=True)
class Query:
    """Ask a peer for its state vectors of some documents (compaction's agreement check)."""

    query: int
    docs: tuple[str, ...]

    def to_wire(self) -> list[Any]:
        return [Kind.QUERY, self.query, list(self.docs)]


@dataclass(frozen=True, slots=True)
class Vectors:
    query: int
    docs: tuple[DocVector, ...]

    def to_wire(self) -> list[Any]:
        return [Kind.VECTORS, self.query, [d.to_wire() for d in self.docs]]


Message = Push | Ack | Digest | Buckets | Sync | Updates | Chunk | Query | Vectors


def encode(msg: Message) -> bytes:
    return cbor.dumps(msg.to_wire())


def _doc_name(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_DOC_NAME:
        raise WireError("doc: expected a name of 1..256 characters")
    if not value.isprintable():
        raise WireError("doc: not printable")
    return value


def _vector(value: Any) -> DocVector:
    v = expect_list(value, 3, 3, "doc vector")
    return DocVector(
        _doc_name(v[0]), expect_uint(v[1], "epoch"), expect_bytes(v[2], "sv", MAX_VECTOR)
    )


def _update(value: Any) -> DocUpdate:
    v = expect_list(value, 3, 3, "doc update")
    return DocUpdate(
        _doc_name(v[0]), expect_uint(v[1], "epoch"), expect_bytes(v[2], "update", MAX_UPDATE)
    )


def _push(v: list[Any]) -> Message:
    expect_list(v, 6, 6, "push")
    return Push(
        _doc_name(v[1]),
        expect_uint(v[2], "epoch"),
        expect_bytes(v[3], "update", MAX_UPDATE),
        expect_uint(v[4], "ack"),
        expect_uint(v[5], "hops", MAX_HOPS),
    )


def _ack(v: list[Any]) -> Message:
    expect_list(v, 4, 4, "ack")
    return Ack(
        expect_uint(v[1], "ack"), expect_bool(v[2], "ok"), expect_bytes(v[3], "sv", MAX_VECTOR)
    )


def _digest(v: list[Any]) -> Message:
    expect_list(v, 3, 3, "digest")
    buckets = expect_bytes(v[2], "buckets", DIGEST_SIZE)
    if len(buckets) != DIGEST_SIZE:
        raise WireError("digest: wrong size")
    return Digest(expect_uint(v[1], "round"), buckets)


def _buckets(v: list[Any]) -> Message:
    expect_list(v, 4, 4, "buckets")
    docs = expect_list(v[2], 0, MAX_DOCS_PER_MESSAGE, "buckets.docs")
    indexes = expect_list(v[3], 0, DIGEST_BUCKETS, "buckets.indexes")
    return Buckets(
        expect_uint(v[1], "round"),
        tuple(_vector(d) for d in docs),
        tuple(expect_uint(i, "bucket", DIGEST_BUCKETS - 1) for i in indexes),
    )


def _sync(v: list[Any]) -> Message:
    expect_list(v, 4, 4, "sync")
    updates = expect_list(v[2], 0, MAX_DOCS_PER_MESSAGE, "sync.updates")
    want = expect_list(v[3], 0, MAX_DOCS_PER_MESSAGE, "sync.want")
    return Sync(
        expect_uint(v[1], "round"),
        tuple(_update(u) for u in updates),
        tuple(_vector(w) for w in want),
    )


def _updates(v: list[Any]) -> Message:
    expect_list(v, 3, 3, "updates")
    updates = expect_list(v[2], 0, MAX_DOCS_PER_MESSAGE, "updates.updates")
    return Updates(expect_uint(v[1], "round"), tuple(_update(u) for u in updates))


def _chunk(v: list[Any]) -> Message:
    expect_list(v, 5, 5, "chunk")
    total = expect_uint(v[3], "total", 1 << 16)
    index = expect_uint(v[2], "index", 1 << 16)
    if not total > 0 or index >= total:
        raise WireError("chunk: bad index")
    return Chunk(
        expect_uint(v[1], "transfer"), index, total, expect_bytes(v[4], "data", MAX_UPDATE)
    )


def _query(v: list[Any]) -> Message:
    expect_list(v, 3, 3, "query")
    docs = expect_list(v[2], 0, 1024, "query.docs")
    return Query(expect_uint(v[1], "query"), tuple(_doc_name(d) for d in docs))


def _vectors(v: list[Any]) -> Message:
    expect_list(v, 3, 3, "vectors")
    docs = expect_list(v[2], 0, 1024, "vectors.docs")
    return Vectors(expect_uint(v[1], "query"), tuple(_vector(d) for d in docs))


_DECODERS: Final[dict[int, Callable[[list[Any]], Message]]] = {
    Kind.PUSH: _push,
    Kind.ACK: _ack,
    Kind.DIGEST: _digest,
    Kind.BUCKETS: _buckets,
    Kind.SYNC: _sync,
    Kind.UPDATES: _updates,
    Kind.CHUNK: _chunk,
    Kind.QUERY: _query,
    Kind.VECTORS: _vectors,
}


def decode(data: bytes) -> Message:
    try:
        value = cbor.loads(data)
    except cbor.CodecError as exc:
        raise WireError(str(exc)) from None
    if type(value) is not list or not value or type(value[0]) is not int:
        raise WireError("replication message: expected an array starting with a type code")
    decoder = _DECODERS.get(value[0])
    if decoder is None:
        raise WireError(f"replication message: unknown type {value[0]}")
    return decoder(value)


def split(payload: bytes, transfer: int, max_frame: int) -> list[bytes]:
    """Encode ``payload`` (an encoded message) as CHUNK messages of at most ``max_frame``."""
    size = max(1024, max_frame - 64)
    parts = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
    return [encode(Chunk(transfer, i, len(parts), p)) for i, p in enumerate(parts)]


class Reassembler:
    """Collects CHUNK messages into whole messages, with bounded memory per peer."""

    def __init__(self, max_bytes: int = MAX_UPDATE, max_transfers: int = 4) -> None:
        self.max_bytes = max_bytes
        self.max_transfers = max_transfers
        self._parts: dict[int, list[bytes | None]] = {}
        self._sizes: dict[int, int] = {}
        self._received: dict[int, int] = {}
        self.evicted = 0

    def add(self, chunk: Chunk) -> bytes | None:
        """Returns the whole payload once its last chunk arrived; raises WireError on abuse."""
        parts = self._parts.get(chunk.transfer)
        if parts is None:
            if len(self._parts) >= self.max_transfers:
                # A peer's transfers arrive in order on one link, so the oldest unfinished one
                # was abandoned (a chunk dropped from a full queue): make room, not refuse.
                self.drop(next(iter(self._parts)))
                self.evicted += 1
            parts = [None] * chunk.total
            self._parts[chunk.transfer] = parts
            self._sizes[chunk.transfer] = 0
            self._received[chunk.transfer] = 0
        if len(parts) != chunk.total or parts[chunk.index] is not None:
            self.drop(chunk.transfer)
            raise WireError("inconsistent chunk")
        self._sizes[chunk.transfer] += len(chunk.data)
        if self._sizes[chunk.transfer] > self.max_bytes:
            self.drop(chunk.transfer)
            raise WireError("chunked message too large")
        parts[chunk.index] = chunk.data
        self._received[chunk.transfer] += 1
        if self._received[chunk.transfer] < chunk.total:
            return None
        self.drop(chunk.transfer)
        return b"".join(p for p in parts if p is not None)

    def drop(self, transfer: int) -> None:
        self._parts.pop(transfer, None)
        self._sizes.pop(transfer, None)
        self._received.pop(transfer, None)
