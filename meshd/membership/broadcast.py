"""Transmit-limited broadcast queue for infection-style dissemination (memberlist's design).

Each gossip item is retransmitted at most ``limit`` times, where limit ≈ mult × ⌈log10(n+1)⌉
grows with the cluster. Items that were sent fewest times go first; among equals the newest
goes first. A newer item about the same subject (node name) replaces the older one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def retransmit_limit(mult: int, n: int) -> int:
    """memberlist's retransmitLimit: mult × ⌈log10(n + 1)⌉."""
    return mult * max(1, math.ceil(math.log10(n + 1)))


_SMALLEST_ITEM = 16  # no gossip item is smaller: stop once less room than this is left
_MAX_MISSES = 8  # items skipped for size before the packet counts as full


@dataclass(slots=True)
class _Item:
    key: str
    data: bytes
    seq: int
    transmits: int = 0
    done: bool = False


@dataclass(slots=True)
class BroadcastQueue:
    """Items bucketed by transmit count; each bucket keeps insertion (age) order."""

    _levels: list[dict[int, _Item]] = field(default_factory=list)
    _by_key: dict[str, _Item] = field(default_factory=dict)
    _seq: int = 0

    def __len__(self) -> int:
        return len(self._by_key)

    def push(self, key: str, data: bytes) -> None:
        """Queue ``data`` about ``key``, replacing any older item about the same key."""
        old = self._by_key.pop(key, None)
        if old is not None:
            self._levels[old.transmits].pop(old.seq, None)
        self._seq += 1
        item = _Item(key, data, self._seq)
        self._by_key[key] = item
        if not self._levels:
            self._levels.append({})
        self._levels[0][item.seq] = item

    def pending(self, key: str) -> bool:
        return key in self._by_key

    def take(
        self, budget: int, limit: int, per_item_overhead: int = 0, max_items: int | None = None
    ) -> list[bytes]:
        """Pick items fitting in ``budget`` bytes (and at most ``max_items`` of them), counting
        one transmit for each picked item.

        Items reaching ``limit`` transmits are dropped from the queue.
        """
        picked: list[_Item] = []
        remaining = budget
        misses = 0
        if max_items is not None and max_items <= 0:
            return []
        for level in self._levels:
            for item in reversed(level.values()):
                cost = len(item.data) + per_item_overhead
                if cost <= remaining:
                    picked.append(item)
                    remaining -= cost
                    if max_items is not None and len(picked) >= max_items:
                        remaining = 0  # full: no room for another message
                    if remaining < _SMALLEST_ITEM:
                        break
                else:
                    misses += 1
                    if misses > _MAX_MISSES:
                        break
            if remaining < _SMALLEST_ITEM or misses > _MAX_MISSES:
                break
        out = [item.data for item in picked]
        # Picked newest first; refile oldest first (and deeper levels first) so each level
        # keeps age order and the next round again starts with the newest.
        for item in reversed(picked):
            self._levels[item.transmits].pop(item.seq)
            item.transmits += 1
            if item.transmits >= limit:
                del self._by_key[item.key]
                continue
            while len(self._levels) <= item.transmits:
                self._levels.append({})
            self._levels[item.transmits][item.seq] = item
        return out

    def prune(self, limit: int) -> None:
        """Drop items that already reached a (possibly lowered) limit."""
        for level_index in range(limit, len(self._levels)):
            for item in self._levels[level_index].values():
                del self._by_key[item.key]
            self._levels[level_index].clear()
