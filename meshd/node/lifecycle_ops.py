"""API ops for the agent lifecycle: runners of kinds, spawn, drain and placement
(:class:`PlacementOps`), and reminders (:class:`ReminderOps`, given only the reminders it
keeps)."""

from __future__ import annotations

import time
from typing import Any, Protocol

import trio

from meshd.api import args as args_
from meshd.api.handles import Stream
from meshd.api.server import ApiServer
from meshd.api.session import Session
from meshd.membership.events import MemberView
from meshd.placement.kinds import Strategy, check_kind
from meshd.placement.reminders import Reminders
from meshd.placement.service import Placement, Runner
from meshd.routing.driver import RoutingDriver
from meshd_client.protocol import errors, messages


class Members(Protocol):
    """The membership table, to tell whether a host exists."""

    def member(self, name: str) -> MemberView | None: ...


MAX_CAPACITY = 1_000_000
MAX_REMINDER_MS = 365 * 86400_000  # a reminder's period or delay: at most a year


class PlacementOps:
    """Runners of kinds and placement: ``kind.serve``, ``spawn``, ``drain`` (here or, by a
    control message, on another host), ``placement`` and ``kinds``, over placement, the
    routing driver (for control messages) and the membership table (to name a host)."""

    def __init__(
        self, node_name: str, placement: Placement, routing: RoutingDriver, members: Members
    ) -> None:
        self.node_name = node_name
        self.placement = placement
        self.routing = routing
        self.members = members

    async def serve_kind(self, session: Session, req: messages.Request, stream: Stream) -> None:
        """A client can create agents of a kind: the daemon streams it activation requests."""
        args = req.args
        kind = check_kind(args.get("kind"))
        try:
            strategy = Strategy(args_.opt_text(args, "strategy") or Strategy.KEEP_MAJORITY.value)
        except ValueError:
            raise errors.Invalid("strategy must be keep_majority or allow_duplicates") from None
        runner = Runner(
            kind, args_.integer(args, "capacity", 1000, 1, MAX_CAPACITY), strategy, session, stream
        )
        self.placement.attach_runner(runner)
        try:
            stream.emit({"type": "serving", "kind": kind, "node": self.node_name})
            await stream.until_failed()
        finally:
            self.placement.detach_runner(runner)

    async def spawn(self, _session: Session, req: messages.Request) -> Any:
        kind = check_kind(req.args.get("kind"))
        name = args_.text(req.args, "name")
        timeout = float(args_.integer(req.args, "timeout", 10, 1, 600))
        entry = await self.placement.ensure_active(name, kind, trio.current_time() + timeout)
        return entry.to_dict()

    async def drain(self, _session: Session, req: messages.Request) -> Any:
        target = args_.opt_text(req.args, "node") or self.node_name
        if target != self.node_name:
            if self.members.member(target) is None:
                raise errors.NotFound(f"no member named {target!r}", detail={"node": target})
            return await self.routing.control(target, "drain", {})
        return await self.drain_here({})

    async def drain_here(self, _args: dict[str, Any]) -> Any:
        return {"node": self.node_name, "draining": True, "moving": self.placement.start_drain()}

    async def where(self, _session: Session, req: messages.Request) -> Any:
        kind = check_kind(req.args.get("kind"))
        name = args_.text(req.args, "name")
        placement = self.placement
        return {
            "kind": kind,
            "name": name,
            "owner": placement.owner(kind, name),
            "hosts": {
                h: {
                    "capacity": i.capacity,
                    "active": i.active,
                    "accepts": i.accepts,
                    "draining": i.draining,
                    "strategy": i.strategy.value,
                }
                for h, i in placement.table.hosts(kind).items()
            },
            "majority": placement.quorum.has_majority,
            "strategy": (s.value if (s := placement.table.strategy(kind)) else None),
        }

    async def kinds(self, _session: Session, _req: messages.Request) -> Any:
        table = self.placement.table
        return {
            kind: {
                h: {
                    "capacity": i.capacity,
                    "active": i.active,
                    "draining": i.draining,
                    "strategy": i.strategy.value,
                }
                for h, i in table.hosts(kind).items()
            }
            for kind in sorted(table.kinds())
        }

    def register(self, api: ApiServer) -> None:
        self.routing.control_handlers["drain"] = self.drain_here
        api.add_stream_op(
            "kind.serve", self.serve_kind, "serve a kind: receive activation requests"
        )
        api.add_op("spawn", self.spawn, "place and activate an agent of a kind")
        api.add_op("drain", self.drain, "move every agent off a host (this one by default)")
        api.add_op(
            "placement", self.where, "where an agent of a kind belongs, and why", inline=True
        )
        api.add_op("kinds", self.kinds, "every kind and the hosts serving it", inline=True)


class ReminderOps:
    """``agent.remind``, ``agent.forget``, ``agent.reminders``: durable reminders, kept in
    the replicated reminders documents (given: :class:`Reminders`)."""

    def __init__(self, reminders: Reminders) -> None:
        self.reminders = reminders

    def register(self, api: ApiServer) -> None:
        api.add_op(
            "agent.remind", self.remind, "schedule a durable reminder for an agent", inline=True
        )
        api.add_op("agent.forget", self.forget, "cancel a reminder", inline=True)
        api.add_op("agent.reminders", self.listing, "an agent's reminders", inline=True)

    async def remind(self, _session: Session, req: messages.Request) -> Any:
        args = req.args
        agent = args_.text(args, "agent")
        name = args_.text(args, "name")
        every = args_.integer(args, "every_ms", 0, 0, MAX_REMINDER_MS)
        if "at_ms" in args:
            due = args_.integer(args, "at_ms", 0, 0, 2**62)
        else:
            due = int(time.time() * 1000) + args_.integer(args, "after_ms", 0, 0, MAX_REMINDER_MS)
        self.reminders.set(trio.current_time(), agent, name, due, every, args.get("data"))
        return {"agent": agent, "name": name, "due_ms": due, "every_ms": every}

    async def forget(self, _session: Session, req: messages.Request) -> Any:
        removed = self.reminders.forget(
            trio.current_time(), args_.text(req.args, "agent"), args_.text(req.args, "name")
        )
        if not removed:
            raise errors.NotFound("no such reminder")
        return {"removed": True}

    async def listing(self, _session: Session, req: messages.Request) -> Any:
        return self.reminders.listing(args_.text(req.args, "agent"))
