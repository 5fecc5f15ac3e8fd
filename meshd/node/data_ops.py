"""API ops for the replicated data: the registry and shared state documents."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from meshd.api.server import Session, Stream
from meshd.registry.registry import RegistryEvent
from meshd.replication.core import Durability
from meshd.state.service import check_name, outcome
from meshd_client.protocol import errors, messages

if TYPE_CHECKING:
    from meshd.node.node import Node

SESSION_AGENTS = "registered_agents"


def durability_of(args: dict[str, Any]) -> Durability:
    value = args.get("durability", "local")
    if value not in ("local", "majority"):
        raise errors.Invalid("durability must be 'local' or 'majority'")
    return "majority" if value == "majority" else "local"


def _opt_str(args: dict[str, Any], key: str) -> str | None:
    value = args.get(key)
    if value is not None and not isinstance(value, str):
        raise errors.Invalid(f"{key} must be a string")
    return value


async def _majority(node: Node, token: int | None) -> dict[str, Any]:
    return outcome(await node.replication.wait(token))


def register(node: Node) -> None:
    api = node.api

    def release(session: Session) -> None:
        """A client went away: its agents are unregistered cluster-wide."""
        node.registry.unregister_many(
            trio.current_time(), sorted(session.state.pop(SESSION_AGENTS, set()))
        )

    async def register_agent(session: Session, req: messages.Request) -> Any:
        args = req.args
        durability = durability_of(args)
        if not isinstance(args.get("name"), str):
            raise errors.Invalid("name must be a string")
        entry, token = node.registry.register(
            trio.current_time(),
            args.get("name", ""),
            kind=args.get("kind", ""),
            capabilities=args.get("capabilities", ()),
            metadata=args.get("metadata"),
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
        name = req.args.get("name")
        if not isinstance(name, str):
            raise errors.Invalid("name must be a string")
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
        name = req.args.get("name")
        if not isinstance(name, str):
            raise errors.Invalid("name must be a string")
        entry = node.registry.lookup(name)
        if entry is None:
            raise errors.NotFound(f"no live agent named {name!r}")
        return entry.to_dict()

    async def agents(_session: Session, req: messages.Request) -> Any:
        args = req.args
        if args.get("limit") == 0:
            count = node.registry.count(
                kind=_opt_str(args, "kind"),
                capability=_opt_str(args, "capability"),
                node=_opt_str(args, "node"),
            )
            return {"count": count, "agents": []}
        found = node.registry.entries(
            kind=_opt_str(args, "kind"),
            capability=_opt_str(args, "capability"),
            node=_opt_str(args, "node"),
        )
        limit = args.get("limit", 10_000)
        if type(limit) is not int or limit < 0:
            raise errors.Invalid("limit must be a non-negative integer")
        return {"count": len(found), "agents": [e.to_dict() for e in found[:limit]]}

    async def registry_watch(_session: Session, _req: messages.Request, stream: Stream) -> None:
        def listener(event: RegistryEvent) -> None:
            stream.offer(event.to_dict())

        node.registry.listeners.append(listener)
        try:
            await stream.until_failed()
        finally:
            node.registry.listeners.remove(listener)

    async def state_get(_session: Session, req: messages.Request) -> Any:
        path = req.args.get("path")
        if path is not None and not isinstance(path, list):
            raise errors.Invalid("path must be a list")
        return node.state.get(req.args.get("doc"), path)  # type: ignore[arg-type]

    async def state_update(_session: Session, req: messages.Request) -> Any:
        return await node.state.update(
            req.args.get("doc"),  # type: ignore[arg-type]
            req.args.get("ops"),
            durability_of(req.args),
            once=req.args.get("once"),
        )

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
        prefix = req.args.get("prefix", "")
        if not isinstance(prefix, str):
            raise errors.Invalid("prefix must be a string")
        store = node.replication.store
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
