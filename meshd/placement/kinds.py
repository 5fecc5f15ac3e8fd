"""Agent kinds and the hosts that serve them.

A client process serves a *kind* (``mesh.serve_kind(kind, factory, capacity=...)``): it can
create agents of that kind on demand. Each daemon advertises the kinds its clients serve —
capacity, how many agents of the kind run here, the partition strategy, whether it drains —
in the ``kinds`` map of its own registry document, so every daemon holds the same table and
computes the same placement.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final

from meshd_client.protocol import cbor, errors

MAX_KIND: Final = 128
ROOT: Final = "kinds"


class Strategy(enum.StrEnum):
    KEEP_MAJORITY = "keep_majority"
    ALLOW_DUPLICATES = "allow_duplicates"


@dataclass(frozen=True, slots=True)
class KindInfo:
    """What one host advertises for one kind."""

    capacity: int
    active: int
    strategy: Strategy
    draining: bool = False

    def encode(self) -> bytes:
        return cbor.dumps([self.capacity, self.active, self.strategy.value, self.draining])

    @classmethod
    def decode(cls, data: Any) -> KindInfo | None:
        if not isinstance(data, bytes | bytearray | memoryview):
            # A registry document may hold anything a peer wrote; bytes(n) of an integer
            # (pycrdt returns big ones as int) would allocate n zero bytes.
            return None
        try:
            value = cbor.loads(bytes(data))
            capacity, active, strategy, draining = value
            if type(capacity) is not int or type(active) is not int or type(draining) is not bool:
                return None
            return cls(max(0, capacity), max(0, active), Strategy(strategy), draining)
        except (cbor.CodecError, ValueError, TypeError):
            return None

    @property
    def accepts(self) -> bool:
        """May new agents of this kind be placed here?"""
        return not self.draining and self.active < self.capacity


def check_kind(kind: Any) -> str:
    if not isinstance(kind, str) or not 0 < len(kind) <= MAX_KIND or "/" in kind:
        raise errors.Invalid(f"a kind is 1..{MAX_KIND} characters without '/'")
    if not kind.isprintable():
        raise errors.Invalid("a kind must be printable")
    return kind


def kind_of(name: str) -> str | None:
    """Virtual agents are named ``<kind>/<key>``: the kind of such a name."""
    head, sep, tail = name.partition("/")
    return head if sep and head and tail else None


class KindTable:
    """Every host's advertised kinds (from the replicated registry documents)."""

    def __init__(self) -> None:
        self._hosts: dict[str, dict[str, KindInfo]] = {}

    def set_host(self, host: str, kinds: dict[str, KindInfo]) -> None:
        if kinds:
            self._hosts[host] = kinds
        else:
            self._hosts.pop(host, None)

    def drop_host(self, host: str) -> None:
        self._hosts.pop(host, None)

    def info(self, host: str, kind: str) -> KindInfo | None:
        return self._hosts.get(host, {}).get(kind)

    def hosts(self, kind: str) -> dict[str, KindInfo]:
        return {h: k[kind] for h, k in self._hosts.items() if kind in k}

    def hosts_snapshot(self) -> frozenset[tuple[str, str, int, bool]]:
        """What placement depends on (not the changing active counts): who serves which
        kind, with what capacity, and who drains."""
        return frozenset(
            (host, kind, info.capacity, info.draining)
            for host, kinds in self._hosts.items()
            for kind, info in kinds.items()
        )

    def kinds(self) -> set[str]:
        return {kind for kinds in self._hosts.values() for kind in kinds}

    def strategy(self, kind: str) -> Strategy | None:
        """The kind's strategy (hosts should agree; keep_majority wins any disagreement,
        being the safe choice)."""
        strategies = {info.strategy for info in self.hosts(kind).values()}
        if not strategies:
            return None
        if Strategy.KEEP_MAJORITY in strategies:
            return Strategy.KEEP_MAJORITY
        return Strategy.ALLOW_DUPLICATES
