"""The daemon's cross-component rules: what happens when membership or the registry changes.

Each component owns its own state; these rules say how a change seen by one reaches the
others, and in which order (a dead host's links close, its calls fail, its entries stop
resolving, and only then are its agents placed elsewhere). They are plain methods over small
protocols, so each rule has a unit test (``tests/unit/test_node_policy.py``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from meshd.logs import kv
from meshd.membership.events import EventKind, MemberEvent, MemberView
from meshd.membership.reference import reference_members
from meshd.registry.registry import RegistryEvent


class MembershipView(Protocol):
    @property
    def joined(self) -> bool: ...

    def members(self) -> list[MemberView]: ...


class ReplicationPort(Protocol):
    @property
    def peers(self) -> list[str]: ...

    def set_members(self, live: Iterable[str], reference: Iterable[str] | None) -> None: ...

    def forget_peer(self, peer: str) -> None: ...

    def request_sync(self, now: float, peer: str) -> None: ...


class Closable(Protocol):
    def close(self, peer: str) -> None: ...


class RoutingPort(Protocol):
    def host_down(self, host: str) -> None: ...

    def host_up(self, host: str) -> None: ...

    def notify(self, name: str, notice: dict[str, Any]) -> bool: ...


class RegistryPort(Protocol):
    def node_changed(self, node: str) -> None: ...

    def unregister(self, now: float, name: str) -> Any: ...


class PlacementPort(Protocol):
    def host_down(self, host: str) -> None: ...


class ClusterPolicy:
    def __init__(
        self,
        *,
        node_name: str,
        membership: MembershipView,
        replication: ReplicationPort,
        links: Sequence[Closable],
        routing: RoutingPort,
        registry: RegistryPort,
        placement: PlacementPort,
        clock: Callable[[], float],
        rng: random.Random,
        log: logging.Logger,
    ) -> None:
        self.node_name = node_name
        self.membership = membership
        self.replication = replication
        self.links = links
        self.routing = routing
        self.registry = registry
        self.placement = placement
        self.clock = clock
        self.rng = rng
        self.log = log
        self.ever_joined = False

    def members_changed(self) -> None:
        """Tell replication who is live and what the reference membership is. Until this
        node has joined its cluster once, its table is not the cluster's: no majority can be
        counted then (a restarted node alone must not call itself a majority)."""
        members = self.membership.members()
        if self.membership.joined:
            self.ever_joined = True
        live = [m.name for m in members if m.status.up]
        reference = reference_members(members) if self.ever_joined else None
        self.replication.set_members(live, reference)

    def on_member_event(self, event: MemberEvent) -> None:
        member = event.member.name
        if event.kind is EventKind.REAP:
            # A reaped member was down already: links, routing, the registry and placement
            # let go of it at its DEAD or LEAVE event. It leaves every majority now.
            self.members_changed()
            return
        if member == self.node_name:
            return
        self.members_changed()
        down = event.kind in (EventKind.DEAD, EventKind.LEAVE)
        if down:
            for links in self.links:
                links.close(member)
            self.replication.forget_peer(member)
            self.routing.host_down(member)
        elif event.kind in (EventKind.JOIN, EventKind.ALIVE):
            self.routing.host_up(member)
            # A member back from a partition (or new): repair with it right away. Each node
            # does so with probability ~2/n, so a newcomer is not sent the whole registry by
            # every member at once (it pulls from one peer itself as it joins).
            peers = len(self.replication.peers)
            if peers <= 2 or self.rng.random() < 2 / peers:
                self.replication.request_sync(self.clock(), member)
        self.registry.node_changed(member)
        if down:
            # Only after the registry stopped resolving its agents: re-place what it ran.
            self.placement.host_down(member)

    def on_registry_event(self, event: RegistryEvent) -> None:
        """Our entry lost a duplicate-name resolution: tell its agent why, withdraw it."""
        if event.kind != "conflict" or event.entry.node != self.node_name:
            return
        winner = event.winner
        self.log.warning(
            "name conflict: our registration lost",
            extra=kv(
                agent=event.name,
                winner_node=winner.node if winner else None,
                entry=event.entry.entry_id,
            ),
        )
        self.routing.notify(
            event.name,
            {
                "type": "name_conflict",
                "name": event.name,
                "winner": winner.to_dict() if winner else None,
            },
        )
        self.registry.unregister(self.clock(), event.name)
