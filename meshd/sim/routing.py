"""Routing cores on the simulated network, in virtual time.

Every node of a :class:`~meshd.sim.network.SimNetwork` gets a real
:class:`~meshd.routing.core.RoutingCore`, fed by that node's own membership core (its view of
who is up, and its DEAD/LEAVE/JOIN/ALIVE events, as the daemon's policy feeds them). Only the
links, the registry and the client sessions are simulated:

* ROUTING frames travel like segments of one TCP connection per host pair: in order, with the
  network's latency; a lost segment costs a retransmission; a blocked or crashed path drops
  them (the exchange then times out); a killed host resets the connection, so the sender's
  core is told the link broke after a round trip.
* The registry is one table of which host serves which agent; a node resolves a name only if
  its membership calls the host up (as the registry's liveness view does).
* An agent is a :class:`SimAgent`: it answers each delivery after its service time (or never,
  if ``silent``), counting how many times its handler ran.
* A node's subscription patterns reach the other nodes' cores at once (in the daemon they
  travel in its registry document).

The cores' deadlines are events on the network's heap, so one seed makes a run reproducible.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshd.membership.events import EventKind, MemberEvent
from meshd.registry.model import Entry
from meshd.routing.core import RoutingCore
from meshd.routing.local import LocalAgent
from meshd.routing.outcome import Ok
from meshd.sim.network import SimNetwork, SimNode


def _entry(name: str, host: str) -> Entry:
    return Entry(name, host, "sim", (), {}, 0, f"{host}/{name}")


@dataclass
class SimDirectory:
    """The registry as ``node`` sees it: an agent resolves if its host is up to ``node``."""

    node: str
    hosts: dict[str, str]  # agent -> host (shared by every node)
    net: SimNetwork

    def _up(self, host: str) -> bool:
        if host == self.node:
            return True
        state = self.net.nodes[self.node].core.peek(host)
        return state is not None and state[0].up

    def lookup(self, name: str) -> Entry | None:
        host = self.hosts.get(name)
        return _entry(name, host) if host is not None and self._up(host) else None

    def last_known(self, name: str) -> Entry | None:
        host = self.hosts.get(name)
        return _entry(name, host) if host is not None and not self._up(host) else None


@dataclass
class _Members:
    """The node's current membership core (a restart replaces it)."""

    node: SimNode

    def peek(self, name: str) -> Any:
        return self.node.core.peek(name)


@dataclass
class SimAgent:
    """An agent's client: answers after ``service`` seconds, or never if ``silent``."""

    name: str
    router: SimRouter
    service: float = 0.002
    silent: bool = False
    runs: list[str] = field(default_factory=list)  # message ids its handler ran for

    def emit(self, payload: Any) -> None:
        self.runs.append(payload["id"])
        if self.silent or (payload["type"] == "message" and not payload["at_least_once"]):
            return
        msg_id, body = payload["id"], payload["body"]
        router = self.router

        def answer(now: float) -> None:
            if router.up:
                router.core.local.reply(now, self.name, msg_id, Ok(["re", body]))
                router.after_input()

        router.net.call_at(router.net.now + self.service, answer)

    def offer(self, payload: Any) -> None:
        return None


@dataclass
class SimSubscriber:
    """A subscription's client: records the signals offered to it."""

    signals: list[Any] = field(default_factory=list)

    def emit(self, payload: Any) -> None:
        self.signals.append(payload)

    def offer(self, payload: Any) -> None:
        self.signals.append(payload)


class _Wire:
    """One node's ROUTING links (see the module docstring)."""

    def __init__(self, routing: SimRouting, node: str) -> None:
        self.routing = routing
        self.node = node
        self._last: dict[str, float] = {}  # per peer: when the last frame arrives (in order)

    def send(self, peer: str, frame: bytes) -> bool:
        net = self.routing.net
        target = net.nodes.get(peer)
        if target is None:
            return False
        self.routing.frames += 1
        leg = net.tcp_leg(self.node, peer)
        if leg is None:
            self.routing.lost += 1
            return True  # queued; it never arrives
        at = max(net.now + leg, self._last.get(peer, 0.0))
        self._last[peer] = at
        net.call_at(at, lambda now: self.routing.arrive(now, self.node, peer, frame))
        return True

    def connected(self, peer: str) -> bool:
        net = self.routing.net
        target = net.nodes.get(peer)
        return (
            target is not None
            and target.state in ("up", "paused")
            and net.tcp_leg(self.node, peer) is not None
        )


class SimRouter:
    """One node's routing core and what it needs from the simulation."""

    def __init__(self, routing: SimRouting, node: SimNode) -> None:
        self.routing = routing
        self.net = routing.net
        self.node = node
        self.core = RoutingCore(
            node=node.name,
            directory=SimDirectory(node.name, routing.hosts, routing.net),
            members=_Members(node),
            wire=_Wire(routing, node.name),
            log=logging.getLogger("meshd.sim.routing"),
        )
        self._scheduled = math.inf
        self.alive = True  # False once a restart replaced this process

    @property
    def up(self) -> bool:
        return self.alive and self.node.state == "up"

    def after_input(self) -> None:
        """Schedule the core's next deadline on the network's clock."""
        deadline = max(self.core.next_deadline(), self.net.now)
        if deadline < self._scheduled:
            self._scheduled = deadline
            self.net.call_at(deadline, lambda now: self._tick(now, deadline))

    def _tick(self, now: float, deadline: float) -> None:
        if deadline != self._scheduled:
            return  # an earlier deadline was scheduled since
        self._scheduled = math.inf
        if self.up:
            self.core.tick(now)
        self.after_input()


class SimRouting:
    """Owns one :class:`SimRouter` per node and the shared agent table."""

    def __init__(self, net: SimNetwork) -> None:
        self.net = net
        self.hosts: dict[str, str] = {}
        self.routers = {name: SimRouter(self, node) for name, node in net.nodes.items()}
        self.agents: dict[str, SimAgent] = {}
        self.frames = 0
        self.lost = 0
        self.patterns: dict[str, set[str]] = {}  # node -> patterns it subscribes to
        net.listeners.append(self._on_member_event)

    def subscribe(self, node: str, pattern: str) -> SimSubscriber:
        """A client of ``node`` subscribes to ``pattern``; every other node learns it."""
        subscriber = SimSubscriber()
        self.routers[node].core.signals.subscribe(pattern, subscriber)
        self.routers[node].core.signals.take_adverts()
        self.patterns.setdefault(node, set()).add(pattern)
        for name, router in self.routers.items():
            if name != node:
                router.core.signals.set_host_patterns(node, self.patterns[node])
        return subscriber

    def serve(self, name: str, host: str, **kwargs: Any) -> SimAgent:
        router = self.routers[host]
        agent = SimAgent(name, router, **kwargs)
        self.hosts[name] = host
        self.agents[name] = agent
        router.core.local.attach(LocalAgent(_entry(name, host), agent, agent))
        return agent

    def restart(self, name: str) -> SimRouter:
        """``name``'s process restarted (see :meth:`SimNetwork.restart`): a fresh routing
        core, serving nothing until agents are served again."""
        old = self.routers[name]
        old.alive = False
        router = self.routers[name] = SimRouter(self, old.node)
        for agent, host in list(self.hosts.items()):
            if host == name:
                del self.hosts[agent]
        return router

    def arrive(self, now: float, src: str, dst: str, frame: bytes) -> None:
        target = self.net.nodes[dst]
        if target.state == "killed":
            # The host resets the connection: the sender hears of it a leg later.
            back = self.net.tcp_leg(dst, src)
            if back is not None:
                self.net.call_at(now + back, lambda t: self._link_lost(src, dst))
            return
        if target.state != "up":
            return  # crashed or paused: the segment is lost with the connection
        router = self.routers[dst]
        router.core.receive(now, src, frame)
        router.after_input()

    def _link_lost(self, node: str, peer: str) -> None:
        router = self.routers[node]
        if router.up:
            router.core.link_lost(peer)
            router.after_input()

    def _on_member_event(self, node: SimNode, event: MemberEvent) -> None:
        router = self.routers.get(node.name)
        member = event.member.name
        if router is None or member == node.name or not router.up:
            return
        if event.kind in (EventKind.DEAD, EventKind.LEAVE):
            router.core.host_down(self.net.now, member)
        elif event.kind in (EventKind.JOIN, EventKind.ALIVE):
            router.core.host_up(member)
        router.after_input()

    def start(self, node: str, call: Callable[[RoutingCore], None]) -> None:
        """Run ``call`` on ``node``'s core now (start calls with it), then schedule."""
        router = self.routers[node]
        call(router.core)
        router.after_input()
