"""Collaborators of the routing core for its unit tests: a wire that records frames, a
registry index, a membership view and a client stream, all plain data."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from meshd.registry.model import Entry
from meshd.routing import messages
from meshd.routing.core import RoutingCore
from meshd.routing.local import LocalAgent
from meshd.routing.outcome import Outcome
from meshd.wire.membership import Status
from meshd_client.protocol import errors

SELF = "a"


def entry(name: str, node: str) -> Entry:
    return Entry(name, node, "k", (), {}, 0, f"{node}/{name}")


@dataclass
class Wire:
    sent: list[tuple[str, messages.Message]] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)
    up_links: set[str] = field(default_factory=set)

    def send(self, peer: str, frame: bytes) -> bool:
        if peer in self.refuse:
            return False
        self.sent.append((peer, messages.decode(frame)))
        return True

    def connected(self, peer: str) -> bool:
        return peer in self.up_links

    def take(self) -> list[tuple[str, messages.Message]]:
        out, self.sent = self.sent, []
        return out


@dataclass
class Directory:
    live: dict[str, Entry] = field(default_factory=dict)
    gone: dict[str, Entry] = field(default_factory=dict)

    def lookup(self, name: str) -> Entry | None:
        return self.live.get(name)

    def last_known(self, name: str) -> Entry | None:
        return self.gone.get(name)


@dataclass
class Members:
    status: dict[str, Status] = field(default_factory=dict)

    def peek(self, name: str) -> tuple[Status, dict[str, str], float] | None:
        found = self.status.get(name)
        return None if found is None else (found, {}, 0.0)


@dataclass
class Sink:
    events: list[Any] = field(default_factory=list)
    offered: list[Any] = field(default_factory=list)
    full: bool = False

    def emit(self, payload: Any) -> None:
        if self.full:
            raise errors.Overloaded("the client is not keeping up")
        self.events.append(payload)

    def offer(self, payload: Any) -> None:
        self.offered.append(payload)


@dataclass
class Outcomes:
    """A ``done`` callback that records what it was told."""

    got: list[Outcome] = field(default_factory=list)

    def __call__(self, outcome: Outcome) -> None:
        self.got.append(outcome)

    @property
    def one(self) -> Outcome:
        assert len(self.got) == 1, self.got
        return self.got[0]


@dataclass
class Rig:
    core: RoutingCore
    wire: Wire
    directory: Directory
    members: Members
    wakes: list[None]


def rig(node: str = SELF, *, peers: tuple[str, ...] = ("b", "c")) -> Rig:
    wire, directory = Wire(), Directory()
    members = Members({p: Status.ALIVE for p in (node, *peers)})
    wakes: list[None] = []
    core = RoutingCore(
        node=node,
        directory=directory,
        members=members,
        wire=wire,
        log=logging.getLogger("test.routing"),
        wake_advertiser=lambda: wakes.append(None),
    )
    return Rig(core, wire, directory, members, wakes)


def serve(r: Rig, name: str, sink: Sink | None = None, owner: object = None) -> Sink:
    """Serve agent ``name`` on the rig's host; returns its stream."""
    sink = sink if sink is not None else Sink()
    found = entry(name, r.core.node)
    r.directory.live[name] = found
    r.core.local.attach(LocalAgent(found, owner if owner is not None else object(), sink))
    return sink
