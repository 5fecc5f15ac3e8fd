"""Paging of repair (docs/replication.md#paging), pure functions over a :class:`DocStore`.

Once a round has found the digest-tree ranges that differ, the responder lists its documents
in them in key order, one bounded page at a time (:func:`page`); the initiator compares each
page with its own documents of the same key interval (:func:`compare`) and sends what the
responder lacks and asks for what it lacks, again bounded. Every page names the key it ends
at, so the next one resumes after it: no count of documents or total size makes a message
larger than the bounds, and a listing interrupted anywhere resumes where it stopped.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

from meshd.replication import vectors
from meshd.replication.messages import Cursor, DocUpdate, DocVector
from meshd.replication.replica import DocStore, Replica
from meshd.replication.tree import LEAVES, NodeId, leaf_of, span

EMPTY_SV = b"\x00"
VECTOR_OVERHEAD = 16  # CBOR framing of one [doc, epoch, sv] entry, roughly


@dataclass(frozen=True, slots=True)
class Limits:
    docs: int  # documents (vectors or updates) per message
    bytes: int  # bytes of vectors or updates per message; one larger update travels alone


def page(
    store: DocStore, ranges: list[NodeId], after: Cursor | None, limits: Limits
) -> tuple[list[DocVector], Cursor | None]:
    """The vectors of the documents under ``ranges`` after ``after``, at most ``limits``,
    and the key the page ends at (None: nothing follows)."""
    docs: list[DocVector] = []
    size = 0
    last: Cursor | None = None
    for replica in store.listing(ranges, after):
        cost = len(replica.name) + len(replica.sv) + VECTOR_OVERHEAD
        if docs and (len(docs) >= limits.docs or size + cost > limits.bytes):
            return docs, last
        docs.append(DocVector(replica.name, replica.epoch, replica.sv))
        size += cost
        last = (replica.leaf, replica.name)
    return docs, None


@dataclass(slots=True)
class Comparison:
    updates: list[DocUpdate] = field(default_factory=list)  # what the responder lacks
    want: list[DocVector] = field(default_factory=list)  # what this node lacks
    # Where the next page starts (None: the ranges are done).
    next: Cursor | None = None
    # Listed documents outside the page's interval or ranges.
    refused: list[str] = field(default_factory=list)
    bad_vectors: int = 0  # listed vectors that do not decode


def _within(
    key: Cursor, spans: list[tuple[int, int]], after: Cursor | None, end: Cursor | None
) -> bool:
    if after is not None and key <= after:
        return False
    if end is not None and key > end:
        return False
    at = bisect.bisect_right(spans, (key[0], LEAVES)) - 1
    return at >= 0 and spans[at][0] <= key[0] < spans[at][1]


def _compare_one(
    replica: Replica, other: DocVector | None
) -> tuple[bytes | None, DocVector | None]:
    """(update the peer lacks, vector of what this node wants) for one document; raises
    VectorError on a malformed vector."""
    if other is None or other.epoch < replica.epoch:
        return replica.full_update(), None
    if other.epoch > replica.epoch:
        return None, DocVector(replica.name, other.epoch, EMPTY_SV)
    theirs = vectors.decode(other.sv)
    update = replica.missing_for(theirs, other.sv)
    want = None
    if vectors.has_news(theirs, replica.vector):
        want = DocVector(replica.name, replica.epoch, replica.sv)
    return update, want


def compare(
    store: DocStore,
    ranges: list[NodeId],
    after: Cursor | None,
    docs: tuple[DocVector, ...],
    end: Cursor | None,
    limits: Limits,
    accept: Callable[[str, int], bool],
) -> Comparison:
    """Compare the responder's page (``docs``, the interval ``(after, end]``) with this
    node's documents of the same interval. The updates stay within ``limits``: when they
    fill up, the comparison stops at the last document it covered, and ``next`` says where
    the next page must start so nothing is skipped."""
    out = Comparison(next=end)
    theirs: dict[str, DocVector] = {}
    spans = sorted(span(level, index) for level, index in ranges)
    for d in docs:
        if _within((leaf_of(d.doc), d.doc), spans, after, end):
            theirs[d.doc] = d
        else:
            out.refused.append(d.doc)
    budget = limits.bytes
    covered = after
    truncated = False
    for replica in store.listing(ranges, after, end):
        other = theirs.pop(replica.name, None)
        try:
            update, want = _compare_one(replica, other)
        except vectors.VectorError:
            out.bad_vectors += 1
            update, want = None, None
        if update is not None:
            if out.updates and (len(out.updates) >= limits.docs or len(update) > budget):
                truncated = True
                break
            budget -= len(update)
            out.updates.append(DocUpdate(replica.name, replica.epoch, update))
        if want is not None:
            out.want.append(want)
        covered = (replica.leaf, replica.name)
    for other in theirs.values():  # documents only the responder has
        if truncated and covered is not None and (leaf_of(other.doc), other.doc) > covered:
            continue
        if accept(other.doc, other.epoch):
            out.want.append(DocVector(other.doc, other.epoch, EMPTY_SV))
    if truncated:
        out.next = covered
    return out


def answer(
    store: DocStore, want: tuple[DocVector, ...], limits: Limits
) -> tuple[list[DocUpdate], int]:
    """The updates for what a peer wants, within ``limits``; and how many vectors were
    malformed."""
    replies: list[DocUpdate] = []
    budget = limits.bytes
    bad = 0
    for w in want:
        if len(replies) >= limits.docs:
            break
        replica = store.get(w.doc)
        if replica is None or replica.epoch < w.epoch:
            continue
        if replica.epoch > w.epoch or w.sv == EMPTY_SV:
            update: bytes | None = replica.full_update()
        else:
            try:
                update = replica.missing_for(vectors.decode(w.sv), w.sv)
            except vectors.VectorError:
                bad += 1
                continue
        if update is None:
            continue
        if replies and len(update) > budget:
            break
        budget -= len(update)
        replies.append(DocUpdate(replica.name, replica.epoch, update))
    return replies, bad
