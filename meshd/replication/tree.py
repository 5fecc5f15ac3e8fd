"""The hierarchical digest anti-entropy compares: a fixed 16-ary tree over document keys.

A document's *key* is ``(leaf, name)``: ``leaf`` is the top 16 bits of crc32(name), so the
key space is 65,536 leaves, ordered, and every document has one place in it on every node.
The tree has five levels: level 0 is the root, level *l* has 16^l nodes, and node
``(l, i)`` covers leaves ``i·16^(4-l)`` to ``(i+1)·16^(4-l) - 1``. Each node holds

- the XOR of the 64-bit hashes (name, epoch, state vector) of the documents under it, and
- how many documents are under it,

updated in O(levels) whenever a document changes, so nothing is ever rescanned. Two nodes in
agreement compare the 16 level-1 nodes (a few hundred bytes, whatever the number of
documents); a difference is found by descending only into the nodes that differ, so a round
costs O(differences × levels). Ranges are key intervals, so a node holding only part of the
key space could compare just the nodes it holds.
"""

from __future__ import annotations

import zlib
from array import array
from collections.abc import Iterable, Iterator
from typing import Final

FANOUT_BITS: Final = 4
FANOUT: Final = 1 << FANOUT_BITS
LEAF_LEVEL: Final = 4
LEAF_BITS: Final = FANOUT_BITS * LEAF_LEVEL
LEAVES: Final = 1 << LEAF_BITS

NodeId = tuple[int, int]  # (level, index)
Key = tuple[int, str]  # (leaf, name): the order documents are listed in


def leaf_of(name: str) -> int:
    return zlib.crc32(name.encode()) >> (32 - LEAF_BITS)


def valid_node(level: int, index: int) -> bool:
    return 0 <= level <= LEAF_LEVEL and 0 <= index < FANOUT**level


def span(level: int, index: int) -> tuple[int, int]:
    """The leaves ``[first, end)`` under node ``(level, index)``."""
    shift = FANOUT_BITS * (LEAF_LEVEL - level)
    return index << shift, (index + 1) << shift


def children(level: int, index: int) -> list[NodeId]:
    return [(level + 1, (index << FANOUT_BITS) + i) for i in range(FANOUT)]


class DigestTree:
    """XOR hash and document count of every node; the leaves' document names."""

    def __init__(self) -> None:
        # Levels 0-3 as arrays (4,369 nodes, about 52 KB per store); the 65,536 leaves
        # sparse, only those holding documents.
        self._hashes = [array("Q", bytes(8 * FANOUT**lv)) for lv in range(LEAF_LEVEL)]
        self._counts = [array("I", bytes(4 * FANOUT**lv)) for lv in range(LEAF_LEVEL)]
        self._leaf_hash: dict[int, int] = {}
        # leaf -> its names (only non-empty leaves): one name as a str, more as a set (most
        # leaves hold one or two documents up to ~100k: a set each would cost ~200 bytes).
        self._names: dict[int, str | set[str]] = {}

    def node(self, level: int, index: int) -> tuple[int, int]:
        """(hash, count) of a node."""
        if level == LEAF_LEVEL:
            return self._leaf_hash.get(index, 0), len(self._leaf_names(index))
        return self._hashes[level][index], self._counts[level][index]

    def _toggle(self, leaf: int, value: int, delta: int) -> None:
        for level in range(LEAF_LEVEL):
            index = leaf >> (FANOUT_BITS * (LEAF_LEVEL - level))
            self._hashes[level][index] ^= value
            self._counts[level][index] += delta
        hashed = self._leaf_hash.get(leaf, 0) ^ value
        if hashed:
            self._leaf_hash[leaf] = hashed
        else:
            self._leaf_hash.pop(leaf, None)

    def _leaf_names(self, leaf: int) -> set[str] | tuple[str, ...]:
        names = self._names.get(leaf)
        if names is None:
            return ()
        return (names,) if isinstance(names, str) else names

    def insert(self, leaf: int, name: str, value: int) -> None:
        names = self._names.get(leaf)
        if names is None:
            self._names[leaf] = name
        elif isinstance(names, str):
            if names == name:
                return
            self._names[leaf] = {names, name}
        elif name in names:
            return
        else:
            names.add(name)
        self._toggle(leaf, value, 1)

    def delete(self, leaf: int, name: str, value: int) -> None:
        names = self._names.get(leaf)
        if names is None or name not in self._leaf_names(leaf):
            return
        if isinstance(names, str):
            del self._names[leaf]
        else:
            names.discard(name)
            if len(names) == 1:
                self._names[leaf] = names.pop()
        self._toggle(leaf, value, -1)

    def rehash(self, leaf: int, old: int, new: int) -> None:
        if old != new:
            self._toggle(leaf, old ^ new, 0)

    def level(self, level: int) -> bytes:
        """Every hash of one level above the leaves, big-endian (level 1: 128 bytes)."""
        return b"".join(h.to_bytes(8, "big") for h in self._hashes[level])

    def _occupied(self, first: int, end: int) -> Iterator[int]:
        """The leaves in ``[first, end)`` that may hold documents, in order: the parents'
        counts skip empty stretches (a sparse store, or a joiner's, is not scanned leaf by
        leaf)."""
        parents = self._counts[LEAF_LEVEL - 1]
        leaf = first
        while leaf < end:
            parent = leaf >> FANOUT_BITS
            stop = min(end, (parent + 1) << FANOUT_BITS)
            if parents[parent]:
                yield from range(leaf, stop)
            leaf = stop

    def keys(
        self, nodes: Iterable[NodeId], after: Key | None = None, until: Key | None = None
    ) -> Iterator[Key]:
        """Keys under ``nodes`` with ``after < key <= until``, in key order."""
        spans = sorted(span(level, index) for level, index in nodes)
        for lo, hi in spans:
            first = lo if after is None else max(lo, after[0])
            end = hi if until is None else min(hi, until[0] + 1)
            for leaf in self._occupied(first, end):
                names = self._leaf_names(leaf)
                if not names:
                    continue
                for name in sorted(names):
                    key = (leaf, name)
                    if after is not None and key <= after:
                        continue
                    if until is not None and key > until:
                        return
                    yield key
