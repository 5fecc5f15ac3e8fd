"""Placement: where agents of a kind run, and keeping them running.

* **Owner.** An agent of kind K belongs to the live host that wins weighted rendezvous
  hashing over the hosts serving K that accept more agents (capacity weights; draining and
  full hosts excluded). Every daemon computes the same owner from the same replicated table;
  there is no coordinator and no lock.
* **Virtual agents.** A message to a name that does not resolve but names a kind
  (``<kind>/<key>``) activates the agent on its owner first: the owner asks one of its
  local runners (a client serving the kind) to create it, waits for its registration, then
  delivers. Concurrent first messages share one activation.
* **Failover.** When a host dies, every daemon looks at the agents that host ran (the
  registry remembers them until reclaimed); the new owner of each re-activates it. Its state
  document is replicated, so it comes back with its state.
* **Partition strategy.** ``keep_majority`` kinds run only on the side of a partition that
  holds a strict majority of the reference membership (:mod:`meshd.placement.quorum`) and
  only while this host holds its lease (a majority answered its pings within
  ``placement.lease``): otherwise it deactivates them and answers ``unreachable``. The
  majority takes over a silent host's keep_majority agents once it has not seen the host
  alive for ``lease + lease_margin``. ``allow_duplicates`` kinds run on both sides; the
  registry's duplicate-name rule settles it after the heal.
* **Decisions** are made by the pure functions of :mod:`meshd.placement.core`; this module
  gathers their inputs and carries them out.
* **Drain and rebalance.** A draining host stops accepting agents and moves its own, one at a
  time; when a host starts serving a kind, agents whose owner changed move in bounded batches.
  A move deactivates the agent (after its current message), then activates it on the new
  owner; messages in between trigger the same activation.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Final

import trio
from pycrdt import Map

from meshd.config.model import PlacementTuning
from meshd.logs import kv
from meshd.membership.core import Membership
from meshd.membership.reference import reference_members
from meshd.placement import core, rendezvous
from meshd.placement.kinds import ROOT, KindInfo, KindTable, Strategy, kind_of
from meshd.placement.quorum import Quorum
from meshd.registry.model import Entry
from meshd.registry.registry import Registry, RegistryEvent, node_root
from meshd.replication.core import DocEvent
from meshd.replication.documents import Documents
from meshd.routing.ports import AgentHost, EventSink
from meshd.wire.membership import Status
from meshd_client.protocol import errors

ACTIVATION_TIMEOUT: Final = 10.0


@dataclass(slots=True)
class Runner:
    """A client session able to create agents of one kind."""

    kind: str
    capacity: int
    strategy: Strategy
    owner: object  # the client serving the kind (compared by identity)
    stream: EventSink
    activations: int = 0


@dataclass(slots=True)
class PlacementStats:
    activations: int = 0
    activation_failures: int = 0
    failovers: int = 0
    moves: int = 0
    minority_stops: int = 0
    refused_minority: int = 0
    refused_takeover: int = 0  # a silent host's keep_majority agent asked for too early
    lease_lapses: int = 0  # this host's keep_majority lease ran out
    refused_lease: int = 0  # keep_majority deliveries/activations refused here: no lease


@dataclass(slots=True)
class _Activation:
    done: trio.Event = field(default_factory=trio.Event)
    caught_up: trio.Event = field(default_factory=trio.Event)  # the agent's state is here
    entry: Entry | None = None
    error: errors.MeshError | None = None


class Placement:
    """Decides where agents of a kind run, and starts, moves and stops them.

    Owns: the kinds table (every host's advertised kinds), this host's runners, the quorum
    view and this host's lease for ``keep_majority``, when it last saw each host alive,
    activations under way, drain and rebalance moves. Decides through the pure functions of
    :mod:`meshd.placement.core`. Writes only
    this node's ``kinds`` map (through the registry). Starts an agent elsewhere and stops
    one here only through the :class:`~meshd.routing.ports.AgentHost` (routing); never sends
    a frame or touches a client itself."""

    def __init__(
        self,
        *,
        node: str,
        membership: Membership,
        registry: Registry,
        docs: Documents,
        host: AgentHost,
        tuning: PlacementTuning,
        log: logging.Logger,
        catch_up: Callable[[str, list[str], float], Awaitable[bool]] | None = None,
        renew_lease: Callable[[float | None], None] | None = None,
        clock: Callable[[], float] = trio.current_time,
        failover_span: Callable[[str, str, str], AbstractContextManager[None]] | None = None,
    ) -> None:
        self.node = node
        self.membership = membership
        self.registry = registry
        self.docs = docs
        self.host = host  # routing, as placement sees it
        self.tuning = tuning
        self.log = log
        # Pull an agent's state from the peers ahead of this node before it starts here.
        self.catch_up = catch_up or _caught_up
        # Membership's clock: the lease compares its ack times with this clock's ``now``.
        self.clock = clock
        # Turn the lease pings on (every so many seconds) or off (None): the membership
        # driver's, which re-arms its timer; the core's own method in simulations.
        self._renew = renew_lease or (lambda every: membership.renew_lease(self.clock(), every))
        self._renewing: float | None = None
        self.lease = core.Lease(restart_after=tuning.stable_after)
        self._lease_blocked = False  # lapsed: stopped agents wait to be restored
        self.sightings = core.Sightings()
        self.table = KindTable()
        self.runners: dict[str, list[Runner]] = {}
        self.quorum = Quorum(tuning.stable_after, tuning.stop_after)
        self.draining = False
        self.stats = PlacementStats()
        # Wraps each failover activation (tracing's ``meshd.failover`` span; a no-op when off).
        self.failover_span: Callable[[str, str, str], AbstractContextManager[None]] = (
            failover_span or _untraced
        )
        self._activating: dict[str, _Activation] = {}
        self._advertised: dict[str, KindInfo] = {}
        self._dirty = False
        self._moves: list[str] = []
        self._moving = False
        self._serving_up: frozenset[str] = frozenset()  # other live hosts serving kinds
        self._replan_at: float | None = None  # retry a rebalance that could not move
        self._minority_stopped: dict[str, str] = {}  # name -> kind, to restore with a majority
        self._stopping: set[str] = set()  # entry ids asked to stop for lack of a majority
        self._down_at: dict[str, float] = {}  # hosts gone silent (not proven): takeover at
        self._nursery: trio.Nursery | None = None
        self._failover_limit = trio.CapacityLimiter(tuning.failover_parallelism)
        registry.listeners.append(self._on_registry_event)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                await trio.sleep(0.1)
                self._tick(self.clock())

    # ------------------------------------------------------------------ the kinds table

    def on_doc_event(self, event: DocEvent) -> None:
        view = node_root(event, self.docs.store, ROOT)
        if view is None:
            return
        host, kinds = view
        if kinds is None:
            self.table.drop_host(host)
            return
        parsed = {}
        for kind, raw in kinds.items():
            info = KindInfo.decode(raw)
            if info is not None:
                parsed[kind] = info
        before = self.table.hosts_snapshot() if host != self.node else None
        self.table.set_host(host, parsed)
        if before is not None and self.table.hosts_snapshot() != before:
            self._plan_rebalance()

    def _local_info(self, kind: str) -> KindInfo | None:
        runners = self.runners.get(kind)
        if not runners:
            return None
        capacity = sum(r.capacity for r in runners)
        active = sum(1 for a in self._local_agents() if a.kind == kind)
        strategy = runners[0].strategy
        return KindInfo(capacity, active, strategy, self.draining)

    def _local_agents(self) -> list[Entry]:
        return self.registry.entries(node=self.node)

    def _advertise(self, now: float) -> None:
        """Write this host's kinds to its registry document when they changed."""
        current = {k: info for k in self.runners if (info := self._local_info(k)) is not None}
        if current == self._advertised:
            return
        old = self._advertised
        self._advertised = current

        def mutate(kinds: Map[Any]) -> None:
            for kind in old:
                if kind not in current:
                    kinds.pop(kind, None)
            for kind, info in current.items():
                kinds[kind] = info.encode()

        self.registry.write_own(now, ROOT, mutate)

    # ------------------------------------------------------------------ owners

    def _left(self, host: str) -> bool:
        state = self.membership.peek(host)
        return state is not None and state[0] is Status.LEFT

    def _alive(self, host: str) -> bool:
        state = self.membership.peek(host)
        return host == self.node or (state is not None and state[0] is Status.ALIVE)

    def _up(self, host: str) -> bool:
        state = self.membership.peek(host)
        return host == self.node or (state is not None and state[0].up)

    def candidates(self, kind: str, *, exclude: str | None = None) -> dict[str, float]:
        return core.candidates(self.table.hosts(kind), self._up, exclude)

    def owner(self, kind: str, name: str, *, exclude: str | None = None) -> str | None:
        return rendezvous.owner(name, self.candidates(kind, exclude=exclude))

    def may_run(self, kind: str) -> bool:
        """Partition strategy: may this side start agents of ``kind`` now?"""
        strategy = self.table.strategy(kind)
        if strategy is not Strategy.KEEP_MAJORITY:
            return True
        now = self.clock()
        self._observe_lease(now)
        return core.may_run(strategy, self.quorum.has_majority, self.lease.may_start(now))

    # ------------------------------------------------------------------ the lease

    def _takeover_wait(self) -> float:
        return self.tuning.lease + self.tuning.lease_margin

    def _observe_lease(self, now: float) -> None:
        """Check the lease on fresh acks; a lapse stops every local keep_majority agent
        before this returns (so before anything else may act on the fresh acks)."""
        if not getattr(self.membership, "joined", True):
            return
        self._lease_renewal()
        if self._renewing is None:
            # Not pinging: this host serves no keep_majority kind, so it runs none of their
            # agents; no lease to keep (and no lapse to count, which would delay its first
            # agents by stable_after once it starts serving one).
            self.lease.release()
            return
        expiry = core.lease_expiry(
            self.node,
            reference_members(self.membership.members()),
            self.membership.acked_at(),
            self.tuning.lease,
        )
        lapses = self.lease.lapses
        if self.lease.observe(now, expiry):
            if self.lease.lapses != lapses:
                self.stats.lease_lapses += 1
                self._lease_blocked = True
                self.log.warning(
                    "keep_majority lease lapsed: no majority answered within the lease",
                    extra=kv(lease=self.tuning.lease),
                )
            self._enforce_quorum(now)

    def serving(self, entry: Entry) -> errors.MeshError | None:
        """May a message reach the local agent ``entry`` now? Checked by routing before each
        delivery: a keep_majority agent is served only while this host holds its lease."""
        if not entry.kind or self.table.strategy(entry.kind) is not Strategy.KEEP_MAJORITY:
            return None
        now = self.clock()
        if self.lease.check(now):
            return None
        self._observe_lease(now)
        if self.lease.check(now) and not self._lease_blocked:
            return None
        self.stats.refused_lease += 1
        return errors.Unreachable(
            f"{entry.name!r} is a keep_majority agent and {self.node} holds no lease "
            "(no majority answered it lately)",
            detail={"kind": entry.kind, "host": self.node},
        )

    def _lease_renewal(self) -> None:
        """Ping for the lease while this host serves a keep_majority kind."""
        serves = any(
            r.strategy is Strategy.KEEP_MAJORITY for rs in self.runners.values() for r in rs
        ) or any(
            info.strategy is Strategy.KEEP_MAJORITY
            for kind in self.table.kinds()
            if (info := self.table.info(self.node, kind)) is not None
        )
        every = self.tuning.lease_renew if serves else None
        if every != self._renewing:
            self._renewing = every
            self._renew(every)

    # ------------------------------------------------------------------ activation

    async def ensure_active(self, name: str, kind: str | None, deadline: float) -> Entry:
        """Make ``name`` run somewhere; returns its entry once it resolves."""
        entry = self.registry.lookup(name)
        if entry is not None:
            return entry
        kind = kind or kind_of(name)
        if kind is None:
            gone = self.registry.last_known(name)
            kind = gone.kind if gone is not None and gone.kind else None
        if kind is None or not self.table.hosts(kind):
            raise errors.NotFound(
                f"no live agent named {name!r}"
                + (f" and no host serves kind {kind!r}" if kind else "")
            )
        strategy = self.table.strategy(kind)
        if not core.may_run(strategy, self.quorum.has_majority, lease_may_start=True):
            self.stats.refused_minority += 1
            raise errors.Unreachable(
                f"{name!r} is a keep_majority agent and this side of the partition holds no "
                "majority",
                detail={"kind": kind},
            )
        self._check_takeover(name, kind)
        owner = self.owner(kind, name)
        if owner is None:
            raise errors.Unreachable(
                f"no live host can take agents of kind {kind!r} now", detail={"kind": kind}
            )
        if owner == self.node:
            if not self.may_run(kind):  # the owner's own lease (another owner checks its own)
                self.stats.refused_lease += 1
                raise errors.Unreachable(
                    f"{name!r} is a keep_majority agent and {self.node} holds no lease (no "
                    "majority answered it lately, or it lapsed less than stable_after ago)",
                    detail={"kind": kind, "host": self.node},
                )
            return await self.activate_local(name, kind, deadline)
        return await self.host.activate_remote(owner, name, kind, deadline)

    def _check_takeover(self, name: str, kind: str) -> None:
        """A message to a keep_majority agent whose host went silent must not start it here
        before that host's lease has run out (the same wait as the failover after a death):
        the host may be alive behind a partition, still running it."""
        gone = self.registry.last_known(name)
        host = gone.node if gone is not None else None
        takeover_at = self._down_at.get(host) if host is not None else None
        wait = core.takeover_refusal(
            self.table.strategy(kind), host, self.node, takeover_at, self.clock()
        )
        if wait is not None:
            self.stats.refused_takeover += 1
            raise errors.Unreachable(
                f"{name!r} ran on {host}, which went silent; it may still run there "
                f"behind a partition, so it starts elsewhere only in {wait:.1f} s",
                detail={"kind": kind, "host": host, "retry_after": round(wait, 1)},
            )

    async def activate_local(self, name: str, kind: str, deadline: float) -> Entry:
        entry = self.registry.lookup(name)
        if entry is not None:
            return entry
        pending = self._activating.get(name)
        if pending is None:
            pending = self._activating[name] = _Activation()
            assert self._nursery is not None
            self._nursery.start_soon(self._activate, name, kind, pending)
        with trio.move_on_at(min(deadline, trio.current_time() + ACTIVATION_TIMEOUT)):
            await pending.done.wait()
        if pending.entry is not None:
            return pending.entry
        if pending.error is not None:
            raise pending.error
        if self._activating.get(name) is pending:
            del self._activating[name]
        self.stats.activation_failures += 1
        raise errors.Timeout(f"activating {name!r} took too long", detail={"kind": kind})

    async def _activate(self, name: str, kind: str, pending: _Activation) -> None:
        """Ask a runner, and meanwhile pull the agent's state from every live peer: a write
        acknowledged by a majority must be here before the agent runs here. The two overlap;
        the runner's registration (``agent.serve``) waits in :meth:`state_ready`, so nothing
        reaches the agent, and it reads no state, before the catch-up is done."""
        try:
            self._request_activation(name, kind)
        except errors.MeshError as exc:
            self.stats.activation_failures += 1
            pending.error = exc
            pending.done.set()
            pending.caught_up.set()
            if self._activating.get(name) is pending:
                del self._activating[name]
            return
        peers = [m.name for m in self.membership.members() if m.status.up and m.name != self.node]
        try:
            await self.catch_up(state_doc(name), peers, 2.0)
        finally:
            pending.caught_up.set()

    async def state_ready(self, name: str) -> None:
        """Wait until an activation under way here has pulled the agent's state (returns at
        once for an agent not being activated by placement, such as a plain ``serve``)."""
        pending = self._activating.get(name)
        if pending is not None:
            await pending.caught_up.wait()

    def _request_activation(self, name: str, kind: str) -> None:
        runners = [r for r in self.runners.get(kind, []) if not self.draining]
        if not runners:
            raise errors.Unreachable(f"no runner for kind {kind!r} on {self.node}")
        runner = min(runners, key=lambda r: r.activations)
        runner.activations += 1
        runner.stream.emit({"type": "activate", "name": name, "kind": kind})
        self.stats.activations += 1

    def _on_registry_event(self, event: RegistryEvent) -> None:
        if event.kind in ("registered", "moved") and event.entry.node == self.node:
            pending = self._activating.pop(event.name, None)
            if pending is not None:
                pending.entry = event.entry
                pending.done.set()
        if event.entry.node == self.node or event.kind in ("registered", "unregistered"):
            self._dirty = True

    # ------------------------------------------------------------------ runners (API)

    def attach_runner(self, runner: Runner) -> None:
        self.runners.setdefault(runner.kind, []).append(runner)
        self._dirty = True
        self._lease_renewal()  # ping for the lease at once, before the first activation

    def detach_runner(self, runner: Runner) -> None:
        runners = self.runners.get(runner.kind, [])
        if runner in runners:
            runners.remove(runner)
        if not runners:
            self.runners.pop(runner.kind, None)
        self._dirty = True

    # ------------------------------------------------------------------ failover

    def host_down(self, host: str) -> None:
        """``host`` died or left: re-activate what it ran, where it now belongs."""
        assert self._nursery is not None
        # A process that crashed on a live host (refusal evidence) is known not to run its
        # agents anywhere; a silent host may be alive on the other side of a partition, so
        # its keep_majority agents wait until the minority there has stopped them.
        # A host that left gracefully stopped its agents before leaving: proven too.
        proven = self.membership.died_refused(host) or self._left(host)
        now = self.clock()
        takeover_at = self.sightings.takeover_at(now, host, self._takeover_wait())
        if proven:
            self._down_at.pop(host, None)
        else:
            self._down_at[host] = takeover_at
        for name in self.registry.names_on(host):
            entry = self.registry.last_known(name)
            if entry is None or not entry.kind or not self.table.hosts(entry.kind):
                continue
            strategy = self.table.strategy(entry.kind)
            wait = core.failover_wait(strategy, proven, now, takeover_at)
            self._nursery.start_soon(self._failover, name, entry.kind, host, wait)

    async def _failover(self, name: str, kind: str, host: str, wait: float) -> None:
        if wait > 0:
            await trio.sleep(wait)
            if self._up(host) or self.registry.lookup(name) is not None:
                return  # it came back, or someone else took over meanwhile
        give_up = trio.current_time() + self.tuning.stable_after
        while True:
            owner = self.owner(kind, name)
            action = core.failover_action(
                owner, self.node, owner is not None and self._alive(owner)
            )
            if action == "activate":
                break
            if action == "leave" or trio.current_time() >= give_up:
                return
            await trio.sleep(self.tuning.lease_renew)
            if self.registry.lookup(name) is not None:
                return
        if not self.may_run(kind):
            return
        async with self._failover_limit:
            try:
                with self.failover_span(name, kind, host):
                    await self.activate_local(name, kind, trio.current_time() + ACTIVATION_TIMEOUT)
                self.stats.failovers += 1
                self.log.info("failed over", extra=kv(agent=name, kind=kind))
            except errors.MeshError as exc:
                self.log.warning("failover failed", extra=kv(agent=name, error=exc.message))

    # ------------------------------------------------------------------ partition strategy

    def _local(self) -> list[core.Local]:
        return [core.Local(e.name, e.entry_id, e.kind) for e in self._local_agents()]

    def _enforce_quorum(self, now: float) -> None:
        lease = self.lease.check(now)
        ok = self.quorum.has_majority and lease
        # One reason for the client either way: a lapsed lease means no majority answered.
        no_lease = self.quorum.has_majority
        for agent in core.to_stop(self._local(), self.table.strategy, ok, self._stopping):
            if self.host.deactivate(agent.name, "minority"):
                self._stopping.add(agent.entry_id)
                self._minority_stopped[agent.name] = agent.kind
                self.stats.minority_stops += 1
                self.log.warning(
                    "stopping a keep_majority agent: "
                    + ("no lease" if no_lease else "this side is a minority"),
                    extra=kv(agent=agent.name),
                )

    # ------------------------------------------------------------------ drain & rebalance

    def start_drain(self) -> int:
        """Stop taking agents and move every local one away. Returns how many will move."""
        self.draining = True
        self._dirty = True
        names = [e.name for e in self._local_agents() if e.kind]
        self._moves = [n for n in self._moves if n not in names] + names
        return len(names)

    def moves_pending(self) -> bool:
        """A drain or rebalance still has agents to move away from here."""
        return bool(self._moves) or (self._moving and any(e.kind for e in self._local_agents()))

    def _plan_rebalance(self) -> None:
        """A host's kinds changed: queue local agents whose owner is now someone else."""
        self._moves.extend(core.to_move(self._local(), self.owner, self.node, self._moves))

    async def _move(self, name: str) -> None:
        entry = self.registry.holds(name)
        if entry is None or not entry.kind:
            return
        target = self.owner(entry.kind, name, exclude=self.node)
        if target is None:
            self.log.warning(
                "cannot move: no other host takes this kind", extra=kv(agent=name, kind=entry.kind)
            )
            return
        if not self.host.deactivate(name, "drain" if self.draining else "rebalance"):
            return
        self.stats.moves += 1
        with trio.move_on_after(ACTIVATION_TIMEOUT):
            while self.registry.holds(name) is not None:
                await trio.sleep(0.02)
        # Its state rode the fast path with each write; one repair round makes sure the
        # new owner holds all of it before the agent starts there.
        self.docs.sync_with(trio.current_time(), target)
        deadline = trio.current_time() + ACTIVATION_TIMEOUT
        while True:
            try:
                placed = await self.ensure_active(name, entry.kind, deadline)
            except errors.MeshError as exc:
                self.log.warning("move: activation failed", extra=kv(agent=name, error=exc.message))
                await self._keep_here(name, entry.kind)
                return
            if placed.entry_id != entry.entry_id:
                return
            # The new owner answered with the entry we just withdrew: the unregistration
            # has not reached it yet (the activation request can overtake it), so it
            # activated nothing. Ask again once it has, or the agent runs nowhere.
            if trio.current_time() >= deadline:
                self.log.warning(
                    "move: the new owner still resolves the old entry", extra=kv(agent=name)
                )
                return
            await trio.sleep(0.02)

    def _restore_stopped(self) -> None:
        """A majority is back: agents this host stopped for lack of one run again (at their
        owner), unless the other side already runs them. Without this, a singleton nobody
        sends to would stay down after an even split heals."""
        stopped, self._minority_stopped = self._minority_stopped, {}
        self._stopping.clear()
        if self._nursery is None or not stopped:
            return
        self.log.info("majority regained: restoring agents", extra=kv(agents=len(stopped)))
        for name, kind in stopped.items():
            self._nursery.start_soon(self._restore, name, kind)

    async def _restore(self, name: str, kind: str) -> None:
        if self.registry.lookup(name) is not None:
            return
        async with self._failover_limit:
            try:
                await self.ensure_active(name, kind, trio.current_time() + ACTIVATION_TIMEOUT)
            except errors.MeshError as exc:
                self.log.warning("restore failed", extra=kv(agent=name, error=exc.message))

    # ------------------------------------------------------------------ periodic work

    def _tick(self, now: float) -> None:
        # Not before joining: until then this node's table may lack the rest of the cluster,
        # and a daemon alone behind a partition would think itself a majority.
        members = self.membership.members()
        up = frozenset(m.name for m in members if m.status is Status.ALIVE)
        self._lease_renewal()
        if getattr(self.membership, "joined", True):
            # Only members known alive count: a suspect is not confirmed reachable. On a
            # small side, suspicions gather few confirmations and take long to become
            # verdicts; waiting for them would let the majority take over first.
            known = reference_members(members)
            self.quorum.observe(now, up, known)
            before = self.quorum.has_majority
            self.quorum.tick(now)
            if before and not self.quorum.has_majority:
                self.log.warning(
                    "keep_majority: the members up here are no majority of the known ones",
                    extra=kv(up=len(up), known=len(known)),
                )
            self.sightings.observe(now, up, known)
            self._observe_lease(now)
            if core.restore_now(
                before, self.quorum.has_majority, self._lease_blocked, self.lease.may_start(now)
            ):
                # What it stopped runs again (at its owner), unless the other side has
                # started it meanwhile.
                self._lease_blocked = False
                self._restore_stopped()
        self._enforce_quorum(now)
        for host, takeover_at in list(self._down_at.items()):
            if now >= takeover_at or self._up(host):
                del self._down_at[host]
        if self._dirty:
            self._dirty = False
            self._advertise(now)
        # Owners count only live hosts: one serving kinds that comes up after its kinds
        # arrived (a newcomer's document can outrun its membership join; or a host back from
        # the dead) changes owners just as a change of the kinds table does.
        serving = {host for host, _, _, _ in self.table.hosts_snapshot()}
        serving_up = frozenset(host for host in serving if host != self.node and host in up)
        if core.rebalance_due(serving_up, self._serving_up, self._replan_at, now):
            self._replan_at = None
            self._plan_rebalance()
        self._serving_up = serving_up
        if self._moves and self._nursery is not None and not self._moving:
            batch = self._moves[: self.tuning.rebalance_batch]
            del self._moves[: self.tuning.rebalance_batch]
            self._moving = True
            self._nursery.start_soon(self._run_moves, batch)

    async def _keep_here(self, name: str, kind: str) -> None:
        """A move failed (say the new owner of a keep_majority agent has not yet settled
        its own quorum after a partition healed): run the agent here again rather than
        nowhere, and plan the move anew once membership has had time to settle."""
        self._replan_at = self.clock() + self.tuning.stable_after
        if self.registry.lookup(name) is not None or not self.may_run(kind):
            return
        if self.draining:
            self.log.warning("drain: agent has nowhere to go", extra=kv(agent=name))
            return
        try:
            await self.activate_local(name, kind, trio.current_time() + ACTIVATION_TIMEOUT)
            self.log.info("move failed; agent kept on this host", extra=kv(agent=name))
        except errors.MeshError as exc:
            self.log.warning("could not keep agent here", extra=kv(agent=name, error=exc.message))

    async def _run_moves(self, batch: list[str]) -> None:
        try:
            for name in batch:  # one at a time: state first, then registration
                await self._move(name)
            await trio.sleep(self.tuning.rebalance_interval)
        finally:
            self._moving = False


async def _caught_up(_doc: str, _peers: list[str], _timeout: float) -> bool:
    return True


def state_doc(agent: str) -> str:
    """The replicated document holding an agent's own state."""
    return f"state/agent:{agent}"


def _untraced(_name: str, _kind: str, _host: str) -> AbstractContextManager[None]:
    return nullcontext()
