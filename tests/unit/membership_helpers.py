"""Helpers for driving sans-IO membership cores by hand: no network, no sockets, no mocks.

A :class:`Node` wraps one :class:`Membership` core and records every output together with the
time it was emitted, so tests can ask "what was sent to whom, when". Time only moves when a
test says so (:meth:`Node.run`, :meth:`Node.step`), always through the core's own deadlines.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from meshd.config.model import MembershipTuning
from meshd.config.profiles import profile_tuning
from meshd.membership.core import Membership
from meshd.membership.events import (
    EventKind,
    MemberEvent,
    Output,
    SendPacket,
    StreamFailure,
    StreamRequest,
)
from meshd.wire import membership as wire
from meshd.wire import packet
from meshd.wire.membership import (
    Ack,
    Alive,
    MemberState,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Status,
)
from meshd.wire.validate import Address

LAN = profile_tuning("lan")
ADDR_A: Address = ("10.0.0.1", 7946)
M = TypeVar("M", bound=Message)

_BY_ADDR: dict[Address, str] = {ADDR_A: "a"}


def tuning(**changes: Any) -> MembershipTuning:
    """The LAN profile with some fields changed."""
    return dataclasses.replace(LAN, **changes)


def addr_for(name: str) -> Address:
    """A stable, distinct-looking IPv4 address for a member name (never 10.0.0.1)."""
    if name == "a":
        return ADDR_A
    d = hashlib.sha256(name.encode()).digest()
    address = (f"10.{d[0]}.{d[1]}.{d[2] % 250 + 2}", 7946)
    _BY_ADDR.setdefault(address, name)
    return address


def name_at(address: Address) -> str | None:
    return _BY_ADDR.get(address)


def alive(name: str, incarnation: int = 0, tags: dict[str, str] | None = None) -> Alive:
    return Alive(name, incarnation, addr_for(name), dict(tags or {}))


def state(name: str, status: Status, incarnation: int = 0) -> MemberState:
    return MemberState(name, addr_for(name), incarnation, status, {})


def build(*msgs: Message) -> bytes:
    return packet.build([wire.encode(m) for m in msgs])


def make_core(
    name: str = "a",
    address: Address | None = None,
    *,
    tune: MembershipTuning = LAN,
    seed: int = 1,
    now: float = 0.0,
    start: bool = True,
    seeds: Sequence[Address] = (),
    **kwargs: Any,
) -> Membership:
    core = Membership(
        name=name,
        addr=address if address is not None else addr_for(name),
        tuning=tune,
        rng=random.Random(seed),
        now=now,
        **kwargs,
    )
    if start:
        core.start(now, seeds)
    return core


class Node:
    """One core plus a time-stamped log of everything it emitted.

    ``answering`` names members that are up: a Ping sent to one of them is acked at once from
    the packet's address, and a PingReq sent to one of them (as a relay) is answered with an
    Ack when its target is answering too, else with a Nack (unless ``relays_nack`` is off:
    then with nothing). Everything else goes unanswered.
    """

    def __init__(self, core: Membership, now: float = 0.0) -> None:
        self.core = core
        self.now = now
        self.log: list[tuple[float, Output]] = []
        self.answering: set[str] = set()
        self.relays_nack = True
        self.collect(now)

    # ---------------------------------------------------------------- inputs

    def leave(self, now: float) -> None:
        self.now = now
        self.core.leave(now)
        self.collect(now)

    def remove(self, now: float, name: str) -> bool:
        self.now = now
        removed = self.core.remove(now, name)
        self.collect(now)
        return removed

    def set_tags(self, now: float, tags: dict[str, str]) -> None:
        self.now = now
        self.core.set_tags(now, tags)
        self.collect(now)

    def deliver(self, now: float, src: Address, data: bytes) -> None:
        self.now = now
        self.core.handle_packet(now, src, data)
        self.collect(now)

    def send(self, now: float, src: Address, *msgs: Message) -> None:
        self.deliver(now, src, build(*msgs))

    def stream(self, now: float, src: Address, msg: Message) -> Message | None:
        self.now = now
        reply = self.core.handle_stream(now, src, wire.encode(msg))
        self.collect(now)
        return None if reply is None else wire.decode(reply)

    def result(
        self,
        now: float,
        token: int,
        reply: Message | bytes | None,
        failure: StreamFailure | None = None,
    ) -> None:
        self.now = now
        data = wire.encode(reply) if reply is not None and not isinstance(reply, bytes) else reply
        self.core.stream_result(now, token, data, failure)
        self.collect(now)

    def forward(self, now: float, to: Node, since: float = float("-inf")) -> int:
        """Deliver to ``to`` every datagram this node sent to ``to``'s address at or after
        ``since`` (two cores talking over a perfect network); returns how many."""
        datagrams = [
            out
            for at, out in self.log
            if isinstance(out, SendPacket) and at >= since and out.addr == to.core.addr
        ]
        for out in datagrams:
            to.deliver(now, self.core.addr, out.data)
        return len(datagrams)

    def learn(self, now: float, names: Iterable[str]) -> None:
        """Tell the core about alive members (255 per packet at most)."""
        msgs = [alive(n) for n in names]
        for i in range(0, len(msgs), packet.MAX_MESSAGES):
            self.send(now, ("192.0.2.1", 7946), *msgs[i : i + packet.MAX_MESSAGES])

    # ---------------------------------------------------------------- time

    def step(self) -> float:
        """Run the timers at the next deadline; returns that time."""
        t = self.core.next_deadline()
        assert t != float("inf")
        self.now = max(self.now, t)
        self.core.tick(self.now)
        self.collect(self.now)
        return self.now

    def run(self, until: float) -> None:
        """Run every timer due up to and including ``until``; then the clock reads ``until``."""
        while self.core.next_deadline() <= until:
            self.step()
        self.now = max(self.now, until)

    def run_until_ping(self, limit: float = 10.0, target: str | None = None) -> tuple[float, Ping]:
        """Step until the core sends a Ping (to ``target``, if given); returns it and its time."""
        mark = len(self.log)
        while True:
            for at, addr, msg in self._find(Ping, self.log[mark:]):
                if target is None or msg.target == target:
                    assert addr == addr_for(msg.target)
                    return at, msg
            mark = len(self.log)
            assert self.step() <= limit, "no ping sent in time"

    # ---------------------------------------------------------------- outputs

    def collect(self, now: float) -> None:
        """Log the core's outputs (and feed it the answers of answering members)."""
        pending = self.core.take_outputs()
        while pending:
            replies: list[tuple[Address, Message]] = []
            for out in pending:
                self.log.append((now, out))
                if isinstance(out, SendPacket):
                    replies.extend(self._answers(out))
            for src, msg in replies:
                self.core.handle_packet(now, src, build(msg))
            pending = self.core.take_outputs()

    def _answers(self, out: SendPacket) -> list[tuple[Address, Message]]:
        if not self.answering:
            return []
        peer = name_at(out.addr)
        if peer not in self.answering:
            return []
        answers: list[tuple[Address, Message]] = []
        for msg in packet.parse(out.data):
            if isinstance(msg, Ping) and msg.target == peer:
                answers.append((out.addr, Ack(msg.seq)))
            elif isinstance(msg, PingReq):
                if msg.target in self.answering:
                    answers.append((out.addr, Ack(msg.seq)))
                elif self.relays_nack:
                    answers.append((out.addr, Nack(msg.seq)))
        return answers

    def sent(self, since: float = float("-inf")) -> list[tuple[float, Address, list[Message]]]:
        """Every datagram sent at or after ``since``, parsed."""
        return [
            (at, out.addr, packet.parse(out.data))
            for at, out in self.log
            if isinstance(out, SendPacket) and at >= since
        ]

    def datagrams(self) -> list[SendPacket]:
        return [out for _, out in self.log if isinstance(out, SendPacket)]

    def _find(
        self, kind: type[M], log: Iterable[tuple[float, Output]]
    ) -> list[tuple[float, Address, M]]:
        found: list[tuple[float, Address, M]] = []
        for at, out in log:
            if isinstance(out, SendPacket):
                found.extend(
                    (at, out.addr, m) for m in packet.parse(out.data) if isinstance(m, kind)
                )
        return found

    def find(self, kind: type[M], since: float = float("-inf")) -> list[tuple[float, Address, M]]:
        """Every message of ``kind`` sent at or after ``since``: (time, destination, message)."""
        return self._find(kind, [(at, out) for at, out in self.log if at >= since])

    def events(self, kind: EventKind | None = None, name: str | None = None) -> list[MemberEvent]:
        return [
            out
            for _, out in self.log
            if isinstance(out, MemberEvent)
            and (kind is None or out.kind is kind)
            and (name is None or out.member.name == name)
        ]

    def streams(self, since: float = float("-inf")) -> list[tuple[float, StreamRequest, Message]]:
        """Every stream request made at or after ``since``, with its decoded request message."""
        return [
            (at, out, wire.decode(out.data))
            for at, out in self.log
            if isinstance(out, StreamRequest) and at >= since
        ]

    def push_pulls(
        self, since: float = float("-inf"), *, join: bool | None = None
    ) -> list[tuple[float, StreamRequest, PushPull]]:
        return [
            (at, req, msg)
            for at, req, msg in self.streams(since)
            if isinstance(msg, PushPull) and (join is None or msg.join is join)
        ]

    def status(self, name: str) -> Status | None:
        view = self.core.member(name)
        return None if view is None else view.status


def cluster(
    names: Sequence[str] = ("b", "c", "d", "e"),
    *,
    tune: MembershipTuning = LAN,
    seed: int = 1,
    now: float = 0.0,
    answering: bool = False,
    **kwargs: Any,
) -> Node:
    """Core "a" at ADDR_A, started at ``now``, that has just learned ``names`` as alive."""
    node = Node(make_core(tune=tune, seed=seed, now=now, **kwargs), now)
    node.learn(now, names)
    if answering:
        node.answering = set(names)
    return node
