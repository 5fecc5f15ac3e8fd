"""API ops for the replicated data: the registry and shared state documents.

Two small classes, each given exactly what it uses when it is built (no ``Node``):
:class:`RegistryOps` (``register``, ``unregister``, ``lookup``, ``agents``,
``registry.watch``) and :class:`StateOps` (``state.*``, ``docs.digest``). ``register(api)``
adds their ops to the API server's table."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from meshd.api import args as args_
from meshd.api.fanout import Fanout
from meshd.api.handles import Stream
from meshd.api.server import ApiServer
from meshd.api.session import Session
from meshd.node.agent_ops import trace_of
from meshd.node.tracing import SERVER, Tracer
from meshd.registry.model import MAX_CAPABILITIES
from meshd.registry.registry import Registry, RegistryEvent
from meshd.replication.core import Durability
from meshd.replication.driver import WriteResult
from meshd.replication.replica import DocStore
from meshd.state.service import StateService, check_name, outcome
from meshd_client.protocol import errors, messages
from meshd_client.protocol.errors import MeshError

SESSION_AGENTS = "registered_agents"

WaitForMajority = Callable[[int | None], Awaitable[WriteResult]]
"""Waits for a ``majority`` write's outcome (``ReplicationDriver.wait``)."""


def durability_of(args: dict[str, Any]) -> Durability:
    value = args.get("durability", "local")
    if value not in ("local", "majority"):
        raise errors.Invalid(
            "durability must be 'local' or 'majority'", detail={"field": "durability"}
        )
    return "majority" if value == "majority" else "local"


class RegistryOps:
    """Agent names: register and unregister (this node's entries, dropped with the session
    that made them), resolve, list, watch. Uses the registry and, for ``majority`` writes,
    a way to wait for their outcome."""

    def __init__(self, registry: Registry, wait: WaitForMajority) -> None:
        self.registry = registry
        self.wait = wait
        self.watchers: Fanout[RegistryEvent] = Fanout()
        registry.listeners.append(self.watchers)

    def register(self, api: ApiServer) -> None:
        api.add_op("register", self.register_agent, "register an agent name on this node")
        api.add_op("unregister", self.unregister_agent, "remove this node's entry for a name")
        api.add_op(
            "lookup",
            self.lookup,
            "resolve an agent name (local index; never the network)",
            inline=True,
        )
        api.add_op(
            "agents",
            self.agents,
            "list registry entries (filters: kind, capability, node)",
            inline=True,
        )
        api.add_stream_op("registry.watch", self.watch, "registry events as they happen")

    def release(self, session: Session) -> None:
        """A client went away: its agents are unregistered cluster-wide."""
        self.registry.unregister_many(
            trio.current_time(), sorted(session.state.pop(SESSION_AGENTS, set()))
        )

    async def _durability(self, token: int | None) -> dict[str, Any]:
        return outcome(await self.wait(token))

    async def register_agent(self, session: Session, req: messages.Request) -> Any:
        args = req.args
        durability = durability_of(args)
        entry, token = self.registry.register(
            trio.current_time(),
            args_.text(args, "name"),
            kind=args_.opt_text(args, "kind", "") or "",
            capabilities=args_.text_list(args, "capabilities", max_items=MAX_CAPABILITIES),
            metadata=args_.mapping(args, "metadata"),
            durability=durability,
        )
        agents: set[str] = session.state.setdefault(SESSION_AGENTS, set())
        if not agents:
            session.close_hooks.append(self.release)
        agents.add(entry.name)
        out = entry.to_dict()
        if durability == "majority":
            out["durability"] = await self._durability(token)
        return out

    async def unregister_agent(self, session: Session, req: messages.Request) -> Any:
        name = args_.text(req.args, "name")
        durability = durability_of(req.args)
        removed, token = self.registry.unregister(trio.current_time(), name, durability=durability)
        if not removed:
            raise errors.NotFound(f"{name!r} is not registered on this node")
        session.state.get(SESSION_AGENTS, set()).discard(name)
        out: dict[str, Any] = {"removed": True}
        if durability == "majority":
            out["durability"] = await self._durability(token)
        return out

    async def lookup(self, _session: Session, req: messages.Request) -> Any:
        name = args_.text(req.args, "name")
        entry = self.registry.lookup(name)
        if entry is None:
            raise errors.NotFound(f"no live agent named {name!r}")
        return entry.to_dict()

    async def agents(self, _session: Session, req: messages.Request) -> Any:
        args = req.args
        limit = args_.integer(args, "limit", 10_000, 0, 1 << 31)
        filters = {
            "kind": args_.opt_text(args, "kind"),
            "capability": args_.opt_text(args, "capability"),
            "node": args_.opt_text(args, "node"),
        }
        if limit == 0:
            return {"count": self.registry.count(**filters), "agents": []}
        found = self.registry.entries(**filters)
        return {"count": len(found), "agents": [e.to_dict() for e in found[:limit]]}

    async def watch(self, _session: Session, _req: messages.Request, stream: Stream) -> None:
        def listener(event: RegistryEvent) -> None:
            stream.offer(event.to_dict())

        remove = self.watchers.add(listener)
        try:
            await stream.until_failed()
        finally:
            remove()


class StateOps:
    """Shared state documents: read, change (spans when tracing is on), list, watch, and the
    convergence digest. Uses the state service, the replicas' store (read only) and the
    tracer with its count of malformed trace contexts."""

    def __init__(
        self,
        state: StateService,
        store: DocStore,
        tracer: Tracer | None,
        tracing_rejected: dict[str, int],
    ) -> None:
        self.state = state
        self.store = store
        self.tracer = tracer
        self.tracing_rejected = tracing_rejected

    def register(self, api: ApiServer) -> None:
        api.add_op(
            "docs.digest",
            self.digest,
            "replicated documents and their hashes (convergence)",
            inline=True,
        )
        api.add_op("state.get", self.get, "read a state document (or a path in it)", inline=True)
        api.add_op("state.update", self.update, "apply operations to a state document")
        api.add_op("state.list", self.names, "the state documents this node holds", inline=True)
        api.add_stream_op("state.watch", self.watch, "a state document's value on every change")

    async def get(self, _session: Session, req: messages.Request) -> Any:
        path = args_.listing(req.args, "path")
        return self.state.get(check_name(req.args.get("doc")), path)

    async def update(self, _session: Session, req: messages.Request) -> Any:
        args = req.args
        doc = check_name(args.get("doc"))
        ops = args_.listing(args, "ops")
        durability = durability_of(args)
        once = args_.opt_text(args, "once", max_len=128)
        trace = trace_of(self.tracing_rejected, args)
        tracer = self.tracer
        if tracer is None:
            return await self.state.update(doc, ops, durability, once=once)
        span = tracer.start("meshd.api state.update", trace, SERVER, doc=doc, durability=durability)

        def majority_wait() -> Callable[[str], None]:
            return tracer.start("meshd.majority_wait", span.context, doc=doc).end

        outcome_ = "cancelled"
        try:
            result = await self.state.update(doc, ops, durability, once=once, on_wait=majority_wait)
            outcome_ = "ok"
            return result
        except MeshError as exc:
            outcome_ = exc.kind.value
            raise
        finally:
            span.end(outcome_)

    async def names(self, _session: Session, _req: messages.Request) -> Any:
        return self.state.names()

    async def watch(self, _session: Session, req: messages.Request, stream: Stream) -> None:
        name = check_name(req.args.get("doc"))
        try:
            stream.emit({"kind": "current", "value": self.state.get(name)})
        except errors.NotFound:
            stream.emit({"kind": "current", "value": None})
        cancel = self.state.watch(
            name, lambda kind, value: stream.offer({"kind": kind, "value": value})
        )
        try:
            await stream.until_failed()
        finally:
            cancel()

    async def digest(self, _session: Session, req: messages.Request) -> Any:
        """Every document this node holds with its epoch and state-vector hash (equal on
        every node once replication converged) and the store's overall digest."""
        prefix = args_.opt_text(req.args, "prefix", "") or ""
        store = self.store
        docs = {r.name: [r.epoch, f"{r.hash:016x}"] for r in store if r.name.startswith(prefix)}
        return {"digest": store.digest().hex(), "count": len(docs), "docs": docs}
