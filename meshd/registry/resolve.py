"""The duplicate-name rule: a pure function every node computes the same way.

When two live entries claim one name (each side of a partition registered it), the entry
registered first wins; equal registration times fall back to the node name, then the entry
id, so the order is total. Every node holds the same entries after anti-entropy and runs the
same function, so every node picks the same winner without talking to anyone.

Registration times come from the registering node's wall clock: a node whose clock runs
ahead loses ties it should have won, but never inconsistently.
"""

from __future__ import annotations

from collections.abc import Iterable

from meshd.registry.model import Entry


def order_key(entry: Entry) -> tuple[int, str, str]:
    return (entry.registered_at, entry.node, entry.entry_id)


def winner(candidates: Iterable[Entry]) -> Entry | None:
    best: Entry | None = None
    for entry in candidates:
        if best is None or order_key(entry) < order_key(best):
            best = entry
    return best
