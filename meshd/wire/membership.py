"""Membership messages (SWIM + Lifeguard), their CBOR encoding and strict decoding.

A message is a CBOR array whose first item is its type code. Gossip (alive / suspect / dead /
left) rides piggybacked in compound packets; ping, ping-req, ack and nack drive failure
detection; push-pull carries a full state exchange over a TCP stream.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from meshd.wire.validate import (
    Address,
    WireError,
    addr_to_wire,
    expect_addr,
    expect_bool,
    expect_list,
    expect_name,
    expect_tags,
    expect_uint,
)
from meshd_client.protocol import cbor

MAX_PUSH_PULL_MEMBERS: Final = 100_000
# Incarnations are bounded (as memberlist's uint32): a node outbids an accusation by one, so
# an accusation is accepted only below the bound and an alive message up to it. One forged
# or buggy packet can then never push a node to a number it cannot outbid, or one that no
# longer encodes as a plain CBOR integer.
MAX_INCARNATION: Final = (1 << 32) - 1


class MsgType(enum.IntEnum):
    PING = 1
    PING_REQ = 2
    ACK = 3
    NACK = 4
    ALIVE = 5
    SUSPECT = 6
    DEAD = 7
    LEFT = 8
    PUSH_PULL = 9


class Status(enum.IntEnum):
    """A member's status as this node believes it. DEAD and LEFT are distinct end states."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3

    @property
    def up(self) -> bool:
        """Alive or suspect: believed reachable (a suspect may still refute). The one
        definition every component uses."""
        return self is Status.ALIVE or self is Status.SUSPECT


@dataclass(frozen=True, slots=True)
class Ping:
    """Direct probe. ``target`` lets a node at a reused address tell it is not the one meant."""

    seq: int
    target: str
    source: str

    def to_wire(self) -> list[Any]:
        return [MsgType.PING, self.seq, self.target, self.source]


@dataclass(frozen=True, slots=True)
class PingReq:
    """Indirect probe: a relay pings ``target`` for us; ``nack`` asks for a nack on silence."""

    seq: int
    target: str
    target_addr: Address
    source: str
    nack: bool

    def to_wire(self) -> list[Any]:
        return [
            MsgType.PING_REQ,
            self.seq,
            self.target,
            addr_to_wire(self.target_addr),
            self.source,
            self.nack,
        ]


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int

    def to_wire(self) -> list[Any]:
        return [MsgType.ACK, self.seq]


@dataclass(frozen=True, slots=True)
class Nack:
    """A relay's "I could not reach the target either" (Lifeguard: proves the relay is alive)."""

    seq: int

    def to_wire(self) -> list[Any]:
        return [MsgType.NACK, self.seq]


@dataclass(frozen=True, slots=True)
class Alive:
    node: str
    incarnation: int
    addr: Address
    tags: dict[str, str]

    def to_wire(self) -> list[Any]:
        return [MsgType.ALIVE, self.node, self.incarnation, addr_to_wire(self.addr), self.tags]


@dataclass(frozen=True, slots=True)
class Suspect:
    node: str
    incarnation: int
    sender: str

    def to_wire(self) -> list[Any]:
        return [MsgType.SUSPECT, self.node, self.incarnation, self.sender]


@dataclass(frozen=True, slots=True)
class Dead:
    """``node`` failed at ``incarnation``. ``refused`` carries the evidence: the sender's TCP
    probe was refused by the member's host (nothing listens there), which receivers accept
    at once; any other verdict about a member a receiver believes alive is checked as a
    suspicion first."""

    node: str
    incarnation: int
    sender: str
    refused: bool = False

    def to_wire(self) -> list[Any]:
        return [MsgType.DEAD, self.node, self.incarnation, self.sender, self.refused]


@dataclass(frozen=True, slots=True)
class Left:
    """A graceful leave, announced by the node itself: distinct from a failure."""

    node: str
    incarnation: int

    def to_wire(self) -> list[Any]:
        return [MsgType.LEFT, self.node, self.incarnation]


@dataclass(frozen=True, slots=True)
class MemberState:
    name: str
    addr: Address
    incarnation: int
    status: Status
    tags: dict[str, str]

    def to_wire(self) -> list[Any]:
        return [self.name, addr_to_wire(self.addr), self.incarnation, int(self.status), self.tags]


@dataclass(frozen=True, slots=True)
class PushPull:
    """Full state exchange (TCP). ``join`` marks the first exchange of a joining node."""

    join: bool
    sender: str
    members: tuple[MemberState, ...]

    def to_wire(self) -> list[Any]:
        return [MsgType.PUSH_PULL, self.join, self.sender, [m.to_wire() for m in self.members]]


Gossip = Alive | Suspect | Dead | Left
Message = Ping | PingReq | Ack | Nack | Alive | Suspect | Dead | Left | PushPull


def encode(msg: Message) -> bytes:
    return cbor.dumps(msg.to_wire())


def _member_state(value: Any) -> MemberState:
    items = expect_list(value, 5, 5, "member")
    status = expect_uint(items[3], "member.status", 3)
    # A member said to be anything but alive is an accusation: it must be one it can outbid.
    limit = MAX_INCARNATION if status == Status.ALIVE else MAX_INCARNATION - 1
    return MemberState(
        name=expect_name(items[0]),
        addr=expect_addr(items[1]),
        incarnation=expect_uint(items[2], "member.incarnation", limit),
        status=Status(status),
        tags=expect_tags(items[4]),
    )


def _ping(v: list[Any]) -> Message:
    expect_list(v, 4, 4, "ping")
    return Ping(expect_uint(v[1], "seq"), expect_name(v[2]), expect_name(v[3]))


def _ping_req(v: list[Any]) -> Message:
    expect_list(v, 6, 6, "ping_req")
    return PingReq(
        expect_uint(v[1], "seq"),
        expect_name(v[2]),
        expect_addr(v[3]),
        expect_name(v[4]),
        expect_bool(v[5], "nack"),
    )


def _ack(v: list[Any]) -> Message:
    expect_list(v, 2, 2, "ack")
    return Ack(expect_uint(v[1], "seq"))


def _nack(v: list[Any]) -> Message:
    expect_list(v, 2, 2, "nack")
    return Nack(expect_uint(v[1], "seq"))


def _alive(v: list[Any]) -> Message:
    expect_list(v, 5, 5, "alive")
    return Alive(
        expect_name(v[1]),
        expect_uint(v[2], "incarnation", MAX_INCARNATION),
        expect_addr(v[3]),
        expect_tags(v[4]),
    )


def _accused(value: Any) -> int:
    """The incarnation of an accusation (suspect, dead, left): one the accused can outbid."""
    return expect_uint(value, "incarnation", MAX_INCARNATION - 1)


def _suspect(v: list[Any]) -> Message:
    expect_list(v, 4, 4, "suspect")
    return Suspect(expect_name(v[1]), _accused(v[2]), expect_name(v[3]))


def _dead(v: list[Any]) -> Message:
    expect_list(v, 5, 5, "dead")
    return Dead(
        expect_name(v[1]),
        _accused(v[2]),
        expect_name(v[3]),
        expect_bool(v[4], "refused"),
    )


def _left(v: list[Any]) -> Message:
    expect_list(v, 3, 3, "left")
    return Left(expect_name(v[1]), _accused(v[2]))


def _push_pull(v: list[Any]) -> Message:
    expect_list(v, 4, 4, "push_pull")
    raw_members = expect_list(v[3], 0, MAX_PUSH_PULL_MEMBERS, "push_pull.members")
    return PushPull(
        expect_bool(v[1], "join"),
        expect_name(v[2]),
        tuple(_member_state(m) for m in raw_members),
    )


_DECODERS: Final[dict[int, Callable[[list[Any]], Message]]] = {
    MsgType.PING: _ping,
    MsgType.PING_REQ: _ping_req,
    MsgType.ACK: _ack,
    MsgType.NACK: _nack,
    MsgType.ALIVE: _alive,
    MsgType.SUSPECT: _suspect,
    MsgType.DEAD: _dead,
    MsgType.LEFT: _left,
    MsgType.PUSH_PULL: _push_pull,
}


def from_wire(value: Any) -> Message:
    """Validate one decoded CBOR item into a message; raises WireError on any mismatch."""
    if type(value) is not list or not value:
        raise WireError("message: expected an array starting with a type code")
    decoder = _DECODERS.get(value[0]) if type(value[0]) is int else None
    if decoder is None:
        raise WireError(f"message: unknown type {value[0]!r}")
    return decoder(value)


def decode(data: bytes) -> Message:
    try:
        return from_wire(cbor.loads(data))
    except cbor.CodecError as exc:
        raise WireError(str(exc)) from None
