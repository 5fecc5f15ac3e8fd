"""Signal fan-out: this host's subscriptions, and which hosts want which topics.

A signal goes once to every host with a matching subscription, and there to every matching
local subscriber. Sans-IO: frames leave through a :class:`~meshd.routing.ports.Wire`, events
go to :class:`~meshd.routing.ports.EventSink` handles. Other hosts' patterns come in from
their registry documents (:meth:`Signals.set_host_patterns`). This host's own patterns are
written to its registry document by the driver: a pattern that gained its first or lost its
last local subscriber is marked (:meth:`Signals.take_adverts`) and ``wake`` is called, so the
driver writes in batches, whatever the number of subscriptions that come and go.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

from meshd.routing import messages, topics
from meshd.routing.limits import check_body
from meshd.routing.messages import Signal
from meshd.routing.ports import EventSink, Members, Wire
from meshd.routing.stats import RouterStats
from meshd_client.protocol.errors import MeshError


class Signals:
    """Owns the local subscriptions and the index of other hosts' patterns. Reads
    membership (only hosts it calls up are sent signals)."""

    def __init__(
        self, *, wire: Wire, members: Members, stats: RouterStats, wake: Callable[[], None]
    ) -> None:
        self.wire = wire
        self.members = members
        self.stats = stats
        self.wake = wake
        # Local subscriptions: pattern -> {token: sink}, and the patterns as an index.
        self._subscribers: dict[str, dict[int, EventSink]] = {}
        self._local_index = topics.PatternIndex()
        self._tokens = itertools.count()
        # Patterns whose first subscriber came or last one went since the driver last wrote.
        self._unadvertised: set[str] = set()
        # Other hosts' patterns: per host, and pattern -> hosts, indexed.
        self._host_patterns: dict[str, frozenset[str]] = {}
        self._pattern_hosts: dict[str, set[str]] = {}
        self._host_index = topics.PatternIndex()

    # ------------------------------------------------------------------ local subscriptions

    def subscribe(self, pattern: str, sink: EventSink) -> Callable[[], None]:
        """Deliver signals matching ``pattern`` to ``sink`` until the returned function is
        called. Both cost the same whatever the number of subscriptions held."""
        pattern = topics.check_pattern(pattern)
        token = next(self._tokens)
        sinks = self._subscribers.get(pattern)
        if sinks is None:
            sinks = self._subscribers[pattern] = {}
            self._local_index.add(pattern)
            self._mark(pattern)
        sinks[token] = sink

        def cancel() -> None:
            held = self._subscribers.get(pattern)
            if held is None or held.pop(token, None) is None:
                return
            if not held:
                del self._subscribers[pattern]
                self._local_index.discard(pattern)
                self._mark(pattern)

        return cancel

    def subscribed(self, pattern: str) -> bool:
        return pattern in self._subscribers

    def _mark(self, pattern: str) -> None:
        self._unadvertised.add(pattern)
        self.wake()

    def take_adverts(self) -> set[str]:
        """The patterns to write to (or remove from) this node's registry document."""
        changed, self._unadvertised = self._unadvertised, set()
        return changed

    # ------------------------------------------------------------------ other hosts

    def set_host_patterns(self, host: str, raw: Iterable[str]) -> None:
        """``host``'s registry document lists these patterns (invalid ones are ignored)."""
        found = []
        for pattern in raw:
            try:
                found.append(topics.check_pattern(pattern))
            except MeshError:
                continue
        patterns = frozenset(found)
        before = self._host_patterns.get(host, frozenset())
        if patterns == before:
            return
        for pattern in before - patterns:
            hosts = self._pattern_hosts.get(pattern)
            if hosts is not None:
                hosts.discard(host)
                if not hosts:
                    del self._pattern_hosts[pattern]
                    self._host_index.discard(pattern)
        for pattern in patterns - before:
            hosts = self._pattern_hosts.get(pattern)
            if hosts is None:
                hosts = self._pattern_hosts[pattern] = set()
                self._host_index.add(pattern)
            hosts.add(host)
        if patterns:
            self._host_patterns[host] = patterns
        else:
            self._host_patterns.pop(host, None)

    def hosts_for(self, topic: str) -> set[str]:
        """Other hosts with a subscription matching ``topic``."""
        remote: set[str] = set()
        for pattern in self._host_index.match(topic):
            remote |= self._pattern_hosts[pattern]
        return remote

    # ------------------------------------------------------------------ fan-out

    def publish(self, topic: str, event: dict[str, Any]) -> int:
        """Send a signal once to every host with a matching subscriber; returns the number
        of hosts (this one included) it went to."""
        topics.check_topic(topic)
        check_body(event, "signal")
        self.stats.signals_published += 1
        hosts = 0
        if self._local_index.match(topic):
            self.deliver(topic, event)
            hosts += 1
        remote = self.hosts_for(topic)
        if remote:
            frame = messages.encode(Signal(topic, event))
            for host in sorted(remote):  # one order whatever the hash seed (simulations)
                state = self.members.peek(host)
                if state is None or not state[0].up:
                    continue
                if self.wire.send(host, frame):
                    hosts += 1
        self.stats.signal_hosts += hosts
        return hosts

    def deliver(self, topic: str, event: dict[str, Any]) -> None:
        """Hand a signal to every local subscriber whose pattern matches ``topic``."""
        receivers = [
            sink
            for pattern in self._local_index.match(topic)
            for sink in self._subscribers[pattern].values()
        ]
        payload = {"topic": topic, "event": event}
        for sink in receivers:
            self.stats.signals_delivered += 1
            sink.offer(payload)
