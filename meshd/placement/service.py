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
  holds a strict majority of the last stable membership (:mod:`meshd.placement.quorum`): the
  minority side deactivates them and answers ``unreachable``. ``allow_duplicates`` kinds run
  on both sides; the registry's duplicate-name rule settles it after the heal.
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
from meshd.placement import rendezvous
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


@dataclass(slots=True)
class _Activation:
    done: trio.Event = field(default_factory=trio.Event)
    caught_up: trio.Event = field(default_factory=trio.Event)  # the agent's state is here
    entry: Entry | None = None
    error: errors.MeshError | None = None


class Placement:
    """Decides where agents of a kind run, and starts, moves and stops them.

    Owns: the kinds table (every host's advertised kinds), this host's runners, the quorum
    view for ``keep_majority``, activations under way, drain and rebalance moves. Writes only
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
        self.table = KindTable()
        self.runners: dict[str, list[Runner]] = {}
        self.quorum = Quorum(tuning.stable_after, tuning.stop_after)
        self.draining = False
        self.stats = PlacementStats()
        # Wraps each failover activation (tracing's ``meshd.failover`` span; a no-op when off).
        self.failover_span: Callable[[str, str, str], AbstractContextManager[None]] = _untraced
        self._activating: dict[str, _Activation] = {}
        self._advertised: dict[str, KindInfo] = {}
        self._dirty = False
        self._moves: list[str] = []
        self._moving = False
        self._serving_up: frozenset[str] = frozenset()  # other live hosts serving kinds
        self._replan_at: float | None = None  # retry a rebalance that could not move
        self._minority_stopped: dict[str, str] = {}  # name -> kind, to restore with a majority
        self._stopping: set[str] = set()  # entry ids asked to stop for lack of a majority
        self._down_at: dict[str, float] = {}  # hosts gone silent (not proven stopped): since
        self._nursery: trio.Nursery | None = None
        self._failover_limit = trio.CapacityLimiter(tuning.failover_parallelism)
        registry.listeners.append(self._on_registry_event)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                await trio.sleep(0.1)
                self._tick(trio.current_time())

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

    def _up(self, host: str) -> bool:
        state = self.membership.peek(host)
        return host == self.node or (state is not None and state[0].up)

    def candidates(self, kind: str, *, exclude: str | None = None) -> dict[str, float]:
        return {
            host: float(info.capacity)
            for host, info in self.table.hosts(kind).items()
            if info.accepts and host != exclude and self._up(host)
        }

    def owner(self, kind: str, name: str, *, exclude: str | None = None) -> str | None:
        return rendezvous.owner(name, self.candidates(kind, exclude=exclude))

    def may_run(self, kind: str) -> bool:
        """Partition strategy: may this side run agents of ``kind`` now?"""
        if self.table.strategy(kind) is Strategy.KEEP_MAJORITY:
            return self.quorum.has_majority
        return True

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
        if not self.may_run(kind):
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
            return await self.activate_local(name, kind, deadline)
        return await self.host.activate_remote(owner, name, kind, deadline)

    def _check_takeover(self, name: str, kind: str) -> None:
        """A message to a keep_majority agent whose host went silent must not start it here
        before the host's side has had ``stable_after`` to stop it (the same wait as the
        failover after a death): that host may be alive behind a partition, still running it."""
        if self.table.strategy(kind) is not Strategy.KEEP_MAJORITY:
            return
        gone = self.registry.last_known(name)
        if gone is None or gone.node == self.node:
            return
        down_at = self._down_at.get(gone.node)
        if down_at is None:
            return  # not gone silent lately: stopped, left, or long forgotten
        wait = down_at + self.tuning.stable_after - trio.current_time()
        if wait > 0:
            self.stats.refused_takeover += 1
            raise errors.Unreachable(
                f"{name!r} ran on {gone.node}, which went silent; it may still run there "
                f"behind a partition, so it starts elsewhere only in {wait:.1f} s",
                detail={"kind": kind, "host": gone.node, "retry_after": round(wait, 1)},
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
        if proven:
            self._down_at.pop(host, None)
        else:
            self._down_at[host] = trio.current_time()
        for name in self.registry.names_on(host):
            entry = self.registry.last_known(name)
            if entry is None or not entry.kind or not self.table.hosts(entry.kind):
                continue
            wait = 0.0
            if not proven and self.table.strategy(entry.kind) is Strategy.KEEP_MAJORITY:
                wait = self.tuning.stable_after
            self._nursery.start_soon(self._failover, name, entry.kind, host, wait)

    async def _failover(self, name: str, kind: str, host: str, wait: float) -> None:
        if wait > 0:
            await trio.sleep(wait)
            if self._up(host) or self.registry.lookup(name) is not None:
                return  # it came back, or someone else took over meanwhile
        if self.owner(kind, name) != self.node or not self.may_run(kind):
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

    def _enforce_quorum(self) -> None:
        if self.quorum.has_majority:
            return
        for entry in self._local_agents():
            if (
                entry.kind
                and entry.entry_id not in self._stopping
                and self.table.strategy(entry.kind) is Strategy.KEEP_MAJORITY
                and self.host.deactivate(entry.name, "minority")
            ):
                self._stopping.add(entry.entry_id)
                self._minority_stopped[entry.name] = entry.kind
                self.stats.minority_stops += 1
                self.log.warning(
                    "stopping a keep_majority agent: this side is a minority",
                    extra=kv(agent=entry.name),
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
        for entry in self._local_agents():
            if entry.kind and entry.name not in self._moves:
                owner = self.owner(entry.kind, entry.name)
                if owner is not None and owner != self.node:
                    self._moves.append(entry.name)

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
            elif not before and self.quorum.has_majority:
                self._restore_stopped()
        self._enforce_quorum()
        for host, since in list(self._down_at.items()):
            if now - since >= self.tuning.stable_after or self._up(host):
                del self._down_at[host]
        if self._dirty:
            self._dirty = False
            self._advertise(now)
        # Owners count only live hosts: one serving kinds that comes up after its kinds
        # arrived (a newcomer's document can outrun its membership join; or a host back from
        # the dead) changes owners just as a change of the kinds table does.
        serving = {host for host, _, _, _ in self.table.hosts_snapshot()}
        serving_up = frozenset(host for host in serving if host != self.node and host in up)
        if serving_up - self._serving_up or (
            self._replan_at is not None and now >= self._replan_at
        ):
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
        self._replan_at = trio.current_time() + self.tuning.stable_after
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
