"""API ops for the daemon itself: info, members (a watch stream, remove), leave, keys."""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Any

import trio

from meshd import __version__
from meshd.api.fanout import Fanout
from meshd.api.handles import Stream
from meshd.api.session import Session
from meshd.membership.events import MemberEvent, MemberView
from meshd.node.keys import OPS as KEY_OPS
from meshd.replication.messages import PROTOCOL_VERSION as REPLICATION_VERSION
from meshd.storage import records
from meshd.transport.streams import STREAM_VERSION
from meshd.wire.membership import Status
from meshd.wire.packet import PROTOCOL_VERSION
from meshd_client.protocol import errors, messages

if TYPE_CHECKING:
    from meshd.node.node import Node


def member_dict(node: Node, m: MemberView) -> dict[str, Any]:
    return {
        "name": m.name,
        "addr": f"{m.addr[0]}:{m.addr[1]}",
        "status": m.status.name.lower(),
        "incarnation": m.incarnation,
        "tags": m.tags,
        "since": round(node.wall_time(m.status_since), 3),
    }


def store_summary(node: Node) -> dict[str, Any]:
    """The store in a few fields (``meshctl storage`` has the rest); reads no files."""
    docs = len(node.replication_core.store)
    if node.storage is None:
        return {"enabled": False, "documents": docs}
    store = node.storage.store
    return {
        "enabled": True,
        "directory": store.directory,
        "healthy": store.healthy,
        "failure": store.failure,
        "documents": docs,
        "format": records.VERSION,
    }


def register(node: Node) -> None:
    api = node.api
    member_watchers: Fanout[MemberEvent] = Fanout()
    node.membership_driver.listeners.append(member_watchers)

    async def info(session: Session, _req: messages.Request) -> Any:
        core = node.membership_core
        counts = {s.name.lower(): 0 for s in Status}
        for m in core.members():
            counts[m.status.name.lower()] += 1
        stats = core.stats
        transport = node.transport_stats
        return {
            "node": node.node_name,
            "version": __version__,
            "addr": f"{core.addr[0]}:{core.addr[1]}",
            "incarnation": core.incarnation,
            "profile": node.config.profile,
            "joined": core.joined,
            "members": counts,
            "awareness": core.awareness.score,
            "encrypted": node.keyring is not None,
            "keys": len(node.keyring.keys) if node.keyring else 0,
            "label": node.config.security.label,
            "uptime_s": round(trio.current_time() - node.started_monotonic, 3),
            "started": round(node.wall_time(node.started_monotonic), 3),
            "protocols": {
                "gossip": PROTOCOL_VERSION,
                "streams": STREAM_VERSION,
                "replication": REPLICATION_VERSION,
                "api": list(messages.SUPPORTED_VERSIONS),
                "api_session": session.version,
            },
            "store": store_summary(node),
            "socket": node.config.api.socket,
            "tracing": {
                "enabled": node.tracer is not None,
                # malformed trace context: from API requests, and in DELIVERs from peers
                "malformed_traceparent": node.tracing_rejected.get("malformed_traceparent", 0)
                + node.routing_driver.stats.bad_trace_context,
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
                "rejected": {**stats.rejected, **node.transport_stats.rejected},
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

    async def members(_session: Session, req: messages.Request) -> Any:
        status = req.args.get("status")
        views = node.membership_core.members()
        if status is not None:
            if not isinstance(status, str) or status.upper() not in Status.__members__:
                raise errors.Invalid("status must be alive, suspect, dead or left")
            views = [m for m in views if m.status is Status[status.upper()]]
        return [member_dict(node, m) for m in sorted(views, key=lambda m: m.name)]

    async def watch(_session: Session, _req: messages.Request, stream: Stream) -> None:
        def on_event(event: MemberEvent) -> None:
            stream.offer({"kind": event.kind.value, "member": member_dict(node, event.member)})

        remove = member_watchers.add(on_event)
        try:
            await stream.until_failed()
        finally:
            remove()

    async def remove(_session: Session, req: messages.Request) -> Any:
        name = req.args.get("node")
        if not isinstance(name, str) or not name:
            raise errors.Invalid("node must be the name of a member")
        removed = await node.membership_driver.remove(name)
        return {"node": name, "status": "left", "removed": removed}

    async def leave(_session: Session, _req: messages.Request) -> Any:
        node.request_leave()
        return {"leaving": True}

    async def keys(_session: Session, req: messages.Request) -> Any:
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
        return await node.keys.cluster_op(op, key)

    async def ops(_session: Session, _req: messages.Request) -> Any:
        return api.describe()

    api.add_op("ops", ops, "every API op: name, stream or not, description", inline=True)
    api.add_op("info", info, "this daemon: identity, membership counts, counters", inline=True)
    api.add_op(
        "members",
        members,
        "the membership table (optionally filtered by status)",
        inline=True,
    )
    api.add_stream_op("members.watch", watch, "membership events as they happen")
    api.add_op(
        "members.remove",
        remove,
        "take a dead member out of the cluster and every majority (marked left everywhere)",
    )
    api.add_op("leave", leave, "leave the cluster gracefully and stop the daemon")
    api.add_op("keys", keys, "list/install/use/remove gossip keys on every member")
