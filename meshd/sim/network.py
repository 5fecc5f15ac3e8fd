"""A simulated network for membership cores, run in virtual time.

Every node is a real :class:`~meshd.membership.core.Membership` core; only the sockets and the
clock are simulated. Packets travel with per-link latency and loss, partitions can be one-way
or two-way, and nodes can crash (the host goes silent), be killed (the host answers TCP with a
reset), be paused (SIGSTOP: packets queue up, timers stall) and restart. One seed makes a run
reproducible: a single event heap orders everything, ties broken by insertion order.

Other layers run on the same clock and event heap through :meth:`SimNetwork.call_at`
(:mod:`meshd.sim.routing` carries ROUTING frames between routing cores this way).

Time advances through ``trio.sleep_until``, so under ``trio.testing.MockClock`` with
``autojump_threshold=0`` a simulated hour passes in however long the computation takes.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from meshd.config.model import MembershipTuning
from meshd.membership.core import Membership
from meshd.membership.events import (
    MemberEvent,
    ResolveSeeds,
    SendPacket,
    StreamFailure,
    StreamRequest,
)
from meshd.wire.membership import Status
from meshd.wire.validate import Address

NodeState = Literal["up", "crashed", "killed", "paused"]
_PAUSED_INBOX_LIMIT = 2048  # like a socket receive buffer: the excess is dropped
_TCP_RETRANSMIT = 1.0  # a lost SYN or segment costs one retransmission timeout


@dataclass(slots=True)
class SimNode:
    name: str
    addr: Address
    core: Membership
    state: NodeState = "up"
    scheduled: float = math.inf
    inbox: deque[tuple[Address, bytes]] = field(default_factory=deque)
    # Stream outcomes that came while paused: (token, reply, failure).
    streams_done: list[tuple[int, bytes | None, StreamFailure | None]] = field(default_factory=list)
    events: list[MemberEvent] = field(default_factory=list)
    restarts: int = 0
    exit_by: float = math.inf  # a leaving process exits by then at the latest

    def view(self) -> dict[str, Status]:
        return {m.name: m.status for m in self.core.members()}


class SimNetwork:
    """Owns the nodes, the links and the event heap."""

    def __init__(
        self,
        seed: int,
        *,
        latency: tuple[float, float] = (0.0005, 0.002),
        loss: float = 0.0,
        record_events: bool = False,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.latency = latency
        self.loss = loss
        self.record_events = record_events
        self.now = 0.0
        self.nodes: dict[str, SimNode] = {}
        self._by_addr: dict[Address, SimNode] = {}
        self._heap: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self._blocked: set[tuple[str, str]] = set()
        self._link_loss: dict[tuple[str, str], float] = {}
        self.listeners: list[Callable[[SimNode, MemberEvent], None]] = []
        self.delivered = 0
        self.dropped = 0

    # ------------------------------------------------------------------ topology

    def add_node(
        self,
        name: str,
        tuning: MembershipTuning,
        *,
        seeds: Iterable[str] = (),
        tags: dict[str, str] | None = None,
        start: bool = True,
    ) -> SimNode:
        index = len(self.nodes)
        addr = (f"10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}", 7946)
        core = Membership(
            name=name,
            addr=addr,
            tuning=tuning,
            rng=random.Random(f"{self.seed}:{name}:0"),
            now=self.now,
            tags=tags,
        )
        node = SimNode(name, addr, core)
        self.nodes[name] = node
        self._by_addr[addr] = node
        if start:
            core.start(self.now, [self.nodes[s].addr for s in seeds])
            self._after_input(node)
        return node

    def restart(self, name: str, *, seeds: Iterable[str] = ()) -> SimNode:
        """A fresh process for ``name`` on the same address (incarnation starts over)."""
        old = self.nodes[name]
        me = old.core.member(name)
        old.restarts += 1
        core = Membership(
            name=name,
            addr=old.addr,
            tuning=old.core.tuning,
            rng=random.Random(f"{self.seed}:{name}:{old.restarts}"),
            now=self.now,
            tags=me.tags if me is not None else None,
        )
        old.core = core
        old.state = "up"
        old.inbox.clear()
        old.streams_done.clear()
        old.scheduled = math.inf
        old.exit_by = math.inf
        core.start(self.now, [self.nodes[s].addr for s in seeds])
        self._after_input(old)
        return old

    # ------------------------------------------------------------------ faults

    def partition(self, *groups: Iterable[str]) -> None:
        """Two-way partition: no traffic between different groups."""
        sets = [set(g) for g in groups]
        for i, a in enumerate(sets):
            for b in sets[i + 1 :]:
                for x in a:
                    for y in b:
                        self._blocked.add((x, y))
                        self._blocked.add((y, x))

    def block(self, src: str, dst: str) -> None:
        """One-way: packets from ``src`` to ``dst`` are lost."""
        self._blocked.add((src, dst))

    def set_loss(self, src: str, dst: str, p: float) -> None:
        self._link_loss[(src, dst)] = p

    def heal(self) -> None:
        self._blocked.clear()
        self._link_loss.clear()

    def crash(self, name: str) -> None:
        """The host is gone: no packets, no TCP answers (connections time out)."""
        self.nodes[name].state = "crashed"

    def kill(self, name: str) -> None:
        """The process is gone but the host is up: TCP connections are refused."""
        self.nodes[name].state = "killed"

    def leave(self, name: str) -> None:
        """Graceful leave, as the daemon does it: announce ``left``, keep gossiping until the
        announcement used up its transmits (or ``leave_timeout`` passed), then exit. After
        that the host is up but nothing listens, so TCP connections are refused."""
        node = self.nodes[name]
        node.exit_by = self.now + node.core.tuning.leave_timeout
        node.core.leave(self.now)
        self._after_input(node)

    def pause(self, name: str) -> None:
        self.nodes[name].state = "paused"

    def resume(self, name: str) -> None:
        node = self.nodes[name]
        if node.state != "paused":
            return
        node.state = "up"
        # Overdue timers and the backlog of input wake up together; which runs first is up to
        # the scheduler (trio picks at random), so either may: timers first, the process
        # judges its probes before it reads the acks that came meanwhile.
        timers_first = self.rng.random() < 0.5
        if timers_first:
            node.core.tick(self.now)
        while node.inbox:
            src, data = node.inbox.popleft()
            node.core.handle_packet(self.now, src, data)
        done, node.streams_done = node.streams_done, []
        for token, reply, failure in done:
            node.core.stream_result(self.now, token, reply, failure)
        node.core.tick(self.now)
        self._after_input(node)

    def at(self, when: float, fn: Callable[[], None]) -> None:
        """Call ``fn`` at virtual time ``when`` (fault schedules: duty cycles, heals)."""
        self.call_at(when, lambda _now: fn())

    def starve(
        self, name: str, *, stop: float, run: float, jitter: float = 0.0, until: float = math.inf
    ) -> None:
        """CPU starvation as a duty cycle, the way SIGSTOP/SIGCONT (or a cgroup CPU quota with
        period ``stop + run``) does it: the node is paused for ``stop`` seconds, then runs for
        ``run``, again and again until ``until``. While paused its packets queue and its timers
        stall; on each resume it works through the backlog and fires every overdue timer, late.
        ``jitter`` stretches each pause by up to that fraction, at random (seeded)."""
        node = self.nodes[name]
        core = node.core

        def pause() -> None:
            if node.core is not core or node.state != "up" or self.now >= until:
                return
            self.pause(name)
            length = stop * (1.0 + jitter * self.rng.random())
            self.at(self.now + length, resume)

        def resume() -> None:
            if node.core is not core or node.state != "paused":
                return
            self.resume(name)
            self.at(self.now + run, pause)

        self.at(self.now, pause)

    # ------------------------------------------------------------------ event loop

    def call_at(self, when: float, fn: Callable[[float], None]) -> None:
        """Run ``fn(now)`` at virtual time ``when`` (not before now), in the event order:
        other layers (routing) put their frames and deadlines on the same clock."""
        self._push(max(when, self.now), _CALL, fn)

    def tcp_leg(self, src: str, dst: str) -> float | None:
        """One-way delay of a segment on a TCP connection from ``src`` to ``dst`` (loss
        costs retransmissions), or None if it cannot get through."""
        return self._tcp_leg(src, dst)

    def _push(self, when: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, payload))

    def _after_input(self, node: SimNode) -> None:
        core = node.core
        for out in core.take_outputs():
            if isinstance(out, SendPacket):
                self._send_packet(node, out)
            elif isinstance(out, StreamRequest):
                self._open_stream(node, out)
            elif isinstance(out, ResolveSeeds):
                core.seeds_resolved(self.now, core.seeds)  # no DNS here: the same seeds
            else:
                if self.record_events:
                    node.events.append(out)
                for listener in self.listeners:
                    listener(node, out)
        if core.leaving and node.state == "up" and (core.leave_done() or self.now >= node.exit_by):
            node.state = "killed"  # the process exits; its packets already sent still arrive
            return
        # A core may ask for a timer that is already due (a late Lifeguard confirmation pulls a
        # suspicion deadline into the past); wake it now, as a real driver would. Pushing the
        # past time instead would make the _TIMER entry look superseded and freeze the node.
        deadline = max(core.next_deadline(), self.now)
        if deadline < node.scheduled:
            node.scheduled = deadline
            self._push(deadline, _TIMER, (node, core))

    def _link_ok(self, src: str, dst: str) -> bool:
        if (src, dst) in self._blocked:
            return False
        p = self._link_loss.get((src, dst), self.loss)
        return not (p > 0 and self.rng.random() < p)

    def _delay(self) -> float:
        lo, hi = self.latency
        return lo + (hi - lo) * self.rng.random()

    def _send_packet(self, node: SimNode, out: SendPacket) -> None:
        dst = self._by_addr.get(out.addr)
        if dst is None or not self._link_ok(node.name, dst.name):
            self.dropped += 1
            return
        self._push(self.now + self._delay(), _PACKET, (dst, node.addr, out.data))

    def _tcp_leg(self, src: str, dst: str) -> float | None:
        """One-way delay of a TCP exchange leg, or None if it cannot get through."""
        if (src, dst) in self._blocked:
            return None
        delay = self._delay()
        p = self._link_loss.get((src, dst), self.loss)
        while p > 0 and self.rng.random() < p:
            delay += _TCP_RETRANSMIT
            if delay > 10:
                return None
        return delay

    def _open_stream(self, node: SimNode, req: StreamRequest) -> None:
        dst = self._by_addr.get(req.addr)
        fail_at = self.now + req.timeout
        if dst is None:
            self._push(fail_at, _STREAM_RESULT, (node, node.core, req.token, None, "timeout"))
            return
        there = self._tcp_leg(node.name, dst.name)
        back = self._tcp_leg(dst.name, node.name)
        if there is None or back is None or dst.state in ("crashed", "paused"):
            self._push(fail_at, _STREAM_RESULT, (node, node.core, req.token, None, "timeout"))
            return
        if dst.state == "killed":
            rtt = there + back
            result: tuple[bytes | None, StreamFailure | None] = (None, "refused")
            when = self.now + rtt if rtt < req.timeout else fail_at
            if rtt >= req.timeout:
                result = (None, "timeout")
            self._push(when, _STREAM_RESULT, (node, node.core, req.token, *result))
            return
        self._push(self.now + there, _STREAM_SERVE, (node, node.core, dst, req, fail_at, back))

    async def run_for(self, duration: float) -> None:
        await self.run_until(self.now + duration)

    async def run_until(
        self, end: float, *, stop: Callable[[], bool] | None = None, check_every: float = 0.1
    ) -> bool:
        """Process events up to virtual time ``end`` (or until ``stop()`` holds). Returns
        whether ``stop`` was satisfied."""
        heap = self._heap
        next_check = self.now
        synced = trio.current_time()
        base = synced - self.now
        while heap and heap[0][0] <= end:
            when, _, kind, payload = heapq.heappop(heap)
            self.now = max(self.now, when)
            if self.now + base - synced > 0.001:
                await trio.sleep_until(self.now + base)
                synced = self.now + base
            self._handle(kind, payload, when)
            if stop is not None and self.now >= next_check:
                next_check = self.now + check_every
                if stop():
                    return True
        self.now = max(self.now, end)
        await trio.sleep_until(self.now + base)
        return stop() if stop is not None else False

    def _handle(self, kind: int, payload: Any, when: float) -> None:
        now = self.now
        if kind == _PACKET:
            dst, src_addr, data = payload
            if dst.state == "up":
                self.delivered += 1
                dst.core.handle_packet(now, src_addr, data)
                self._after_input(dst)
            elif dst.state == "paused" and len(dst.inbox) < _PAUSED_INBOX_LIMIT:
                dst.inbox.append((src_addr, data))
            else:
                self.dropped += 1
        elif kind == _TIMER:
            node, core = payload
            if core is not node.core or when != node.scheduled:
                return  # superseded (restart, or an earlier deadline was scheduled)
            node.scheduled = math.inf
            if node.state == "up":
                core.tick(now)
                self._after_input(node)
        elif kind == _STREAM_SERVE:
            client, client_core, dst, req, fail_at, back = payload
            if dst.state != "up":
                failure: StreamFailure = "refused" if dst.state == "killed" else "timeout"
                self._push(fail_at, _STREAM_RESULT, (client, client_core, req.token, None, failure))
                return
            reply = dst.core.handle_stream(now, client.addr, req.data)
            self._after_input(dst)
            done = now + back
            if reply is None or done > fail_at:
                self._push(
                    fail_at, _STREAM_RESULT, (client, client_core, req.token, None, "timeout")
                )
            else:
                self._push(done, _STREAM_RESULT, (client, client_core, req.token, reply, None))
        elif kind == _STREAM_RESULT:
            node, core, token, reply, failure = payload
            if core is node.core and node.state == "up":
                core.stream_result(now, token, reply, failure)
                self._after_input(node)
            elif core is node.core and node.state == "paused":
                # The result waits for the process to run again, as a socket's data does.
                node.streams_done.append((token, reply, failure))
        elif kind == _CALL:
            payload(now)

    # ------------------------------------------------------------------ observations

    def up_nodes(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.state == "up"]

    def status_of(self, observer: str, member: str) -> Status | None:
        view = self.nodes[observer].core.member(member)
        return view.status if view is not None else None

    def converged(self, members: Iterable[str] | None = None) -> bool:
        """Every up node sees exactly the up nodes (``members``) as alive, and no other."""
        expected = set(members) if members is not None else {n.name for n in self.up_nodes()}
        observers = [n for n in self.up_nodes() if n.name in expected]
        # Cheap necessary condition first: ``alive_count`` (alive + suspect, O(1)) cannot be
        # below the number expected alive. A full view copies every member: at 1,000 nodes
        # one full check is ~1 M copies, and while nodes join it fails here for nothing.
        if any(n.core.alive_count < len(expected) for n in observers):
            return False
        for node in observers:
            alive = {m.name for m in node.core.members() if m.status is Status.ALIVE}
            if alive != expected:
                return False
        return True


_PACKET = 0
_TIMER = 1
_STREAM_SERVE = 2
_STREAM_RESULT = 3
_CALL = 4
