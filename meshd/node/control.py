"""API ops for the daemon itself: the membership table (:class:`MemberOps`), gossip keys
(:class:`KeyOps`), and this daemon's identity, op listing and leave (:class:`DaemonOps`)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from meshd import __version__
from meshd.api.fanout import Fanout
from meshd.api.handles import Stream
from meshd.api.server import ApiServer
from meshd.api.session import Session
from meshd.config.model import Config
from meshd.membership.core import Membership
from meshd.membership.driver import MembershipDriver
from meshd.membership.events import MemberEvent, MemberView
from meshd.node.keys import OPS as KEY_OPS
from meshd.node.keys import KeyService
from meshd.node.storage_ops import store_summary
from meshd.replication.messages import PROTOCOL_VERSION as REPLICATION_VERSION
from meshd.routing.stats import RouterStats
from meshd.security.keyring import Keyring
from meshd.storage.driver import StorageDriver
from meshd.transport.stats import TransportStats
from meshd.transport.streams import STREAM_VERSION
from meshd.wire.membership import Status
from meshd.wire.packet import PROTOCOL_VERSION
from meshd_client.protocol import errors, messages

WallTime = Callable[[float], float]  # a core timestamp (trio clock) as Unix time


def member_dict(wall_time: WallTime, m: MemberView) -> dict[str, Any]:
    return {
        "name": m.name,
        "addr": f"{m.addr[0]}:{m.addr[1]}",
        "status": m.status.name.lower(),
        "incarnation": m.incarnation,
        "tags": m.tags,
        "since": round(wall_time(m.status_since), 3),
    }


class MemberOps:
    """``members``, ``members.watch`` and ``members.remove`` over the membership driver (its
    core's table, its event listeners, its remove)."""

    def __init__(self, membership: MembershipDriver, wall_time: WallTime) -> None:
        self.membership = membership
        self.wall_time = wall_time
        self.watchers: Fanout[MemberEvent] = Fanout()
        membership.listeners.append(self.watchers)

    async def members(self, _session: Session, req: messages.Request) -> Any:
        status = req.args.get("status")
        views = self.membership.core.members()
        if status is not None:
            if not isinstance(status, str) or status.upper() not in Status.__members__:
                raise errors.Invalid("status must be alive, suspect, dead or left")
            views = [m for m in views if m.status is Status[status.upper()]]
        return [member_dict(self.wall_time, m) for m in sorted(views, key=lambda m: m.name)]

    async def watch(self, _session: Session, _req: messages.Request, stream: Stream) -> None:
        def on_event(event: MemberEvent) -> None:
            stream.offer(
                {"kind": event.kind.value, "member": member_dict(self.wall_time, event.member)}
            )

        remove = self.watchers.add(on_event)
        try:
            await stream.until_failed()
        finally:
            remove()

    async def remove(self, _session: Session, req: messages.Request) -> Any:
        name = req.args.get("node")
        if not isinstance(name, str) or not name:
            raise errors.Invalid("node must be the name of a member")
        removed = await self.membership.remove(name)
        return {"node": name, "status": "left", "removed": removed}

    def register(self, api: ApiServer) -> None:
        api.add_op(
            "members",
            self.members,
            "the membership table (optionally filtered by status)",
            inline=True,
        )
        api.add_stream_op("members.watch", self.watch, "membership events as they happen")
        api.add_op(
            "members.remove",
            self.remove,
            "take a dead member out of the cluster and every majority (marked left everywhere)",
        )


class KeyOps:
    """``keys``: list, install, use or remove a gossip key on every member."""

    def __init__(self, keys: KeyService) -> None:
        self.keys = keys

    async def keys_op(self, _session: Session, req: messages.Request) -> Any:
        op = req.args.get("op", "list")
        if op not in KEY_OPS:
            raise errors.Invalid(f"keys op must be one of {', '.join(KEY_OPS)}")
        raw = req.args.get("key")
        key: bytes | None = None
        if op != "list":
            if not isinstance(raw, str):
                raise errors.Invalid(f"keys {op} needs a base64 key")
            try:
                key = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                raise errors.Invalid("key is not valid base64") from None
        return await self.keys.cluster_op(op, key)

    def register(self, api: ApiServer) -> None:
        api.add_op("keys", self.keys_op, "list/install/use/remove gossip keys on every member")


@dataclass(slots=True)
class DaemonView:
    """What ``info`` reports, from whoever owns it (each read when asked)."""

    config: Config
    membership: Membership
    keyring: Keyring | None
    transport: TransportStats
    routing: RouterStats
    documents: Callable[[], int]
    storage: StorageDriver | None
    tracing: bool
    tracing_rejected: dict[str, int]
    started: float  # trio clock
    wall_time: WallTime


class DaemonOps:
    """``info`` (this daemon: identity, membership counts, counters), ``ops`` (the API's own
    listing) and ``leave`` (``request_leave``: the node leaves gracefully and stops)."""

    def __init__(self, view: DaemonView, api: ApiServer, request_leave: Callable[[], None]) -> None:
        self.view = view
        self.api = api
        self.request_leave = request_leave

    async def info(self, session: Session, _req: messages.Request) -> Any:
        v = self.view
        api = self.api
        core = v.membership
        counts = {s.name.lower(): 0 for s in Status}
        for m in core.members():
            counts[m.status.name.lower()] += 1
        stats = core.stats
        transport = v.transport
        return {
            "node": v.config.node.name,
            "version": __version__,
            "addr": f"{core.addr[0]}:{core.addr[1]}",
            "incarnation": core.incarnation,
            "profile": v.config.profile,
            "joined": core.joined,
            "members": counts,
            "awareness": core.awareness.score,
            "encrypted": v.keyring is not None,
            "keys": len(v.keyring.keys) if v.keyring else 0,
            "label": v.config.security.label,
            "uptime_s": round(trio.current_time() - v.started, 3),
            "started": round(v.wall_time(v.started), 3),
            "protocols": {
                "gossip": PROTOCOL_VERSION,
                "streams": STREAM_VERSION,
                "replication": REPLICATION_VERSION,
                "api": list(messages.SUPPORTED_VERSIONS),
                "api_session": session.version,
            },
            "store": store_summary(v.storage, v.documents()),
            "socket": v.config.api.socket,
            "tracing": {
                "enabled": v.tracing,
                # malformed trace context: from API requests, and in DELIVERs from peers
                "malformed_traceparent": v.tracing_rejected.get("malformed_traceparent", 0)
                + v.routing.bad_trace_context,
            },
            "stats": {
                "probes": stats.probes,
                "probe_failures": stats.probe_failures,
                "suspicions": stats.suspicions,
                "refutations": stats.refutations,
                "deaths": stats.deaths,
                "deaths_by_refusal": stats.deaths_by_refusal,
                "join_failures": stats.join_failures,
                "reaped": stats.reaped,
                "removed": stats.removed,
                "packets_in": stats.packets_in,
                "packets_out": stats.packets_out,
                "rejected": {**stats.rejected, **transport.rejected},
            },
            "transport": {
                "accepted": transport.tcp_accepted,
                "refused_busy": transport.tcp_refused_busy,
                "resets": transport.tcp_resets,
            },
            "api": {
                "sessions": api.stats.active_sessions,
                "streams": api.open_streams,
                "buffered": api.buffered,
                "rejected": dict(api.stats.rejected),
            },
        }

    async def ops(self, _session: Session, _req: messages.Request) -> Any:
        return self.api.describe()

    async def leave(self, _session: Session, _req: messages.Request) -> Any:
        self.request_leave()
        return {"leaving": True}

    def register(self) -> None:
        api = self.api
        api.add_op("ops", self.ops, "every API op: name, stream or not, description", inline=True)
        api.add_op(
            "info", self.info, "this daemon: identity, membership counts, counters", inline=True
        )
        api.add_op("leave", self.leave, "leave the cluster gracefully and stop the daemon")
