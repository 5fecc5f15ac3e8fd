"""The workload: real clients doing real work through every host's daemon, all recorded.

The harness holds one :class:`~meshd_client.Mesh` per host, connected to that host's daemon
through its Unix socket (a file in the run directory, so no namespace needs entering). Over
those meshes it runs, while the fault schedule plays:

* **writers** — shared-state writes with ``majority`` durability (one fresh key each, so
  nothing overwrites anything and every acknowledged key must survive), with ``local``
  durability (another document), and ``majority`` counter increments;
* **requesters** — at-least-once requests to ``counter/<k>`` agents. Every host's mesh
  serves the ``counter`` kind (:meth:`Mesh.serve_kind`, ``keep_majority``), so placement
  puts each agent on one host and fails it over when that host dies or drains. The handler
  appends the message id to a list in the agent's state and increments a total, in one
  transaction with ``once=msg.id`` and ``majority`` durability. A list, created empty by
  the harness before any request: if the effect were ever applied twice — two activations,
  a lost ``once`` record — both appends survive the merge (a CRDT list keeps concurrent
  inserts), so the final list says exactly how many times each message took effect. (A
  per-message key would not: two concurrent first writes of one map key keep only one.);
* **a publisher and subscribers** — signals on ``chaos.**``, received on every host;
* **membership watchers** — every host's ``members.watch`` stream, so the checker can tell
  who declared whom dead;
* on demand, **duplicate registrations** — the same agent name served from hosts on both
  sides of a partition, to see the name conflict resolved after the heal.

Every operation is recorded with its outcome (:mod:`chaos.history`): ``ok`` only when the
system acknowledged it; anything else is ``unknown`` (it may or may not have happened — a
timeout, a lost connection) and the checker holds it only to "at most once".
"""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup

from chaos.cluster import Cluster
from chaos.history import FAIL, OK, UNKNOWN, History
from meshd_client import Agent, AgentContext, Mesh, Message
from meshd_client.connection import Connection
from meshd_client.protocol import errors
from meshd_client.protocol.errors import MeshError
from meshd_client.state import Durability

MAJORITY_DOC = "chaos-majority"
LOCAL_DOC = "chaos-local"
INCR_KEY = "incr"
COUNTER_KIND = "counter"
TOPIC = "chaos.sig"
PATTERN = "chaos.**"
HANDLED_LOG = "handled"
WRITE_OPS = frozenset({"write", "incr"})


@dataclass(slots=True)
class WorkloadConfig:
    writers: int = 2
    write_interval: float = 0.1
    mix: dict[str, float] = field(
        default_factory=lambda: {"majority": 0.5, "local": 0.3, "incr": 0.2}
    )
    requesters: int = 2
    request_interval: float = 0.1
    request_timeout: float = 30.0
    counters: int = 3
    publish_interval: float = 0.25
    # Harness-side bounds: a write or publish to a paused daemon would otherwise block its
    # writer for the whole pause (the outcome is then recorded as unknown); requests get
    # more than their own request_timeout, so that the client's answer is what is recorded.
    write_timeout: float = 10.0
    op_timeout: float = 45.0
    enabled: bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkloadConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown workload settings: {', '.join(unknown)}")
        return cls(**data)


def counter_agent(k: int) -> str:
    return f"{COUNTER_KIND}/c{k}"


def classify(exc: BaseException, op: str = "") -> tuple[str, str]:
    """(outcome, error kind) of a failed operation. Only an invalid request is known not
    to have happened; a timeout, an unreachable daemon or a lost connection may hide an
    operation that did happen (Mesh reports a connection lost mid-call as unreachable).

    A state write refused with ``overloaded`` (storage failing, or too many requests) did
    not happen either — unless the error carries the write's outcome (``needed``): then it
    was applied in memory and only missed the disk, so it may well survive."""
    if isinstance(exc, errors.Invalid | errors.NotFound | errors.Conflict):
        return FAIL, exc.kind.value
    if op in WRITE_OPS and isinstance(exc, errors.Overloaded) and "needed" not in exc.detail:
        return FAIL, exc.kind.value
    if isinstance(exc, MeshError):
        return UNKNOWN, exc.kind.value
    if isinstance(exc, TimeoutError):
        return UNKNOWN, "harness_timeout"
    return UNKNOWN, type(exc).__name__


class Workload:
    """Use :func:`open_workload`."""

    def __init__(
        self, cluster: Cluster, history: History, config: WorkloadConfig, rng: random.Random
    ) -> None:
        self.cluster = cluster
        self.history = history
        self.config = config
        self.rng = rng
        self.meshes: dict[str, Mesh] = {}
        self.duplicates: dict[str, dict[str, Agent]] = {}
        self._seq = itertools.count(1)
        self._stop = anyio.Event()
        self._drivers_done = anyio.Event()
        self._bursts: list[anyio.Event] = []
        self._tg: TaskGroup | None = None

    @property
    def hosts(self) -> list[str]:
        return self.cluster.hosts

    # ------------------------------------------------------------------ recording

    async def _op(
        self, op: str, host: str, id_: str, fn: Callable[[], Awaitable[Any]], **fields: Any
    ) -> tuple[str, Any]:
        t0 = self.history.now()
        result: Any = None
        error: str | None = None
        detail: dict[str, Any] | None = None
        limit = (
            self.config.op_timeout if op in ("request", "register") else self.config.write_timeout
        )
        try:
            with anyio.fail_after(limit):
                result = await fn()
            outcome = OK
        except (MeshError, TimeoutError) as exc:
            outcome, error = classify(exc, op)
            if isinstance(exc, MeshError) and exc.detail:
                detail = exc.detail
        self.history.add(
            "op",
            op=op,
            host=host,
            id=id_,
            t0=t0,
            t1=self.history.now(),
            outcome=outcome,
            error=error,
            result=result,
            **({"detail": detail} if detail else {}),
            **fields,
        )
        return outcome, result

    # ------------------------------------------------------------------ agents

    def _counter_factory(self, host: str) -> Callable[[str], Any]:
        history = self.history

        def make(name: str) -> Any:
            async def handle(ctx: AgentContext, msg: Message) -> dict[str, Any]:
                history.add("handled", agent=ctx.name, host=host, id=msg.id)
                ops: list[dict[str, Any]] = [
                    {"op": "append", "path": [HANDLED_LOG], "values": [msg.id]},
                    {"op": "incr", "path": ["count"], "by": 1},
                ]
                res = await ctx.state.update(ops, "majority", once=msg.id)
                return {"host": host, "duplicate": bool(res.get("duplicate"))}

            return handle

        return make

    async def register_duplicate(self, name: str, hosts: list[str]) -> None:
        """Serve ``name`` from each of ``hosts`` at once (each through its own daemon)."""

        async def noop(_ctx: AgentContext, _msg: Message) -> None:
            return None

        self.duplicates.setdefault(name, {})

        async def one(host: str) -> None:
            async def serve() -> dict[str, Any]:
                agent = await self.meshes[host].serve(name, noop, kind="dup")
                self.duplicates[name][host] = agent
                info = agent.info
                return {
                    "node": info.node if info else None,
                    "entry_id": info.entry_id if info else None,
                    "registered_at": info.registered_at if info else None,
                }

            await self._op("register", host, f"{name}@{host}", serve, name=name)

        async with anyio.create_task_group() as tg:
            for host in hosts:
                tg.start_soon(one, host)

    def duplicate_report(self) -> dict[str, dict[str, Any]]:
        """Per duplicate name and host: did our agent stop, why, and who it says won."""
        out: dict[str, dict[str, Any]] = {}
        for name, agents in self.duplicates.items():
            out[name] = {}
            for host, agent in agents.items():
                winner = agent.conflict_winner
                out[name][host] = {
                    "running": not agent.stopped.is_set(),
                    "stop_reason": agent.stop_reason,
                    "entry_id": agent.info.entry_id if agent.info else None,
                    "winner": {"node": winner.node, "entry_id": winner.entry_id}
                    if winner
                    else None,
                }
        return out

    # ------------------------------------------------------------------ drivers

    def start_drivers(self) -> None:
        """Start writers, requesters and the publisher (until :meth:`stop_drivers`)."""
        assert self._tg is not None
        cfg = self.config
        tg = self._tg

        async def drivers() -> None:
            async with anyio.create_task_group() as inner:
                for i in range(cfg.writers):
                    inner.start_soon(self._writer, i)
                for i in range(cfg.requesters):
                    inner.start_soon(self._requester, i)
                if cfg.publish_interval > 0:
                    inner.start_soon(self._publisher)
            self._drivers_done.set()

        if cfg.enabled:
            tg.start_soon(drivers)
        else:
            self._drivers_done.set()

    async def stop_drivers(self) -> None:
        """Stop starting operations; wait for those in flight (each is bounded in time)."""
        self._stop.set()
        await self._drivers_done.wait()
        for done in self._bursts:
            await done.wait()

    async def _pause(self, seconds: float) -> None:
        with anyio.move_on_after(seconds * self.rng.uniform(0.5, 1.5)):
            await self._stop.wait()

    async def write(self, host: str, kind: str, writer: str) -> None:
        """One recorded write through ``host``: a fresh key (``majority`` or ``local``) or
        an increment of the majority counter (``incr``)."""
        seq = next(self._seq)
        doc = self.meshes[host].state(LOCAL_DOC if kind == "local" else MAJORITY_DOC)
        if kind == "incr":
            key = INCR_KEY
            ops = [{"op": "incr", "path": [INCR_KEY], "by": 1}]
        else:
            key = f"{kind[0]}{seq}"
            ops = [{"op": "set", "path": [key], "value": {"seq": seq, "host": host}}]
        durability: Durability = "local" if kind == "local" else "majority"

        async def write() -> Any:
            res = await doc.update(ops, durability)
            return {k: res.get(k) for k in ("acked", "needed", "total")}

        await self._op(
            "incr" if kind == "incr" else "write",
            host,
            f"{writer}-{seq}",
            write,
            doc=doc.name,
            key=key,
            value={"seq": seq, "host": host} if kind != "incr" else 1,
            durability=durability,
        )

    async def _writer(self, index: int) -> None:
        kinds = list(self.config.mix)
        weights = [self.config.mix[k] for k in kinds]
        while not self._stop.is_set():
            host = self.rng.choice(self.hosts)
            await self.write(host, self.rng.choices(kinds, weights)[0], f"w{index}")
            await self._pause(self.config.write_interval)

    def write_burst(self, hosts: list[str], kind: str, count: int) -> None:
        """Start ``count`` writes of ``kind`` through each of ``hosts`` at once, in the
        background (the schedule goes on; a majority write to a cut-off host takes up to
        the daemon's majority timeout to fail)."""
        assert self._tg is not None
        if kind not in ("majority", "local", "incr"):
            raise ValueError(f"write_burst: kind is majority, local or incr, not {kind!r}")
        done = anyio.Event()
        self._bursts.append(done)

        async def burst() -> None:
            try:
                async with anyio.create_task_group() as tg:
                    for host in hosts:
                        for _ in range(count):
                            tg.start_soon(self.write, host, kind, "b")
            finally:
                done.set()

        self._tg.start_soon(burst)

    async def _requester(self, index: int) -> None:
        cfg = self.config
        while not self._stop.is_set():
            host = self.rng.choice(self.hosts)
            agent = counter_agent(self.rng.randint(1, cfg.counters))
            rid = f"r{index}-{next(self._seq)}"
            mesh = self.meshes[host]

            async def request(mesh: Mesh = mesh, agent: str = agent, rid: str = rid) -> Any:
                return await mesh.request(
                    agent, {"id": rid}, at_least_once=True, id=rid, timeout=cfg.request_timeout
                )

            await self._op("request", host, rid, request, agent=agent)
            await self._pause(cfg.request_interval)

    async def _publisher(self) -> None:
        while not self._stop.is_set():
            host = self.rng.choice(self.hosts)
            sid = f"s{next(self._seq)}"
            mesh = self.meshes[host]

            async def publish(mesh: Mesh = mesh, sid: str = sid) -> Any:
                return await mesh.publish(TOPIC, {"id": sid}, id=sid)

            await self._op("publish", host, sid, publish, topic=TOPIC)
            await self._pause(self.config.publish_interval)

    # ------------------------------------------------------------------ background

    async def _subscriber(self, host: str) -> None:
        while True:
            try:
                async with self.meshes[host].subscribe(PATTERN) as signals:
                    async for sig in signals:
                        self.history.add("signal", host=host, id=sig.id, topic=sig.topic)
            except MeshError:
                await anyio.sleep(0.5)

    async def _watch_members(self, host: str) -> None:
        sock = self.cluster.socket(host)
        while True:
            try:
                async with (
                    Connection.open(sock, client="chaos-watch", timeout=3.0) as conn,
                    conn.stream("members.watch") as events,
                ):
                    self.history.add("member", observer=host, kind="watching", member=None)
                    async for event in events:
                        member = event.get("member", {})
                        self.history.add(
                            "member",
                            observer=host,
                            kind=event.get("kind"),
                            member=member.get("name"),
                            incarnation=member.get("incarnation"),
                        )
            except (MeshError, OSError, anyio.EndOfStream, anyio.BrokenResourceError):
                pass
            await anyio.sleep(0.3)


@asynccontextmanager
async def open_workload(
    cluster: Cluster, history: History, config: WorkloadConfig, rng: random.Random
) -> AsyncIterator[Workload]:
    """Connect a mesh to every host, serve the counter kind everywhere, subscribe and watch;
    the drivers start with :meth:`Workload.start_drivers`. Everything stops on exit."""
    wl = Workload(cluster, history, config, rng)
    async with contextlib.AsyncExitStack() as stack:
        for host in cluster.hosts:
            wl.meshes[host] = await stack.enter_async_context(
                Mesh.connect(cluster.socket(host), client=f"chaos/{host}")
            )
        if config.enabled and config.requesters:
            # Each counter agent's state starts with an empty list and a zero counter, written
            # to a majority before any request, so no handler ever creates them (concurrently).
            first = wl.meshes[cluster.hosts[0]]
            for k in range(1, config.counters + 1):
                await first.state(f"agent:{counter_agent(k)}").update(
                    [
                        {"op": "set", "path": [HANDLED_LOG], "value": []},
                        {"op": "set", "path": ["count"], "value": {"$counter": 0}},
                    ],
                    "majority",
                )
        async with anyio.create_task_group() as tg:
            wl._tg = tg
            for host in cluster.hosts:
                tg.start_soon(wl._watch_members, host)
                tg.start_soon(wl._subscriber, host)
                if config.enabled and config.requesters:
                    await wl.meshes[host].serve_kind(
                        COUNTER_KIND,
                        wl._counter_factory(host),
                        capacity=100,
                        strategy="keep_majority",
                        idle_timeout=None,
                    )
            try:
                yield wl
            finally:
                tg.cancel_scope.cancel()
