"""The registry: local writes to this node's document, and an index over every node's.

Sans IO: it sits on the replicated documents (:class:`~meshd.replication.documents.Documents`,
which it writes through) and a liveness view (membership). Lookups never touch the network:
they read the index, which follows the documents through pycrdt change events and follows
membership through :meth:`Registry.node_changed`.

Events (:class:`RegistryEvent`):

* ``registered`` — a name now resolves (to ``entry``);
* ``unregistered`` — a name no longer resolves (``entry`` is the last holder): unregistered,
  or its node died or left;
* ``moved`` — a name now resolves to another entry (``previous`` → ``entry``);
* ``conflict`` — two live entries claim a name: ``entry`` lost to ``winner``. Emitted once per
  losing entry on every node. The node holding the loser removes its entry afterwards.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pycrdt import Doc, Map, MapEvent, Subscription

from meshd.registry.model import (
    Entry,
    EntryError,
    Interner,
    Scalar,
    check_capabilities,
    check_kind,
    check_metadata,
    check_name,
    decode_entry,
)
from meshd.registry.resolve import winner
from meshd.replication.core import DocEvent, Durability
from meshd.replication.documents import Documents
from meshd.replication.replica import DocStore, Replica
from meshd_client.protocol import errors

DOC_PREFIX = "reg/"
ROOT = "agents"
EventKind = Literal["registered", "unregistered", "moved", "conflict"]


def doc_name(node: str) -> str:
    return DOC_PREFIX + node


def node_root(event: DocEvent, store: DocStore, root: str) -> tuple[str, Map[Any] | None] | None:
    """The registry-document view other components share: for an event about node *N*'s
    registry document, ``(N, its root map named root)`` — the map is None once the document
    is gone — and None for any other document."""
    if not event.name.startswith(DOC_PREFIX):
        return None
    host = event.name[len(DOC_PREFIX) :]
    replica = store.get(event.name)
    if event.kind == "dropped" or replica is None:
        return host, None
    found: Map[Any] = replica.doc.get(root, type=Map)
    return host, found


class Liveness(Protocol):
    def up(self, node: str) -> bool:
        """Is the node alive or suspect (its entries resolve)?"""

    def epoch(self, node: str) -> int | None:
        """The node's current boot epoch, when membership knows it."""

    def gone_for(self, node: str, now: float) -> float | None:
        """Seconds the node has been dead or left, or None if it is up or unknown."""


@dataclass(frozen=True, slots=True)
class RegistryEvent:
    kind: EventKind
    name: str
    entry: Entry
    previous: Entry | None = None
    winner: Entry | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "name": self.name, "entry": self.entry.to_dict()}
        if self.previous is not None:
            out["previous"] = self.previous.to_dict()
        if self.winner is not None:
            out["winner"] = self.winner.to_dict()
        return out


@dataclass(slots=True)
class RegistryStats:
    registrations: int = 0
    unregistrations: int = 0
    conflicts: int = 0
    bad_entries: int = 0
    docs_reclaimed: int = 0


class Registry:
    """The agent registry: this node's entries and the index over every node's.

    Owns: the lookup index (name → candidates, by node, kind and capability), the winners of
    duplicate names, conflict reports. Writes only this node's document, through
    :class:`~meshd.replication.documents.Documents`; reads every other node's document
    through pycrdt change events and never writes it. Never touches the network."""

    def __init__(
        self,
        *,
        node: str,
        epoch: int,
        docs: Documents,
        liveness: Liveness,
        wall_ms: Callable[[], int],
        reclaim_after: float = 3600.0,
    ) -> None:
        self.node = node
        self.epoch = epoch
        self.docs = docs
        self.liveness = liveness
        self.wall_ms = wall_ms
        self.reclaim_after = reclaim_after
        self.stats = RegistryStats()
        self.listeners: list[Callable[[RegistryEvent], None]] = []
        self._candidates: dict[str, dict[str, Entry]] = {}
        self._by_node: dict[str, set[str]] = {}
        self._by_kind: dict[str, set[str]] = {}
        self._by_capability: dict[str, set[str]] = {}
        self._winners: dict[str, Entry] = {}
        self._doc_epoch: dict[str, int] = {}
        self._subscriptions: dict[str, tuple[Map[Any], Subscription]] = {}
        self._conflicts_reported: set[str] = set()
        self._counter = itertools.count(1)
        self._intern = Interner()
        self._own = doc_name(node)

    # ------------------------------------------------------------------ replicator hooks

    def accept(self, name: str, epoch: int) -> bool:
        """Should a replicated registry document be taken in?"""
        node = name[len(DOC_PREFIX) :]
        if node == self.node:
            return epoch == self.epoch  # our own document has one writer: us
        known = self.liveness.epoch(node)
        return known is None or epoch >= known

    def on_open(self, replica: Replica) -> None:
        if not replica.name.startswith(DOC_PREFIX):
            return
        node = replica.name[len(DOC_PREFIX) :]
        self._clear_node(node)
        self._doc_epoch[node] = replica.epoch
        replica.pin()  # the index follows its content: it stays a live Doc
        agents: Map[Any] = replica.doc.get(ROOT, type=Map)
        subscription = agents.observe(lambda event: self._on_change(node, event))
        self._subscriptions[replica.name] = (agents, subscription)

    def on_drop(self, name: str) -> None:
        if name.startswith(DOC_PREFIX):
            self._clear_node(name[len(DOC_PREFIX) :])

    def _clear_node(self, node: str) -> None:
        sub = self._subscriptions.pop(doc_name(node), None)
        if sub is not None:
            try:
                sub[0].unobserve(sub[1])
            except (ValueError, RuntimeError):
                pass
        self._doc_epoch.pop(node, None)
        names = self._by_node.pop(node, set())
        for name in names:
            self._remove_candidate(name, node)
        self._recompute(names)

    # ------------------------------------------------------------------ index maintenance

    def _on_change(self, node: str, event: MapEvent) -> None:
        touched: set[str] = set()
        keys: dict[str, dict[str, Any]] = getattr(event, "keys")  # noqa: B009 (slot, untyped)
        for key, change in keys.items():
            action = change.get("action")
            touched.add(key)
            self._remove_candidate(key, node)
            if action in ("add", "update"):
                try:
                    entry = decode_entry(key, change.get("newValue"), node, self._intern)
                except EntryError:
                    self.stats.bad_entries += 1
                    continue
                self._add_candidate(entry)
        self._recompute(touched)

    def _add_candidate(self, entry: Entry) -> None:
        self._candidates.setdefault(entry.name, {})[entry.node] = entry
        self._by_node.setdefault(entry.node, set()).add(entry.name)
        self._by_kind.setdefault(entry.kind, set()).add(entry.name)
        for cap in entry.capabilities:
            self._by_capability.setdefault(cap, set()).add(entry.name)

    def _remove_candidate(self, name: str, node: str) -> None:
        holders = self._candidates.get(name)
        if not holders:
            return
        old = holders.pop(node, None)
        if not holders:
            del self._candidates[name]
        if old is None:
            return
        names = self._by_node.get(node)
        if names is not None:
            names.discard(name)
        if not any(e.kind == old.kind for e in holders.values()):
            _discard(self._by_kind, old.kind, name)
        for cap in old.capabilities:
            if not any(cap in e.capabilities for e in holders.values()):
                _discard(self._by_capability, cap, name)

    def _live(self, entry: Entry) -> bool:
        if entry.node == self.node:
            return True
        if not self.liveness.up(entry.node):
            return False
        known = self.liveness.epoch(entry.node)
        return known is None or known == self._doc_epoch.get(entry.node)

    def _recompute(self, names: Iterable[str]) -> None:
        for name in names:
            holders = self._candidates.get(name, {})
            live = [e for e in holders.values() if self._live(e)]
            new = winner(live)
            old = self._winners.get(name)
            if new is None:
                if old is not None:
                    del self._winners[name]
                    self._emit(RegistryEvent("unregistered", name, old))
                continue
            self._winners[name] = new
            if old is None:
                self._emit(RegistryEvent("registered", name, new))
            elif old.entry_id != new.entry_id and not any(e.entry_id == old.entry_id for e in live):
                self._emit(RegistryEvent("moved", name, new, previous=old))
            for loser in live:
                if loser.entry_id != new.entry_id:
                    self._report_conflict(loser, new)

    def _report_conflict(self, loser: Entry, won: Entry) -> None:
        if loser.entry_id in self._conflicts_reported:
            return
        self._conflicts_reported.add(loser.entry_id)
        self.stats.conflicts += 1
        self._emit(RegistryEvent("conflict", loser.name, loser, winner=won))

    def _emit(self, event: RegistryEvent) -> None:
        for listener in list(self.listeners):
            listener(event)

    # ------------------------------------------------------------------ membership

    def node_changed(self, node: str) -> None:
        """Membership changed for ``node``: its entries may (stop to) resolve."""
        self._recompute(list(self._by_node.get(node, ())))

    def tick(self, now: float) -> None:
        """Drop documents of nodes gone for longer than the reclaim time, or superseded by a
        newer boot epoch of the same node."""
        for node, epoch in list(self._doc_epoch.items()):
            if node == self.node:
                continue
            gone = self.liveness.gone_for(node, now)
            known = self.liveness.epoch(node)
            if (gone is not None and gone > self.reclaim_after) or (
                known is not None and known > epoch
            ):
                self.stats.docs_reclaimed += 1
                self.docs.drop(doc_name(node))

    # ------------------------------------------------------------------ local operations

    def _write(
        self, now: float, mutate: Callable[[Map[Any]], None], durability: Durability
    ) -> int | None:
        def apply(doc: Doc[Any]) -> None:
            mutate(doc.get(ROOT, type=Map))

        return self.docs.write(now, self._own, apply, epoch=self.epoch, durability=durability)

    def write_own(
        self,
        now: float,
        root: str,
        mutate: Callable[[Map[Any]], None],
        durability: Durability = "local",
    ) -> int | None:
        """Write another root map of this node's document (e.g. signal subscriptions)."""

        def apply(doc: Doc[Any]) -> None:
            mutate(doc.get(root, type=Map))

        return self.docs.write(now, self._own, apply, epoch=self.epoch, durability=durability)

    def open_own(self) -> None:
        self.docs.open(self._own, self.epoch)

    def register(
        self,
        now: float,
        name: str,
        *,
        kind: str = "",
        capabilities: Iterable[str] = (),
        metadata: dict[str, Scalar] | None = None,
        durability: Durability = "local",
    ) -> tuple[Entry, int | None]:
        """Register ``name`` on this node. Raises Conflict if a live entry holds it."""
        try:
            entry = Entry(
                name=check_name(name),
                node=self.node,
                kind=check_kind(kind),
                capabilities=check_capabilities(capabilities),
                metadata=check_metadata(metadata or {}),
                registered_at=self.wall_ms(),
                entry_id=f"{self.node}/{self.epoch}/{next(self._counter)}",
            )
        except EntryError as exc:
            raise errors.Invalid(str(exc)) from None
        holder = self._winners.get(name)
        if holder is not None:
            raise errors.Conflict(
                f"{name!r} is already registered on {holder.node}",
                detail={"holder": holder.to_dict()},
            )
        token = self._write(
            now, lambda agents: agents.__setitem__(name, entry.encode()), durability
        )
        self.stats.registrations += 1
        return entry, token

    def unregister(
        self, now: float, name: str, *, durability: Durability = "local"
    ) -> tuple[bool, int | None]:
        """Remove this node's entry for ``name``; False if it holds none."""
        mine = self._candidates.get(name, {}).get(self.node)
        if mine is None:
            return False, None
        token = self._write(now, lambda agents: agents.pop(name, None), durability)
        self.stats.unregistrations += 1
        return True, token

    def unregister_many(
        self, now: float, names: Iterable[str], *, durability: Durability = "local"
    ) -> tuple[list[str], int | None]:
        """Remove several of this node's entries in one transaction (a client went away)."""
        mine = [n for n in names if self._candidates.get(n, {}).get(self.node) is not None]
        if not mine:
            return [], None

        def remove(agents: Map[Any]) -> None:
            for name in mine:
                agents.pop(name, None)

        token = self._write(now, remove, durability)
        self.stats.unregistrations += len(mine)
        return mine, token

    def count(
        self, *, kind: str | None = None, capability: str | None = None, node: str | None = None
    ) -> int:
        """How many names resolve (with the same filters as :meth:`entries`), without
        building the list."""
        if kind is None and capability is None and node is None:
            return len(self._winners)
        return len(self.entries(kind=kind, capability=capability, node=node))

    def holds(self, name: str) -> Entry | None:
        """This node's own entry for ``name`` (whether or not it currently wins)."""
        return self._candidates.get(name, {}).get(self.node)

    # ------------------------------------------------------------------ queries

    def lookup(self, name: str) -> Entry | None:
        return self._winners.get(name)

    def names_on(self, node: str) -> list[str]:
        """Names with an entry in ``node``'s document (whether or not they resolve)."""
        return sorted(self._by_node.get(node, ()))

    def last_known(self, name: str) -> Entry | None:
        """The entry ``name`` would resolve to if every node were up, when it does not
        resolve now because its node is down (dead, left or partitioned away): callers can
        then say ``unreachable`` instead of ``not_found`` until the document is reclaimed."""
        if name in self._winners:
            return None
        return winner(
            e
            for e in self._candidates.get(name, {}).values()
            if self.liveness.epoch(e.node) in (None, self._doc_epoch.get(e.node))
        )

    def entries(
        self,
        *,
        kind: str | None = None,
        capability: str | None = None,
        node: str | None = None,
    ) -> list[Entry]:
        names: Iterable[str]
        if capability is not None:
            names = self._by_capability.get(capability, ())
        elif kind is not None:
            names = self._by_kind.get(kind, ())
        elif node is not None:
            names = self._by_node.get(node, ())
        else:
            names = self._winners.keys()
        out = []
        for name in names:
            entry = self._winners.get(name)
            if entry is None:
                continue
            if (
                (kind is not None and entry.kind != kind)
                or (capability is not None and capability not in entry.capabilities)
                or (node is not None and entry.node != node)
            ):
                continue
            out.append(entry)
        out.sort(key=lambda e: e.name)
        return out

    def __len__(self) -> int:
        return len(self._winners)


def _discard(index: dict[str, set[str]], key: str, name: str) -> None:
    names = index.get(key)
    if names is not None:
        names.discard(name)
        if not names:
            del index[key]
