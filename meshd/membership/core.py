"""The SWIM + Lifeguard membership state machine, sans IO.

Inputs: :meth:`Membership.handle_packet` (a decrypted UDP datagram), :meth:`handle_stream`
(a request frame from a TCP stream, answered synchronously), :meth:`stream_result` (the reply
to a stream this core asked for, or why it failed) and :meth:`tick` (timers are due).
Outputs: :meth:`take_outputs` (packets, stream requests, membership events) and
:meth:`next_deadline`. Time is whatever monotonic ``now`` the caller passes in.

Rules, after SWIM, Lifeguard and memberlist:

* Probing is randomized round-robin. A probe that gets no ack within the (awareness-scaled)
  timeout asks ``indirect_checks`` relays to ping the target (they nack on silence) and tries
  the target over TCP. No ack by the end of the interval makes the target suspect.
* A suspect refutes by gossiping ``alive`` with a higher incarnation. Suspicion times out to
  dead after a timeout that shrinks from max to min with independent confirmations.
* ``dead`` and ``left`` are final for their incarnation; a member comes back only with a
  higher one. ``left`` (graceful) is distinct from ``dead`` (failed).
* Gossip rides on every probe packet and on a periodic gossip round, newest and least sent
  first, each item at most mult · ⌈log10(n + 1)⌉ times.
* Push-pull exchanges full state over TCP with a random member; reconnect attempts to dead
  members and seeds make two sides of a healed partition merge without operator action.
* Members dead longer than ``reconnect_timeout`` (left longer than ``left_reclaim``) are
  reaped: forgotten, with a ``reap`` event. An operator may remove a dead member at once
  (:meth:`Membership.remove`): it is marked left here and a ``left`` message tells the rest.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypeVar

from meshd.config.model import MembershipTuning
from meshd.membership.awareness import Awareness
from meshd.membership.broadcast import BroadcastQueue, retransmit_limit
from meshd.membership.estimates import PeerEstimate, relay_count
from meshd.membership.events import (
    EventKind,
    MemberEvent,
    MemberView,
    Output,
    ResolveSeeds,
    SendPacket,
    StreamFailure,
    StreamRequest,
)
from meshd.membership.suspicion import Suspicion, detector_bounds, expected_confirmations
from meshd.rejections import Rejections
from meshd.timers import TimerHeap
from meshd.wire import membership as wire
from meshd.wire import packet
from meshd.wire.membership import (
    Ack,
    Alive,
    Dead,
    Left,
    MemberState,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Status,
    Suspect,
)
from meshd.wire.validate import Address, WireError
from meshd_client.protocol import errors

_SEQ_MASK = 2**32 - 1
_MAX_CONFIRMATION_PROBES = 3
_ENDED_PROBES = 256  # failed probes remembered, so that a late ack still tells how late
_VERDICT_TIMEOUTS = 3  # an early verdict: the direct timeout, then twice that for relays
_RELAY_SHARE = 0.8  # of the prober's indirect phase a relay may wait before its nack


@dataclass(slots=True)
class MembershipStats(Rejections):
    """Plain counters, read by the metrics exporter at scrape time."""

    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    messages_in: int = 0
    duplicates: int = 0
    probes: int = 0
    probe_failures: int = 0
    indirect_probes: int = 0
    tcp_fallback_acks: int = 0
    nacks_sent: int = 0
    nacks_received: int = 0
    suspicions: int = 0
    refutations: int = 0
    reannouncements: int = 0
    dead_downgraded: int = 0
    deaths: int = 0
    deaths_by_refusal: int = 0
    conflicts: int = 0
    reaped: int = 0  # members forgotten (dead or left for long enough)
    removed: int = 0  # dead members removed by an operator (marked left)
    push_pulls: int = 0
    join_attempts: int = 0
    reconnect_attempts: int = 0
    join_failures: int = 0  # join rounds in which no seed answered
    gossip_packets: int = 0


@dataclass(slots=True)
class _Member:
    name: str
    addr: Address
    incarnation: int
    status: Status
    tags: dict[str, str]
    status_since: float
    suspicion: Suspicion | None = None
    timer_gen: int = 0  # bumps invalidate pending suspicion timers
    refused: bool = False  # declared dead with refusal evidence: its process is gone

    def view(self) -> MemberView:
        return MemberView(
            self.name, self.addr, self.incarnation, self.status, dict(self.tags), self.status_since
        )

    def state(self) -> MemberState:
        return MemberState(self.name, self.addr, self.incarnation, self.status, self.tags)


@dataclass(slots=True)
class _Probe:
    seq: int
    target: str
    started: float
    acked: bool = False
    nacks: int = 0
    expected_nacks: int = 0
    tcp_token: int | None = None
    finished: bool = False
    refused: bool = False  # the TCP fallback was refused by the target's host
    timeout: float = 0.0  # the direct phase (adaptive, awareness-scaled)
    confirmation: bool = False  # checks someone else's suspicion
    direct_counted: bool = False  # the direct path's outcome went into the loss estimate
    verdict: bool = False  # judged early: every relay nacked, so no need to wait the interval


@dataclass(slots=True)
class _Relay:
    source_addr: Address
    seq: int
    nack: bool
    target: str = ""
    target_addr: Address | None = None
    sent: float = 0.0


class StreamPurpose(enum.Enum):
    """Why the core opened a TCP stream, so its reply goes back to the right step."""

    PROBE = "probe"  # the TCP fallback of a probe
    PUSH_PULL = "push_pull"  # the periodic full-state exchange
    JOIN = "join"  # an attempt to join through a seed
    RECONNECT = "reconnect"  # a try to merge with a dead member or a seed again


class MemberPeek(NamedTuple):
    """What :meth:`Membership.peek` reports about one member, without copying its tags."""

    status: Status
    tags: dict[str, str]  # the member's own dict: read it, never modify it
    since: float  # when the status last changed (core time)


A = TypeVar("A")


@dataclass(slots=True)
class _StreamAsked:
    """A TCP stream this core asked its driver for, awaiting the driver's result: why it
    was asked (so the reply goes back to the right step), and for which probe or peer."""

    purpose: StreamPurpose
    seq: int = 0
    addr: Address = ("", 0)


class Membership:
    """One node's view of the cluster. Not thread-safe; one driver owns it."""

    def __init__(
        self,
        *,
        name: str,
        addr: Address,
        tuning: MembershipTuning,
        rng: random.Random,
        now: float,
        tags: dict[str, str] | None = None,
        packet_budget: int | None = None,
        seen_limit: int = 4096,
    ) -> None:
        self.name = name
        self.addr = addr
        self.tuning = tuning
        self.rng = rng
        self.stats = MembershipStats()
        self.awareness = Awareness(tuning.awareness_max_multiplier)
        # Bytes of plaintext a UDP packet may carry (the driver subtracts envelope overhead).
        self.packet_budget = packet_budget if packet_budget is not None else tuning.udp_packet_size
        self._members: dict[str, _Member] = {}
        self._self = _Member(name, addr, 0, Status.ALIVE, dict(tags or {}), now)
        self._members[name] = self._self
        self._alive_count = 1
        # Names of other members that are alive or suspect, for O(1) random peer sampling.
        self._up: list[str] = []
        self._up_pos: dict[str, int] = {}
        self._recently_down: list[str] = []
        self._queue = BroadcastQueue()
        self._seen: dict[bytes, None] = {}  # recently seen gossip items, oldest first
        self._seen_limit = seen_limit
        self._outputs: list[Output] = []
        self._timers = TimerHeap()
        self._seq = rng.getrandbits(32)
        self._token = 0
        self._probes: dict[int, _Probe] = {}
        self._relays: dict[int, _Relay] = {}
        self._streams: dict[int, _StreamAsked] = {}
        self._probe_order: list[str] = []
        self._estimates: dict[str, PeerEstimate] = {}
        # (when, value) of the longest measured probe timeout (see _slowest_timeout)
        self._slowest: tuple[float, float] = (-math.inf, 0.0)
        self._ended: dict[int, tuple[str, float]] = {}  # failed probe seq -> (target, started)
        self._probe_index = 0
        self._confirmation_probes = 0
        self._seeds: tuple[Address, ...] = ()
        # Seeds that follow DNS: ask the driver to look them up before every join attempt and
        # before retrying them while alone (:class:`ResolveSeeds`); one lookup at a time.
        self.resolves_seeds = False
        self._resolving: Literal["join", "reconnect"] | None = None
        self._join_pending: set[int] = set()
        self._join_failures = 0
        self.joined = False
        self.leaving = False
        self._started = False
        self._alone_since: float | None = now
        # Lease renewal (keep_majority placement): while on, every member up is pinged every
        # ``_lease_every`` seconds; ``_acked_at`` keeps, per member, the send time of the
        # latest of our pings (lease or probe) it answered directly.
        self._lease_every: float | None = None
        self._lease_pings: dict[int, tuple[str, float]] = {}
        self._acked_at: dict[str, float] = {}

    # ------------------------------------------------------------------ public: lifecycle

    def start(self, now: float, seeds: Sequence[Address] = ()) -> None:
        """Begin probing, gossiping and (if there are seeds) joining."""
        if self._started:
            return
        self._started = True
        self.set_seeds(seeds)
        self._queue.push(self.name, wire.encode(self._alive_msg()))
        t = self.tuning
        self._at(now + self.rng.uniform(0, t.probe_interval), self._probe_tick, None)
        self._at(now + self.rng.uniform(0, t.gossip_interval), self._gossip_tick, None)
        self._at(
            now + self._push_pull_interval() * (0.5 + self.rng.random()), self._push_pull_tick, None
        )
        self._at(now + t.reconnect_interval * (0.5 + self.rng.random()), self._reconnect_tick, None)
        if self._seeds:
            self._try_seeds(now)  # just resolved by the driver: no second lookup at start
        elif self.resolves_seeds:
            self._join_attempt(now, None)
        else:
            self.joined = True

    def join(self, now: float) -> None:
        """Try the seeds now (they changed, or resolved late); retries as at start."""
        if (self._seeds or self.resolves_seeds) and not self.leaving:
            self.joined = False
            self._join_failures = 0
            self._join_attempt(now, None)

    def set_seeds(self, seeds: Sequence[Address]) -> None:
        self._seeds = tuple(s for s in dict.fromkeys(seeds) if s != self.addr)

    @property
    def seeds(self) -> tuple[Address, ...]:
        return self._seeds

    def seeds_resolved(self, now: float, seeds: Sequence[Address]) -> None:
        """The driver's answer to :class:`ResolveSeeds`: the seeds as they resolve now (empty
        if nothing did). Carries on with what the lookup was for: a join attempt (an empty
        answer counts as a failed one and is retried with backoff), or a reconnect."""
        purpose, self._resolving = self._resolving, None
        if purpose is None:
            return
        self.set_seeds(seeds)
        if purpose == "reconnect":
            self._reconnect_seeds(unknown_only=True)
        elif not self.joined and not self.leaving:
            if self._seeds:
                self._try_seeds(now)
            elif self.addr in seeds:
                # The name resolves to this node alone: it is the first member (a Service
                # with one pod so far), joined at once as a node without seeds would be. The
                # lookups every reconnect_interval bring in the members that come later.
                self.joined = True
            else:
                self._join_failed(now)

    def leave(self, now: float) -> None:
        """Announce a graceful leave; the driver waits for :meth:`leave_done` then stops."""
        if self.leaving:
            return
        self.leaving = True
        me = self._self
        me.status = Status.LEFT
        me.status_since = now
        self._queue.push(self.name, wire.encode(Left(self.name, me.incarnation)))
        # Push it out right away instead of waiting for the next gossip round.
        self._gossip_tick(now, None, reschedule=False)

    def leave_done(self) -> bool:
        """True once the leave announcement used up its transmits (or nobody is left to tell)."""
        return not self._queue.pending(self.name) or self._alive_count <= 1

    def remove(self, now: float, name: str) -> bool:
        """An operator takes a dead member out of the cluster (Serf's ``force-leave``).

        The member is marked left here and a ``left`` message at its incarnation tells every
        other member to do the same, so it leaves every majority's reference at once instead
        of after ``reconnect_timeout``. Only a dead member may be removed: removing one that
        answers would drop a working member from majorities (and it would refute anyway). Were
        it alive after all, behind a partition, it refutes when it hears, and comes back.

        Returns True if the member was removed now, False if it had already left. Raises
        NotFound (no such member), Invalid (this node) or Conflict (alive or suspect).
        """
        m = self._members.get(name)
        if m is None:
            raise errors.NotFound(f"no member named {name!r}")
        if m is self._self:
            raise errors.Invalid(
                f"{name} is this node; to take it out of the cluster, make it leave "
                "(meshctl leave, or stop the daemon)"
            )
        if m.status is Status.LEFT:
            return False
        if m.status is not Status.DEAD:
            raise errors.Conflict(
                f"{name} is {m.status.name.lower()}: only a dead member can be removed; "
                "stop it first or wait until it is declared dead",
                detail={"node": name, "status": m.status.name.lower()},
            )
        self._set_status(m, Status.LEFT, now)
        self.stats.removed += 1
        self._broadcast(name, Left(name, m.incarnation))
        self._emit(EventKind.LEAVE, m, now)
        # Spread it right away instead of waiting for the next gossip round.
        self._gossip_tick(now, None, reschedule=False)
        return True

    def set_tags(self, now: float, tags: dict[str, str]) -> None:
        """Change this node's tags: a new incarnation so the update wins everywhere."""
        if tags == self._self.tags:
            return
        self._self.tags = dict(tags)
        self._self.incarnation = min(wire.MAX_INCARNATION, self._self.incarnation + 1)
        self._queue.push(self.name, wire.encode(self._alive_msg()))
        self._emit(EventKind.UPDATE, self._self, now)

    # ------------------------------------------------------------------ public: queries

    @property
    def incarnation(self) -> int:
        return self._self.incarnation

    @property
    def alive_count(self) -> int:
        """Members believed alive or suspect, this node included."""
        return self._alive_count

    def members(self) -> list[MemberView]:
        return [m.view() for m in self._members.values()]

    def member(self, name: str) -> MemberView | None:
        m = self._members.get(name)
        return m.view() if m is not None else None

    def peek(self, name: str) -> MemberPeek | None:
        """A member's status, tags (do not modify) and status time, without copying: for
        hot paths such as registry liveness checks."""
        m = self._members.get(name)
        return MemberPeek(m.status, m.tags, m.status_since) if m is not None else None

    def died_refused(self, name: str) -> bool:
        """Was ``name`` declared dead with refusal evidence (its host answered, nothing
        listened) rather than on silence? Then it is known not to be running elsewhere."""
        m = self._members.get(name)
        return m is not None and m.status is Status.DEAD and m.refused

    def renew_lease(self, now: float, every: float | None) -> None:
        """Ping every member up each ``every`` seconds (None: stop), so that
        :meth:`acked_at` holds fresh evidence of who answered us. The placement lease needs
        acks from a majority within its length; the round-robin probes alone reach each member
        only once per ``n`` probe intervals."""
        was = self._lease_every
        self._lease_every = every
        if every is not None and was is None:
            self._at(now, self._lease_tick, None)

    def acked_at(self) -> dict[str, float]:
        """Per member, when we sent the latest ping it answered directly (our clock): proof
        that the member received something from us at that time or later. Do not modify."""
        return self._acked_at

    def broadcast_backlog(self) -> int:
        return len(self._queue)

    def take_outputs(self) -> list[Output]:
        out, self._outputs = self._outputs, []
        return out

    def next_deadline(self) -> float:
        return self._timers.next_deadline()

    # ------------------------------------------------------------------ public: inputs

    def tick(self, now: float) -> None:
        """Run every timer that is due at ``now``."""
        self._timers.run(now)

    def handle_packet(self, now: float, src: Address, data: bytes) -> None:
        """A decrypted UDP datagram from ``src``. Bad input is counted and dropped.

        A packet is validated completely before any of it is applied. Gossip items seen
        byte-for-byte before are skipped: incarnations only grow, so an exact duplicate can
        never change state, and under infection-style gossip most arrivals are duplicates.
        """
        self.stats.packets_in += 1
        self.stats.bytes_in += len(data)
        try:
            parts = packet.split(data)
            messages: list[tuple[Message, bytes | None]] = []
            seen = self._seen
            fresh: dict[bytes, None] = {}  # committed to `seen` only if the packet is valid
            duplicates = 0
            for raw in parts:
                if raw in seen or raw in fresh:
                    duplicates += 1
                    continue
                msg = packet.decode_part(raw)
                if isinstance(msg, Alive | Suspect | Dead | Left):
                    fresh[raw] = None
                    messages.append((msg, raw))
                else:
                    messages.append((msg, None))
        except WireError:
            self.stats.reject("malformed_packet")
            return
        self.stats.duplicates += duplicates
        seen.update(fresh)
        while len(seen) > self._seen_limit:
            del seen[next(iter(seen))]
        self.stats.messages_in += len(messages)
        for msg, gossip_bytes in messages:
            self._dispatch(now, src, msg, gossip_bytes)

    def handle_stream(self, now: float, src: Address, data: bytes) -> bytes | None:
        """A request frame from a TCP stream; returns the reply frame payload (or None)."""
        try:
            msg = wire.decode(data)
        except WireError:
            self.stats.reject("malformed_stream")
            return None
        if isinstance(msg, PushPull):
            self.stats.push_pulls += 1
            self._merge(now, msg)
            return wire.encode(self._local_state(join=False))
        if isinstance(msg, Ping):
            if msg.target != self.name:
                self.stats.reject("ping_wrong_target")
                return None
            return wire.encode(Ack(msg.seq))
        self.stats.reject("unexpected_stream_message")
        return None

    def stream_result(
        self, now: float, token: int, reply: bytes | None, failure: StreamFailure | None
    ) -> None:
        """The outcome of a :class:`StreamRequest`: a reply payload, or why there is none."""
        ctx = self._streams.pop(token, None)
        if ctx is None:
            return
        msg: Message | None = None
        if reply is not None:
            try:
                msg = wire.decode(reply)
            except WireError:
                self.stats.reject("malformed_stream_reply")
        if ctx.purpose is StreamPurpose.PROBE:
            self._probe_stream_result(now, ctx.seq, msg, failure)
        else:
            ok = isinstance(msg, PushPull)
            if ok:
                assert isinstance(msg, PushPull)
                self._merge(now, msg)
            if ctx.purpose is StreamPurpose.JOIN:
                self._join_result(now, token, ok)

    # ------------------------------------------------------------------ timers

    def _at(self, when: float, fn: Callable[[float, A], None], arg: A) -> None:
        self._timers.at(when, fn, arg)

    # ------------------------------------------------------------------ output helpers

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & _SEQ_MASK
        return self._seq

    def _send(self, addr: Address, messages: Iterable[Message], piggyback: bool = True) -> None:
        parts = [wire.encode(m) for m in messages]
        if piggyback:
            used = packet.size(parts)
            parts.extend(
                self._queue.take(
                    self.packet_budget - used,
                    self._retransmit_limit(),
                    packet.ITEM_OVERHEAD,
                    max_items=packet.MAX_MESSAGES - len(parts),
                )
            )
        data = packet.build(parts)
        self.stats.packets_out += 1
        self.stats.bytes_out += len(data)
        self._outputs.append(SendPacket(addr, data))

    def _stream(self, addr: Address, msg: Message, ctx: _StreamAsked, timeout: float) -> int:
        self._token += 1
        self._streams[self._token] = ctx
        self._outputs.append(StreamRequest(self._token, addr, wire.encode(msg), timeout))
        return self._token

    def _emit(self, kind: EventKind, member: _Member, now: float) -> None:
        self._outputs.append(MemberEvent(kind, member.view(), now))

    def _unsee(self, raw: bytes | None) -> None:
        """Forget rejected gossip: the same bytes may be acceptable later (the old entry died,
        the table has room again), so they must not be skipped as a duplicate then."""
        if raw is not None:
            self._seen.pop(raw, None)

    def _broadcast(self, key: str, msg: Message, raw: bytes | None = None) -> None:
        """Queue gossip; ``raw`` is the message's received encoding, re-sent as is."""
        self._queue.push(key, raw if raw is not None else wire.encode(msg))

    def _retransmit_limit(self) -> int:
        return retransmit_limit(self.tuning.retransmit_mult, self._alive_count)

    def _alive_msg(self) -> Alive:
        me = self._self
        return Alive(self.name, me.incarnation, self.addr, me.tags)

    def _local_state(self, join: bool) -> PushPull:
        return PushPull(join, self.name, tuple(m.state() for m in self._members.values()))

    # ------------------------------------------------------------------ status bookkeeping

    def _set_status(self, m: _Member, status: Status, now: float) -> None:
        was_up = m.status.up
        is_up = status.up
        if was_up != is_up:
            self._alive_count += 1 if is_up else -1
            if m is not self._self:
                self._track_up(m.name, is_up)
                if not is_up:
                    self._recently_down.append(m.name)
            if self._alive_count <= 1 and self._alone_since is None:
                self._alone_since = now
            elif self._alive_count > 1:
                self._alone_since = None
        if status is not Status.SUSPECT:
            m.suspicion = None
            m.timer_gen += 1
        m.status = status
        m.status_since = now
        m.refused = False

    def _track_up(self, name: str, is_up: bool) -> None:
        if is_up:
            self._up_pos[name] = len(self._up)
            self._up.append(name)
            return
        pos = self._up_pos.pop(name)
        last = self._up.pop()
        if last != name:
            self._up[pos] = last
            self._up_pos[last] = pos

    def _sample_up(self, k: int, exclude: str | None = None) -> list[_Member]:
        """Up to ``k`` distinct random members that are alive or suspect."""
        pool = self._up
        if exclude is not None and exclude in self._up_pos:
            picks = self.rng.sample(pool, min(k + 1, len(pool)))
            names = [n for n in picks if n != exclude][:k]
        else:
            names = self.rng.sample(pool, min(k, len(pool)))
        return [self._members[n] for n in names]

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self, now: float, src: Address, msg: Message, raw: bytes | None) -> None:
        if isinstance(msg, Ping):
            self._on_ping(now, src, msg)
        elif isinstance(msg, Ack):
            self._on_ack(now, src, msg)
        elif isinstance(msg, Alive):
            self._on_alive(now, msg, raw)
        elif isinstance(msg, Suspect):
            self._on_suspect(now, msg, raw)
        elif isinstance(msg, Dead):
            self._on_dead(now, msg, raw)
        elif isinstance(msg, Left):
            self._on_left(now, msg, raw)
        elif isinstance(msg, PingReq):
            self._on_ping_req(now, src, msg)
        elif isinstance(msg, Nack):
            self._on_nack(now, msg)
        else:
            self.stats.reject("unexpected_message")

    # ------------------------------------------------------------------ probing

    def _probe_tick(self, now: float, _arg: object) -> None:
        interval = self.awareness.scale(self.tuning.probe_interval)
        self._at(now + interval, self._probe_tick, None)
        if self.leaving:
            return
        target = self._next_probe_target()
        if target is not None:
            self._start_probe(now, target)

    def _next_probe_target(self) -> _Member | None:
        """Randomized round-robin: walk a shuffled list, reshuffle after each full pass."""
        for _ in range(2):
            while self._probe_index < len(self._probe_order):
                name = self._probe_order[self._probe_index]
                self._probe_index += 1
                m = self._members.get(name)
                if m is not None and m.status.up:
                    return m
            self._probe_order = [
                n for n, m in self._members.items() if n != self.name and m.status.up
            ]
            self.rng.shuffle(self._probe_order)
            self._probe_index = 0
            if not self._probe_order:
                return None
        return None

    def _lease_tick(self, now: float, _arg: object) -> None:
        every = self._lease_every
        if every is None:
            return
        self._at(now + every, self._lease_tick, None)
        # Unanswered pings are forgotten after a few rounds (insertion order is send order).
        while self._lease_pings:
            seq = next(iter(self._lease_pings))
            if self._lease_pings[seq][1] >= now - 4 * every:
                break
            del self._lease_pings[seq]
        if self.leaving:
            return
        for name in self._up:
            member = self._members[name]
            seq = self._next_seq()
            self._lease_pings[seq] = (name, now)
            self._send(member.addr, [Ping(seq, name, self.name)], piggyback=False)

    def _lease_acked(self, name: str, sent: float) -> None:
        if sent > self._acked_at.get(name, -math.inf):
            self._acked_at[name] = sent

    def _estimate(self, name: str) -> PeerEstimate:
        est = self._estimates.get(name)
        if est is None:
            est = self._estimates[name] = PeerEstimate()
        return est

    def _timeout_for(self, now: float, name: str) -> float:
        """The direct probe timeout for ``name`` (before awareness scaling): adaptive to its
        measured round trip, between ``probe_timeout_min`` and ``probe_timeout``. A member
        not measured yet (just joined, or not probed yet in a young cluster) gets the longest
        timeout of the members that are: on one network its round trip is like theirs, and the
        slowest of them keeps a far newcomer from being judged by its near neighbours. With
        nobody measured, the full ``probe_timeout``."""
        t = self.tuning
        est = self._estimates.get(name)
        if est is not None and est.srtt is not None:
            return est.probe_timeout(t.probe_timeout_min, t.probe_timeout)
        return self._slowest_timeout(now)

    def _slowest_timeout(self, now: float) -> float:
        """The longest probe timeout among measured members, recomputed at most once a probe
        interval (a scan of every estimate; probes and ping-reqs come many times a second)."""
        at, value = self._slowest
        if now - at < self.tuning.probe_interval:
            return value
        t = self.tuning
        lo, hi = t.probe_timeout_min, t.probe_timeout
        measured = [e.probe_timeout(lo, hi) for e in self._estimates.values() if e.srtt is not None]
        value = max(measured) if measured else hi
        self._slowest = (now, value)
        return value

    def _stall_sample(self, now: float, name: str, seconds: float) -> None:
        self._estimate(name).stall_sample(now, seconds, self.tuning.stall_memory)

    def _start_probe(self, now: float, target: _Member, *, confirmation: bool = False) -> None:
        seq = self._next_seq()
        timeout = self.awareness.scale(self._timeout_for(now, target.name))
        probe = _Probe(seq, target.name, now, timeout=timeout, confirmation=confirmation)
        self._probes[seq] = probe
        self.stats.probes += 1
        msgs: list[Message] = [Ping(seq, target.name, self.name)]
        if target.status is Status.SUSPECT:
            # Lifeguard's buddy system: tell the suspect directly so it can refute at once.
            msgs.append(Suspect(target.name, target.incarnation, self.name))
            if target.suspicion is not None and target.suspicion.told is None:
                target.suspicion.told = now
        self._send(target.addr, msgs)
        interval = self.awareness.scale(self.tuning.probe_interval)
        self._at(now + timeout, self._probe_timeout, seq)
        self._at(now + interval, self._probe_end, (seq, confirmation))

    def _probe_timeout(self, now: float, seq: int) -> None:
        probe = self._probes.get(seq)
        if probe is None or probe.acked:
            return
        target = self._members.get(probe.target)
        if target is None or not target.status.up:
            return
        t = self.tuning
        est = self._estimate(target.name)
        if not probe.direct_counted:
            probe.direct_counted = True
            est.direct_outcome(False)
        # More relays where the direct path is lossy, and all of them for a check of someone
        # else's suspicion: a confirmation shortens the suspect's time to refute.
        wanted = (
            t.indirect_checks_max
            if probe.confirmation
            else relay_count(t.indirect_checks, t.indirect_checks_max, est.loss)
        )
        relays = [m for m in self._sample_up(wanted + 2, target.name) if m.status is Status.ALIVE][
            :wanted
        ]
        for relay in relays:
            self._send(relay.addr, [PingReq(seq, target.name, target.addr, self.name, True)])
        probe.expected_nacks = len(relays)
        self.stats.indirect_probes += len(relays)
        interval = self.awareness.scale(t.probe_interval)
        if t.tcp_fallback_probe:
            remaining = max(0.05, probe.started + interval - now)
            probe.tcp_token = self._stream(
                target.addr,
                Ping(seq, target.name, self.name),
                _StreamAsked(StreamPurpose.PROBE, seq=seq),
                remaining,
            )
        verdict_at = probe.started + _VERDICT_TIMEOUTS * probe.timeout
        if relays and verdict_at < probe.started + interval:
            self._at(verdict_at, self._probe_verdict, seq)

    def _probe_stream_result(
        self, now: float, seq: int, msg: Message | None, failure: StreamFailure | None
    ) -> None:
        probe = self._probes.get(seq)
        if probe is None or probe.acked or probe.finished:
            return
        if isinstance(msg, Ack) and msg.seq == seq:
            probe.acked = True
            self.stats.tcp_fallback_acks += 1
            if probe.verdict:
                self._stall_sample(now, probe.target, now - probe.started)
            return
        if failure == "refused":
            # The host answered with a reset. Judged with the relays' answers: a firewall that
            # rejects only us must not kill a member the relays can still reach.
            probe.refused = True

    def _probe_verdict(self, now: float, seq: int) -> None:
        """Judge a probe before its interval ends once every relay has said it could not reach
        the target either (a nack each) and the relays had twice the direct timeout: waiting
        out the interval would add nothing but time. Missing nacks wait for the end."""
        probe = self._probes.get(seq)
        if probe is None or probe.acked or probe.finished or probe.verdict:
            return
        if probe.expected_nacks == 0 or probe.nacks < probe.expected_nacks:
            return
        if now + 1e-9 < probe.started + _VERDICT_TIMEOUTS * probe.timeout:
            return
        target = self._members.get(probe.target)
        if target is None or not target.status.up:
            return
        probe.verdict = True
        self._fail_probe(now, probe, target)

    def _probe_end(self, now: float, arg: tuple[int, bool]) -> None:
        seq, confirmation = arg
        probe = self._probes.pop(seq, None)
        if confirmation:
            self._confirmation_probes -= 1
        if probe is None or probe.finished:
            return
        if probe.tcp_token is not None:
            self._streams.pop(probe.tcp_token, None)
        if probe.acked:
            if probe.expected_nacks == 0 and not probe.nacks:
                self.awareness.apply(-1)
            return
        self._ended[seq] = (probe.target, probe.started)
        while len(self._ended) > _ENDED_PROBES:
            del self._ended[next(iter(self._ended))]
        # Lifeguard: missing nacks from relays point at our own health, not the target's.
        if probe.expected_nacks > 0:
            self.awareness.apply(max(0, probe.expected_nacks - probe.nacks))
        else:
            self.awareness.apply(1)
        target = self._members.get(probe.target)
        if target is None or not target.status.up:
            return
        if probe.verdict:
            # Judged early already; a refusal that came since still proves the process gone.
            if probe.refused and self.tuning.refused_is_dead:
                self.stats.deaths_by_refusal += 1
                self._on_dead(now, Dead(target.name, target.incarnation, self.name, True))
            return
        self._fail_probe(now, probe, target)

    def _fail_probe(self, now: float, probe: _Probe, target: _Member) -> None:
        self.stats.probe_failures += 1
        if probe.refused and self.tuning.refused_is_dead:
            # Nothing listens where the member lived, and no relay reached it either: the
            # process is gone (its host is up). Proof enough to skip the suspicion.
            self.stats.deaths_by_refusal += 1
            self._on_dead(now, Dead(target.name, target.incarnation, self.name, True))
            return
        self._on_suspect(now, Suspect(target.name, target.incarnation, self.name))

    def _on_ping(self, now: float, src: Address, msg: Ping) -> None:
        if msg.target != self.name:
            self.stats.reject("ping_wrong_target")
            return
        self._send(src, [Ack(msg.seq)])

    def _on_ack(self, now: float, src: Address, msg: Ack) -> None:
        lease = self._lease_pings.pop(msg.seq, None)
        if lease is not None:
            name, sent = lease
            member = self._members.get(name)
            if member is not None and src == member.addr:
                self._lease_acked(name, sent)
                self._estimate(name).rtt_sample(now - sent)
            return
        probe = self._probes.get(msg.seq)
        if probe is not None:
            if probe.acked:
                return
            probe.acked = True
            target = self._members.get(probe.target)
            if target is not None and src == target.addr:
                self._lease_acked(probe.target, probe.started)
                est = self._estimate(probe.target)
                est.rtt_sample(now - probe.started)
                if not probe.direct_counted:
                    probe.direct_counted = True
                    est.direct_outcome(True)
            if probe.verdict:
                # We gave up on it too early: it answers, only slowly. Remember how slowly.
                self._stall_sample(now, probe.target, now - probe.started)
            return
        ended = self._ended.pop(msg.seq, None)
        if ended is not None:
            name, started = ended
            member = self._members.get(name)
            if member is not None and src == member.addr:
                # The answer to a probe that already failed: the member was alive, but
                # unresponsive for this long.
                self._estimate(name).rtt_sample(now - started)
                self._stall_sample(now, name, now - started)
            return
        relay = self._relays.pop(msg.seq, None)
        if relay is not None:
            self._send(relay.source_addr, [Ack(relay.seq)], piggyback=False)
            if src == relay.target_addr and relay.target in self._members:
                # Our own round trip to the target, measured on someone else's behalf.
                self._estimate(relay.target).rtt_sample(now - relay.sent)

    def _on_nack(self, now: float, msg: Nack) -> None:
        probe = self._probes.get(msg.seq)
        if probe is not None:
            probe.nacks += 1
            self.stats.nacks_received += 1
            if probe.nacks >= probe.expected_nacks:
                self._probe_verdict(now, msg.seq)

    def _on_ping_req(self, now: float, src: Address, msg: PingReq) -> None:
        if msg.target == self.name:
            self._send(src, [Ack(msg.seq)])
            return
        if len(self._relays) >= 1024:
            self.stats.reject("relay_table_full")
            return
        seq = self._next_seq()
        self._relays[seq] = _Relay(src, msg.seq, msg.nack, msg.target, msg.target_addr, now)
        self._send(msg.target_addr, [Ping(seq, msg.target, self.name)])
        # At most most of the prober's indirect phase, so that our nack reaches it before its
        # probe ends: a nack that comes too late reads as our silence (Lifeguard).
        t = self.tuning
        wait = min(
            self._timeout_for(now, msg.target), _RELAY_SHARE * (t.probe_interval - t.probe_timeout)
        )
        self._at(now + wait, self._relay_timeout, seq)

    def _relay_timeout(self, now: float, seq: int) -> None:
        relay = self._relays.pop(seq, None)
        if relay is not None and relay.nack:
            self.stats.nacks_sent += 1
            self._send(relay.source_addr, [Nack(relay.seq)], piggyback=False)

    # ------------------------------------------------------------------ gossip handlers

    def _on_alive(self, now: float, msg: Alive, raw: bytes | None = None) -> None:
        if msg.node == self.name:
            me = self._self
            if not self.leaving and (
                msg.incarnation > me.incarnation
                or (
                    msg.incarnation == me.incarnation
                    and (msg.addr != self.addr or msg.tags != me.tags)
                )
            ):
                self._refute(now, msg.incarnation)
            return
        m = self._members.get(msg.node)
        if m is None:
            if len(self._members) >= self.tuning.max_members:
                self.stats.reject("member_table_full")
                self._unsee(raw)
                return
            m = _Member(msg.node, msg.addr, msg.incarnation, Status.DEAD, dict(msg.tags), now)
            self._members[msg.node] = m
            self._set_status(m, Status.ALIVE, now)
            self._probe_order.insert(self.rng.randint(0, len(self._probe_order)), msg.node)
            self._broadcast(msg.node, msg, raw)
            self._emit(EventKind.JOIN, m, now)
            return
        reclaim = False
        if msg.addr != m.addr:
            if m.status not in (Status.DEAD, Status.LEFT):
                self.stats.conflicts += 1
                self.stats.reject("address_conflict")
                self._unsee(raw)
                return
            reclaim = True  # the node came back on another address (a new container, say)
        if msg.incarnation <= m.incarnation and not reclaim:
            return
        old_status, old_tags, old_addr = m.status, m.tags, m.addr
        if m.suspicion is not None and m.suspicion.told is not None and not reclaim:
            # A refutation after we told the member directly: it was alive all along, and
            # took this long to answer. Its next suspicion gets that much more time.
            self._stall_sample(now, m.name, now - m.suspicion.told)
        m.incarnation = msg.incarnation
        m.tags = dict(msg.tags)
        m.addr = msg.addr
        self._set_status(m, Status.ALIVE, now)
        self._broadcast(msg.node, msg, raw)
        if old_status in (Status.DEAD, Status.LEFT):
            self._emit(EventKind.JOIN, m, now)
        else:
            if old_status is Status.SUSPECT:
                self._emit(EventKind.ALIVE, m, now)
            if old_tags != m.tags or old_addr != m.addr:
                self._emit(EventKind.UPDATE, m, now)

    def _on_suspect(self, now: float, msg: Suspect, raw: bytes | None = None) -> None:
        if msg.node == self.name:
            self._accused(now, msg.incarnation)
            return
        m = self._members.get(msg.node)
        if m is None or msg.incarnation < m.incarnation:
            return
        if m.status is Status.SUSPECT and m.suspicion is not None:
            if msg.sender == self.name and self.awareness.score > 0:
                # Lifeguard's brake: while our own health is in doubt, our failed probe says
                # as much about us as about the suspect; it confirms nothing.
                return
            if m.suspicion.confirm(msg.sender):
                # Lifeguard shortens the timeout with each confirmation; a late one may pull
                # the deadline into the past. Still leave the accused one probe interval to
                # refute: the confirmation is evidence, not a reason to skip its chance.
                m.suspicion.not_before = now + self.tuning.probe_interval
                self._broadcast(msg.node, msg, raw)
                self._at(m.suspicion.deadline(), self._suspicion_timeout, (m.name, m.timer_gen))
                if msg.sender == self.name:
                    self._gossip_now(now)  # our confirmation counts everywhere, sooner
            return
        if m.status is not Status.ALIVE:
            return
        n = self._alive_count
        t = self.tuning
        lo, hi = detector_bounds(
            t.suspicion_mult,
            t.suspicion_max_timeout_mult,
            t.suspicion_min_timeout,
            n,
            t.probe_interval,
        )
        lo = self._stall_floor(now, m.name, lo, hi)
        k = expected_confirmations(t.suspicion_mult, n)
        if msg.sender == self.name:
            # Our own accusation: stretched by our local health multiplier. A node that keeps
            # missing acks and nacks is more likely cut off itself, and its suspicion may not
            # even reach the accused to be refuted (Lifeguard's reasoning, applied to timeouts).
            lo, hi = self.awareness.scale(lo), self.awareness.scale(hi)
        m.incarnation = msg.incarnation
        self._set_status(m, Status.SUSPECT, now)
        m.suspicion = Suspicion(now, lo, hi, k, accuser=msg.sender)
        self.stats.suspicions += 1
        self._broadcast(msg.node, msg, raw)
        self._emit(EventKind.SUSPECT, m, now)
        self._at(m.suspicion.deadline(), self._suspicion_timeout, (m.name, m.timer_gen))
        if msg.sender == self.name:
            self._gossip_now(now)  # the others start confirming (or the suspect refuting) now
        elif (
            self.tuning.accelerate_confirmations
            and self._confirmation_probes < _MAX_CONFIRMATION_PROBES
            and self.awareness.score == 0
            and not self.leaving
        ):
            # Check for ourselves now: our own failed probe is an independent confirmation.
            self._confirmation_probes += 1
            self._start_probe(now, m, confirmation=True)

    def _stall_floor(self, now: float, name: str, lo: float, hi: float) -> float:
        """The minimum for a suspicion of ``name``: ``lo``, but never less than
        ``suspicion_stall_mult`` times the longest stall recently seen from this member (a
        slow host gets the time it showed it needs), and never more than the maximum."""
        t = self.tuning
        est = self._estimates.get(name)
        if est is None or t.suspicion_stall_mult <= 0:
            return lo
        return min(hi, max(lo, t.suspicion_stall_mult * est.stall_now(now, t.stall_memory)))

    def _suspicion_timeout(self, now: float, arg: tuple[str, int]) -> None:
        name, gen = arg
        m = self._members.get(name)
        if m is None or m.timer_gen != gen or m.suspicion is None:
            return
        if m.suspicion.deadline() > now + 1e-9:
            return  # a later timer (from a reschedule) will handle it
        self._on_dead(now, Dead(name, m.incarnation, self.name))

    def _on_dead(self, now: float, msg: Dead, raw: bytes | None = None) -> None:
        if msg.node == self.name:
            self._accused(now, msg.incarnation)
            return
        m = self._members.get(msg.node)
        if m is None or msg.incarnation < m.incarnation:
            return
        if m.status in (Status.DEAD, Status.LEFT):
            return
        if m.status is Status.ALIVE and msg.sender != self.name and not msg.refused:
            # A verdict about a member we have not even suspected: its accuser may be the one
            # that is cut off (its suspicion never got out, so the member never heard it to
            # refute). Check for ourselves, and give the member its chance, first.
            self.stats.dead_downgraded += 1
            self._on_suspect(now, Suspect(msg.node, msg.incarnation, msg.sender))
            return
        m.incarnation = msg.incarnation
        self._set_status(m, Status.DEAD, now)
        m.refused = msg.refused
        self.stats.deaths += 1
        self._broadcast(msg.node, msg, raw)
        self._emit(EventKind.DEAD, m, now)
        if msg.sender == self.name:
            self._gossip_now(now)  # our verdict: spread it now, not at the next round

    def _on_left(self, now: float, msg: Left, raw: bytes | None = None) -> None:
        if msg.node == self.name:
            self._accused(now, msg.incarnation)
            return
        m = self._members.get(msg.node)
        if m is None or msg.incarnation < m.incarnation:
            return
        if m.status is Status.LEFT or (
            m.status is Status.DEAD and msg.incarnation == m.incarnation
        ):
            if m.status is Status.DEAD:
                # A leave that overtook the failure verdict: record the graceful reason.
                self._set_status(m, Status.LEFT, now)
                self._broadcast(msg.node, msg, raw)
                self._emit(EventKind.LEAVE, m, now)
            return
        m.incarnation = msg.incarnation
        self._set_status(m, Status.LEFT, now)
        self._broadcast(msg.node, msg, raw)
        self._emit(EventKind.LEAVE, m, now)

    def _accused(self, now: float, incarnation: int) -> None:
        """Someone says we are suspect, dead or gone."""
        if self.leaving:
            return
        if incarnation >= self._self.incarnation:
            self._refute(now, incarnation)
        elif not self._queue.pending(self.name):
            # A stale accusation: our refutation has not reached its sender. Gossip it again
            # (same incarnation) — its first transmits may all have gone to peers we cannot
            # reach, and without this we would stay dead in the eyes of the rest.
            self.stats.reannouncements += 1
            self._broadcast(self.name, self._alive_msg())

    def _refute(self, now: float, accused: int) -> None:
        """Someone thinks we are suspect/dead at ``accused``: outbid it."""
        me = self._self
        # Accusations are below the bound (the wire refuses others), so this outbids them.
        me.incarnation = min(wire.MAX_INCARNATION, max(me.incarnation, accused) + 1)
        self.stats.refutations += 1
        self.awareness.apply(1)  # being suspected hints that we are the slow one
        self._broadcast(self.name, self._alive_msg())

    # ------------------------------------------------------------------ gossip & push-pull

    def _gossip_tick(self, now: float, _arg: object, *, reschedule: bool = True) -> None:
        if reschedule:
            self._at(now + self.tuning.gossip_interval, self._gossip_tick, None)
        if not len(self._queue):
            return
        targets = self._sample_up(self.tuning.gossip_nodes)
        if self._recently_down and self.rng.random() < 0.5:
            # Gossip to the dead for a while, so a falsely accused node hears about it.
            horizon = now - self.tuning.gossip_to_dead
            self._recently_down = [
                n
                for n in self._recently_down
                if n in self._members
                and self._members[n].status in (Status.DEAD, Status.LEFT)
                and self._members[n].status_since >= horizon
            ]
            if self._recently_down:
                targets.append(self._members[self.rng.choice(self._recently_down)])
        for target in targets:
            parts = self._queue.take(
                self.packet_budget - packet.PACKET_OVERHEAD,
                self._retransmit_limit(),
                packet.ITEM_OVERHEAD,
                max_items=packet.MAX_MESSAGES,
            )
            if not parts:
                break
            data = packet.build(parts)
            self.stats.packets_out += 1
            self.stats.bytes_out += len(data)
            self.stats.gossip_packets += 1
            self._outputs.append(SendPacket(target.addr, data))

    def _gossip_now(self, now: float) -> None:
        """An extra gossip round at once (for news this node made: a suspicion, a
        confirmation, a verdict), besides the periodic ones."""
        self._gossip_tick(now, None, reschedule=False)

    def _push_pull_interval(self) -> float:
        """memberlist's pushPullScale: back off above 32 nodes so total traffic stays flat."""
        base = self.tuning.push_pull_interval
        n = self._alive_count
        if n <= 32:
            return base
        return base * (math.ceil(math.log2(n) - math.log2(32)) + 1)

    def _push_pull_tick(self, now: float, _arg: object) -> None:
        interval = self._push_pull_interval()
        self._at(now + interval * (0.75 + 0.5 * self.rng.random()), self._push_pull_tick, None)
        if self.leaving:
            return
        peers = [m for m in self._sample_up(3) if m.status is Status.ALIVE]
        if peers:
            peer = peers[0]
            self._stream(
                peer.addr,
                self._local_state(join=False),
                _StreamAsked(StreamPurpose.PUSH_PULL),
                self.tuning.tcp_timeout,
            )

    def _merge(self, now: float, remote: PushPull) -> None:
        """Apply a remote full state as if it arrived as gossip (dead is downgraded to suspect:
        we would rather check for ourselves than take a stale verdict on trust)."""
        for st in remote.members:
            if st.status is Status.ALIVE:
                self._on_alive(now, Alive(st.name, st.incarnation, st.addr, st.tags))
            elif st.status is Status.LEFT:
                if st.name not in self._members and st.name != self.name:
                    continue  # never learn a member only to record that it left
                self._on_left(now, Left(st.name, st.incarnation))
            elif st.name in self._members:
                self._on_suspect(now, Suspect(st.name, st.incarnation, remote.sender))

    # ------------------------------------------------------------------ join & reconnect

    def _join_attempt(self, now: float, _arg: object) -> None:
        if self.joined or self.leaving:
            return
        if self.resolves_seeds:
            self._resolve("join")  # the attempt goes on in seeds_resolved
        elif self._seeds:
            self._try_seeds(now)

    def _resolve(self, purpose: Literal["join", "reconnect"]) -> None:
        if self._resolving is None:
            self._resolving = purpose
            self._outputs.append(ResolveSeeds(purpose))
        elif purpose == "join":
            self._resolving = "join"  # a reconnect lookup in flight serves the join too

    def _try_seeds(self, now: float) -> None:
        self.stats.join_attempts += 1
        for seed in self._seeds:
            token = self._stream(
                seed,
                self._local_state(join=True),
                _StreamAsked(StreamPurpose.JOIN, addr=seed),
                self.tuning.tcp_timeout,
            )
            self._join_pending.add(token)

    def _join_result(self, now: float, token: int, ok: bool) -> None:
        if token not in self._join_pending:
            return
        self._join_pending.discard(token)
        if ok:
            self._join_pending.clear()
            self.joined = True
            self._join_failures = 0
            return
        if self._join_pending or self.joined:
            return
        self._join_failed(now)

    def _join_failed(self, now: float) -> None:
        """Every seed failed (or none resolved): retry with exponential backoff and jitter."""
        self._join_failures += 1
        self.stats.join_failures += 1
        t = self.tuning
        # Grows by half each time (1, 1.5, 2.25 … s): a whole cluster starting at once finds
        # its seeds quickly, a long outage still backs off to join_retry_max.
        delay = min(t.join_retry_max, t.join_retry_min * 1.5 ** (self._join_failures - 1))
        self._at(now + delay * (0.5 + 0.5 * self.rng.random()), self._join_attempt, None)

    def _reconnect_tick(self, now: float, _arg: object) -> None:
        t = self.tuning
        self._at(
            now + t.reconnect_interval * (0.75 + 0.5 * self.rng.random()),
            self._reconnect_tick,
            None,
        )
        self._reap(now)
        if self.leaving:
            return
        dead = [
            m
            for m in self._members.values()
            if m.status is Status.DEAD and now - m.status_since <= t.reconnect_timeout
        ]
        if dead:
            target = self.rng.choice(dead)
            self.stats.reconnect_attempts += 1
            self._stream(
                target.addr,
                self._local_state(join=True),
                _StreamAsked(StreamPurpose.RECONNECT),
                t.tcp_timeout,
            )
        if self.joined and self.resolves_seeds:
            # Seeds that follow DNS are looked up every reconnect_interval, and an address no
            # member has is dialled: a cluster that formed in pieces (pods that started at
            # once and each saw only some of the others) merges, as does one whose members
            # all restarted elsewhere while this node was alone.
            self._resolve("reconnect")
        elif (
            self.joined
            and self._seeds
            and self._alone_since is not None
            and now - self._alone_since >= t.reconnect_interval
        ):
            # Alone for a while (booted into a partition, or everyone else restarted): the
            # seeds are the only addresses we know; try them again.
            self._reconnect_seeds()

    def _reconnect_seeds(self, *, unknown_only: bool = False) -> None:
        known = {m.addr for m in self._members.values() if m.status.up} if unknown_only else set()
        for seed in self._seeds:
            if seed in known:
                continue
            self.stats.reconnect_attempts += 1
            self._stream(
                seed,
                self._local_state(join=True),
                _StreamAsked(StreamPurpose.RECONNECT),
                self.tuning.tcp_timeout,
            )

    def _reap(self, now: float) -> None:
        """Forget members that have been dead or gone long enough, each with a REAP event:
        a reaped dead member stops counting in majorities (see :mod:`.reference`)."""
        t = self.tuning
        for m in [
            m
            for m in self._members.values()
            if m is not self._self
            and (
                (m.status is Status.DEAD and now - m.status_since > t.reconnect_timeout)
                or (m.status is Status.LEFT and now - m.status_since > t.left_reclaim)
            )
        ]:
            del self._members[m.name]
            self._estimates.pop(m.name, None)
            self._acked_at.pop(m.name, None)
            self.stats.reaped += 1
            self._emit(EventKind.REAP, m, now)
