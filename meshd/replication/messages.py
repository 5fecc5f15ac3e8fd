"""Replication messages on the REPLICATION channel (CBOR arrays, type code first).

Fast path:   PUSH (a delta, optionally asking for an ACK) and ACK.
Repair:      TREE → NODES (repeated, descending the digest tree where it differs), then
             LIST → PAGE → SYNC → UPDATES per page of the ranges that differ (one round).
Agreement:   QUERY → VECTORS (state vectors of named documents; compaction checks them).
Framing:     CHUNK carries a slice of an encoded message too large for one frame.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from meshd.replication.tree import FANOUT, LEAF_LEVEL, LEAVES
from meshd.wire.validate import WireError, expect_bool, expect_bytes, expect_list, expect_uint
from meshd_client.protocol import cbor

MAX_DOC_NAME: Final = 256
MAX_UPDATE: Final = 128 << 20  # one document's update after reassembly
MAX_VECTOR: Final = 1 << 20
# Documents (vectors or updates) one message may carry; the default bound of the decoder.
# Senders page well below it (``ReplicationTuning.page_docs``), so it is never what stops a
# repair: it only protects the receiver.
MAX_DOCS_PER_MESSAGE: Final = 100_000
MAX_NODES_PER_MESSAGE: Final = 4096  # digest-tree nodes in one TREE or NODES message
MAX_RANGES_PER_MESSAGE: Final = 4096  # ranges one LIST names
MAX_HOPS: Final = 16
# The replication protocol's version (docs/protocol.md). 2: the digest tree and pages
# replaced the 256-bucket DIGEST (3) and BUCKETS (4) of version 1.
PROTOCOL_VERSION: Final = 2


class Kind(enum.IntEnum):
    PUSH = 1
    ACK = 2
    # 3 (DIGEST) and 4 (BUCKETS) were version 1's round; they are not decoded any more.
    SYNC = 5
    UPDATES = 6
    CHUNK = 7
    QUERY = 8
    VECTORS = 9
    TREE = 10
    NODES = 11
    LIST = 12
    PAGE = 13


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
class TreeNode:
    """One node of the digest tree (:mod:`meshd.replication.tree`) as its sender holds it."""

    level: int
    index: int
    hash: int
    count: int

    def to_wire(self) -> list[Any]:
        return [self.level, self.index, self.hash, self.count]


@dataclass(frozen=True, slots=True)
class Tree:
    """The initiator's hash and count of some digest-tree nodes (a round starts with the 16
    level-1 nodes)."""

    round: int
    nodes: tuple[TreeNode, ...]

    def to_wire(self) -> list[Any]:
        return [Kind.TREE, self.round, [n.to_wire() for n in self.nodes]]


@dataclass(frozen=True, slots=True)
class Nodes:
    """The responder's hash and count of those nodes of a TREE that differ (none: the
    subtrees agree)."""

    round: int
    nodes: tuple[TreeNode, ...]

    def to_wire(self) -> list[Any]:
        return [Kind.NODES, self.round, [n.to_wire() for n in self.nodes]]


Cursor = tuple[int, str]  # a document key (leaf, name): listing resumes after it


def _cursor_wire(cursor: Cursor | None) -> list[Any] | None:
    return None if cursor is None else [cursor[0], cursor[1]]


@dataclass(frozen=True, slots=True)
class ListRange:
    """Ask for the responder's vectors of the documents under ``ranges`` (digest-tree nodes)
    whose key comes after ``after`` (None: from the start)."""

    round: int
    ranges: tuple[tuple[int, int], ...]
    after: Cursor | None = None

    def to_wire(self) -> list[Any]:
        return [
            Kind.LIST,
            self.round,
            [[level, index] for level, index in self.ranges],
            _cursor_wire(self.after),
        ]


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing: the vectors of the documents with ``after < key <= end`` in
    key order; ``end`` None: the listing is complete. ``busy``: the responder is being
    filled by another peer (or filling one) and lists nothing now."""

    round: int
    docs: tuple[DocVector, ...]
    end: Cursor | None = None
    busy: bool = False

    def to_wire(self) -> list[Any]:
        return [
            Kind.PAGE,
            self.round,
            [d.to_wire() for d in self.docs],
            _cursor_wire(self.end),
            self.busy,
        ]


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


Message = Push | Ack | Tree | Nodes | ListRange | Page | Sync | Updates | Chunk | Query | Vectors


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


def _push(v: list[Any], _max_docs: int) -> Message:
    expect_list(v, 6, 6, "push")
    return Push(
        _doc_name(v[1]),
        expect_uint(v[2], "epoch"),
        expect_bytes(v[3], "update", MAX_UPDATE),
        expect_uint(v[4], "ack"),
        expect_uint(v[5], "hops", MAX_HOPS),
    )


def _ack(v: list[Any], _max_docs: int) -> Message:
    expect_list(v, 4, 4, "ack")
    return Ack(
        expect_uint(v[1], "ack"), expect_bool(v[2], "ok"), expect_bytes(v[3], "sv", MAX_VECTOR)
    )


def _tree_node(value: Any) -> TreeNode:
    v = expect_list(value, 4, 4, "tree node")
    level = expect_uint(v[0], "level", LEAF_LEVEL)
    index = expect_uint(v[1], "index", FANOUT**level - 1)
    return TreeNode(level, index, expect_uint(v[2], "hash"), expect_uint(v[3], "count"))


def _tree_nodes(value: Any, what: str) -> tuple[TreeNode, ...]:
    return tuple(_tree_node(n) for n in expect_list(value, 0, MAX_NODES_PER_MESSAGE, what))


def _cursor(value: Any) -> Cursor | None:
    if value is None:
        return None
    v = expect_list(value, 2, 2, "cursor")
    return expect_uint(v[0], "cursor.leaf", LEAVES - 1), _doc_name(v[1])


def _tree(v: list[Any], _max_docs: int) -> Message:
    expect_list(v, 3, 3, "tree")
    return Tree(expect_uint(v[1], "round"), _tree_nodes(v[2], "tree.nodes"))


def _nodes(v: list[Any], _max_docs: int) -> Message:
    expect_list(v, 3, 3, "nodes")
    return Nodes(expect_uint(v[1], "round"), _tree_nodes(v[2], "nodes.nodes"))


def _list(v: list[Any], _max_docs: int) -> Message:
    expect_list(v, 4, 4, "list")
    ranges = []
    for item in expect_list(v[2], 0, MAX_RANGES_PER_MESSAGE, "list.ranges"):
        pair = expect_list(item, 2, 2, "range")
        level = expect_uint(pair[0], "level", LEAF_LEVEL)
        ranges.append((level, expect_uint(pair[1], "index", FANOUT**level - 1)))
    return ListRange(expect_uint(v[1], "round"), tuple(ranges), _cursor(v[3]))


def _page(v: list[Any], max_docs: int) -> Message:
    expect_list(v, 5, 5, "page")
    docs = expect_list(v[2], 0, max_docs, "page.docs")
    return Page(
        expect_uint(v[1], "round"),
        tuple(_vector(d) for d in docs),
        _cursor(v[3]),
        expect_bool(v[4], "busy"),
    )


def _sync(v: list[Any], max_docs: int) -> Message:
    expect_list(v, 4, 4, "sync")
    updates = expect_list(v[2], 0, max_docs, "sync.updates")
    want = expect_list(v[3], 0, max_docs, "sync.want")
    return Sync(
        expect_uint(v[1], "round"),
        tuple(_update(u) for u in updates),
        tuple(_vector(w) for w in want),
    )


def _updates(v: list[Any], max_docs: int) -> Message:
    expect_list(v, 3, 3, "updates")
    updates = expect_list(v[2], 0, max_docs, "updates.updates")
    return Updates(expect_uint(v[1], "round"), tuple(_update(u) for u in updates))


def _chunk(v: list[Any], _max_docs: int) -> Message:
    expect_list(v, 5, 5, "chunk")
    total = expect_uint(v[3], "total", 1 << 16)
    index = expect_uint(v[2], "index", 1 << 16)
    if not total > 0 or index >= total:
        raise WireError("chunk: bad index")
    return Chunk(
        expect_uint(v[1], "transfer"), index, total, expect_bytes(v[4], "data", MAX_UPDATE)
    )


def _query(v: list[Any], _max_docs: int) -> Message:
    expect_list(v, 3, 3, "query")
    docs = expect_list(v[2], 0, 1024, "query.docs")
    return Query(expect_uint(v[1], "query"), tuple(_doc_name(d) for d in docs))


def _vectors(v: list[Any], _max_docs: int) -> Message:
    expect_list(v, 3, 3, "vectors")
    docs = expect_list(v[2], 0, 1024, "vectors.docs")
    return Vectors(expect_uint(v[1], "query"), tuple(_vector(d) for d in docs))


_DECODERS: Final[dict[int, Callable[[list[Any], int], Message]]] = {
    Kind.PUSH: _push,
    Kind.ACK: _ack,
    Kind.TREE: _tree,
    Kind.NODES: _nodes,
    Kind.LIST: _list,
    Kind.PAGE: _page,
    Kind.SYNC: _sync,
    Kind.UPDATES: _updates,
    Kind.CHUNK: _chunk,
    Kind.QUERY: _query,
    Kind.VECTORS: _vectors,
}


def decode(data: bytes, max_docs: int = MAX_DOCS_PER_MESSAGE) -> Message:
    """Decode one message; a list of documents longer than ``max_docs`` is refused."""
    try:
        value = cbor.loads(data)
    except cbor.CodecError as exc:
        raise WireError(str(exc)) from None
    if type(value) is not list or not value or type(value[0]) is not int:
        raise WireError("replication message: expected an array starting with a type code")
    decoder = _DECODERS.get(value[0])
    if decoder is None:
        raise WireError(f"replication message: unknown type {value[0]}")
    return decoder(value, max_docs)


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
