"""What the core tells its driver: packets, stream requests and membership events."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from meshd.wire.membership import Status
from meshd.wire.validate import Address

StreamFailure = Literal["refused", "timeout", "error"]


class EventKind(enum.Enum):
    JOIN = "join"  # a new member, or one back after dead/left
    UPDATE = "update"  # tags or address changed
    SUSPECT = "suspect"
    ALIVE = "alive"  # a suspect refuted the suspicion
    DEAD = "dead"
    LEAVE = "leave"  # left gracefully, or removed by an operator while dead
    REAP = "reap"  # forgotten: dead longer than reconnect_timeout, or left than left_reclaim


@dataclass(frozen=True, slots=True)
class MemberView:
    """An immutable snapshot of one member, safe to hand to other components."""

    name: str
    addr: Address
    incarnation: int
    status: Status
    tags: dict[str, str]
    status_since: float  # core time (monotonic seconds) of the last status change


@dataclass(frozen=True, slots=True)
class MemberEvent:
    kind: EventKind
    member: MemberView
    at: float


@dataclass(frozen=True, slots=True)
class SendPacket:
    """Send one UDP datagram (plaintext; the driver seals it)."""

    addr: Address
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """Open a TCP stream to ``addr``, send ``data``, read one reply frame, report via token."""

    token: int
    addr: Address
    data: bytes
    timeout: float


@dataclass(frozen=True, slots=True)
class ResolveSeeds:
    """Look the seeds up again (``dns:`` seeds) and answer with
    :meth:`~meshd.membership.core.Membership.seeds_resolved`: the core asks before every join
    attempt, and every ``reconnect_interval`` once joined (then it dials the addresses no
    member has), so a seed list that follows DNS (a Kubernetes headless Service, a round
    robin) is never stale when it is used."""

    purpose: Literal["join", "reconnect"]


Output = SendPacket | StreamRequest | ResolveSeeds | MemberEvent
