"""API ops for the replicated data: the registry and shared state documents."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from meshd.api import args as args_
from meshd.api.fanout import Fanout
from meshd.api.handles import Stream
from meshd.api.session import Session
from meshd.node.agent_ops import trace_of
from meshd.node.tracing import SERVER
from meshd.registry.model import MAX_CAPABILITIES
from meshd.registry.registry import RegistryEvent
from meshd.replication.core import Durability
from meshd.state.service import check_name, outcome
from meshd_client.protocol import errors, messages
from meshd_client.protocol.errors import MeshError

if TYPE_CHECKING:
    from meshd.node.node import Node

SESSION_AGENTS = "registered_agents"


def durability_of(args: dict[str, Any]) -> Durability:
    value = args.get("durability", "local")
    if value not in ("local", "majority"):
        raise errors.Invalid(
            "durability must be 'local' or 'majority'", detail={"field": "durability"}
        )
    return "majority" if value == "majority" else "local"


async def _majority(node: Node, token: int | None) -> dict[str, Any]:
    return outcome(await node.replication_driver.wait(token))


def register(node: Node) -> None:
    api = node.api
    registry_watchers: Fanout[RegistryEvent] = Fanout()
    node.registry.listeners.append(registry_watchers)

    def release(session: Session) -> None:
        """A client went away: its agents are unregistered cluster-wide."""
        node.registry.unregister_many(
            trio.current_time(), sorted(session.state.pop(SESSION_AGENTS, set()))
        )

    async def register_agent(session: Session, req: messages.Request) -> Any:
        args = req.args
        durability = durability_of(args)
        entry, token = node.registry.register(
            trio.current_time(),
            args_.text(args, "name"),
            kind=args_.opt_text(args, "kind", "") or "",
            capabilities=args_.text_list(args, "capabilities", max_items=MAX_CAPABILITIES),
            metadata=args_.mapping(args, "metadata"),
            durability=durability,
        )
        agents: set[str] = session.state.setdefault(SESSION_AGENTS, set())
        if not agents:
            session.close_hooks.append(release)
        agents.add(entry.name)
        out = entry.to_dict()
        if durability == "majority":
            out["durability"] = await _majority(node, token)
        return out

    async def unregister_agent(session: Session, req: messages.Request) -> Any:
        name = args_.text(req.args, "name")
        durability = durability_of(req.args)
        removed, token = node.registry.unregister(trio.current_time(), name, durability=durability)
        if not removed:
            raise errors.NotFound(f"{name!r} is not registered on this node")
        session.state.get(SESSION_AGENTS, set()).discard(name)
        out: dict[str, Any] = {"removed": True}
        if durability == "majority":
            out["durability"] = await _majority(node, token)
        return out

    async def lookup(_session: Session, req: messages.Request) -> Any:
        name = args_.text(req.args, "name")
        entry = node.registry.lookup(name)
        if entry is None:
            raise errors.NotFound(f"no live agent named {name!r}")
        return entry.to_dict()

    async def agents(_session: Session, req: messages.Request) -> Any:
        args = req.args
        limit = args_.integer(args, "limit", 10_000, 0, 1 << 31)
        if limit == 0:
            count = node.registry.count(
                kind=args_.opt_text(args, "kind"),
                capability=args_.opt_text(args, "capability"),
                node=args_.opt_text(args, "node"),
            )
            return {"count": count, "agents": []}
        found = node.registry.entries(
            kind=args_.opt_text(args, "kind"),
            capability=args_.opt_text(args, "capability"),
            node=args_.opt_text(args, "node"),
        )
        return {"count": len(found), "agents": [e.to_dict() for e in found[:limit]]}

    async def registry_watch(_session: Session, _req: messages.Request, stream: Stream) -> None:
        def listener(event: RegistryEvent) -> None:
            stream.offer(event.to_dict())

        remove = registry_watchers.add(listener)
        try:
            await stream.until_failed()
        finally:
            remove()

    async def state_get(_session: Session, req: messages.Request) -> Any:
        path = args_.listing(req.args, "path")
        return node.state.get(check_name(req.args.get("doc")), path)

    async def state_update(_session: Session, req: messages.Request) -> Any:
        args = req.args
        doc = check_name(args.get("doc"))
        ops = args_.listing(args, "ops")
        durability = durability_of(args)
        once = args_.opt_text(args, "once", max_len=128)
        trace = trace_of(node, args)
        tracer = node.tracer
        if tracer is None:
            return await node.state.update(doc, ops, durability, once=once)
        span = tracer.start("meshd.api state.update", trace, SERVER, doc=doc, durability=durability)

        def majority_wait() -> Callable[[str], None]:
            assert tracer is not None
            return tracer.start("meshd.majority_wait", span.context, doc=doc).end

        outcome_ = "cancelled"
        try:
            result = await node.state.update(doc, ops, durability, once=once, on_wait=majority_wait)
            outcome_ = "ok"
            return result
        except MeshError as exc:
            outcome_ = exc.kind.value
            raise
        finally:
            span.end(outcome_)

    async def state_list(_session: Session, _req: messages.Request) -> Any:
        return node.state.names()

    async def state_watch(_session: Session, req: messages.Request, stream: Stream) -> None:
        name = check_name(req.args.get("doc"))
        try:
            stream.emit({"kind": "current", "value": node.state.get(name)})
        except errors.NotFound:
            stream.emit({"kind": "current", "value": None})
        cancel = node.state.watch(
            name, lambda kind, value: stream.offer({"kind": kind, "value": value})
        )
        try:
            await stream.until_failed()
        finally:
            cancel()

    async def digest(_session: Session, req: messages.Request) -> Any:
        """Every document this node holds with its epoch and state-vector hash (equal on
        every node once replication converged) and the store's overall digest."""
        prefix = args_.opt_text(req.args, "prefix", "") or ""
        store = node.replication_driver.store
        docs = {r.name: [r.epoch, f"{r.hash:016x}"] for r in store if r.name.startswith(prefix)}
        return {"digest": store.digest().hex(), "count": len(docs), "docs": docs}

    api.add_op(
        "docs.digest",
        digest,
        "replicated documents and their hashes (convergence)",
        inline=True,
    )
    api.add_op("register", register_agent, "register an agent name on this node")
    api.add_op("unregister", unregister_agent, "remove this node's entry for a name")
    api.add_op(
        "lookup",
        lookup,
        "resolve an agent name (local index; never the network)",
        inline=True,
    )
    api.add_op(
        "agents",
        agents,
        "list registry entries (filters: kind, capability, node)",
        inline=True,
    )
    api.add_stream_op("registry.watch", registry_watch, "registry events as they happen")
    api.add_op("state.get", state_get, "read a state document (or a path in it)", inline=True)
    api.add_op("state.update", state_update, "apply operations to a state document")
    api.add_op("state.list", state_list, "the state documents this node holds", inline=True)
    api.add_stream_op("state.watch", state_watch, "a state document's value on every change")
