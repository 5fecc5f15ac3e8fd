"""``meshctl``: talk to the local meshd over its Unix socket."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import anyio
from rich.console import Console

from meshd.cli import completion, render
from meshd.cli.filters import FilterError, MemberFilter
from meshd_client.connection import Connection
from meshd_client.protocol import errors, tracecontext
from meshd_client.protocol.errors import MeshError

# Exit statuses (docs/operations.md#exit-status): scripts can tell "the daemon is not there"
# from "the daemon said no".
EXIT_OK: Final = 0
EXIT_ERROR: Final = 1  # the daemon refused or failed the request, or the result is unhealthy
EXIT_USAGE: Final = 2  # bad command line (argparse's own status)
EXIT_UNREACHABLE: Final = 3  # no daemon on the socket, or the connection to it was lost
EXIT_INTERRUPTED: Final = 130

STATUSES: Final = ("alive", "suspect", "dead", "left")


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The options every command takes, before or after its name. On subcommands their
    default is "not given", so a value given before the command is not reset after it."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    parser.add_argument(
        "--socket",
        default=default(None),
        help="API socket (default: $MESHD_SOCKET or /run/meshd/meshd.sock)",
    )
    parser.add_argument(
        "--format",
        choices=("table", "json"),
        default=default("table"),
        help="table for people (default) or json for scripts",
    )
    parser.add_argument(
        "--json",
        dest="format",
        action="store_const",
        const="json",
        default=default("table"),
        help="the same as --format json",
    )
    parser.add_argument("--timeout", type=float, default=default(10.0), help="seconds to wait (10)")


class _Parser(argparse.ArgumentParser):
    """Subcommands get the common options too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        top = kwargs.pop("top", False)
        super().__init__(*args, **kwargs)
        _common(self, top=top)


def parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="meshctl",
        description="Control the local meshd.",
        epilog="exit status: 0 ok, 1 error, 2 usage, 3 daemon unreachable",
        top=True,
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    members = sub.add_parser("members", help="the membership table")
    members.add_argument(
        "--status", metavar="REGEX", help="only members whose status matches (alive|suspect)"
    )
    members.add_argument("--name", metavar="REGEX", help="only members whose name matches")
    members.add_argument(
        "--tag",
        metavar="KEY=REGEX",
        action="append",
        default=[],
        help="only members whose tag KEY matches (repeat: all must match)",
    )
    members.add_argument("--watch", action="store_true", help="stream membership events")
    sub.add_parser("info", help="this daemon: identity, versions, uptime, store, counters")
    sub.add_parser("leave", help="leave the cluster gracefully; the daemon then exits")
    remove = sub.add_parser(
        "remove", help="take a dead member out of the cluster (marked left on every member)"
    )
    remove.add_argument("node", help="the dead member's name")
    agents = sub.add_parser("agents", help="the agent registry (as this node resolves it)")
    agents.add_argument("--kind", help="only agents of this kind")
    agents.add_argument("--capability", help="only agents with this capability")
    agents.add_argument("--node", help="only agents hosted on this node")
    agents.add_argument("--limit", type=int, default=1000, help="rows to show (1000)")
    sub.add_parser("events", help="stream registry events (registered, moved, conflict, ...)")
    storage = sub.add_parser("storage", help="this node's store: size, health, last fsync")
    storage.add_argument(
        "action",
        nargs="?",
        choices=("status", "snapshot"),
        default="status",
        help="status (default), or write a snapshot now",
    )
    state = sub.add_parser("state", help="shared state documents")
    state_sub = state.add_subparsers(dest="state_op", required=True, parser_class=_Parser)
    state_get = state_sub.add_parser("get", help="print a document's value (JSON)")
    state_get.add_argument("name")
    state_watch = state_sub.add_parser("watch", help="print the value on every change")
    state_watch.add_argument("name")
    state_sub.add_parser("list", help="the state documents this node holds")
    for name, text in (
        ("send", "send a message to an agent (fire-and-forget)"),
        ("request", "send a request to an agent and print the reply"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("agent", help="agent name")
        p.add_argument("body", nargs="?", default="null", help="JSON body (default null)")
        p.add_argument(
            "--at-least-once",
            action="store_true",
            help="retry until acknowledged (the handler still runs once)",
        )
        p.add_argument(
            "--trace",
            action="store_true",
            help="start a trace (W3C traceparent) for it and print its trace id and message id",
        )
    publish = sub.add_parser("publish", help="publish a signal (CloudEvents data as JSON)")
    publish.add_argument("topic")
    publish.add_argument("data", nargs="?", default="null", help="JSON data (default null)")
    publish.add_argument("--type", help="CloudEvents type (default: the topic)")
    publish.add_argument("--subject", help="CloudEvents subject")
    subscribe = sub.add_parser("subscribe", help="print signals matching a topic pattern")
    subscribe.add_argument("pattern", help="e.g. orders.* (one segment) or orders.** (any)")
    health = sub.add_parser("health", help="an agent's health as this node sees it")
    health.add_argument("agent")
    spawn = sub.add_parser("spawn", help="place and activate an agent of a kind")
    spawn.add_argument("kind")
    spawn.add_argument("name", help="agent name (virtual agents are named <kind>/<key>)")
    drain = sub.add_parser("drain", help="move every agent off a host (default: this one)")
    drain.add_argument("node", nargs="?", help="the host to drain")
    sub.add_parser("kinds", help="every agent kind and the hosts serving it")
    where = sub.add_parser("placement", help="where an agent of a kind belongs")
    where.add_argument("kind")
    where.add_argument("name")
    keys = sub.add_parser("keys", help="gossip encryption keys on every member")
    keys_sub = keys.add_subparsers(dest="keys_op", required=True, parser_class=_Parser)
    keys_sub.add_parser("list", help="which keys are installed and primary, and where")
    for op, text in (
        ("install", "install a key everywhere (decrypt only)"),
        ("use", "make an installed key primary everywhere"),
        ("remove", "remove a non-primary key everywhere"),
    ):
        p = keys_sub.add_parser(op, help=text)
        p.add_argument("key", help="base64 key (16, 24 or 32 bytes)")
    completion = sub.add_parser("completion", help="print a shell completion script")
    completion.add_argument("shell", choices=("bash", "zsh"))
    return parser


def _bytes(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$bytes": value.hex()}
    raise TypeError(f"cannot show {type(value).__name__}")


def _json(ns: argparse.Namespace) -> bool:
    return bool(ns.format == "json")


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=_bytes))


Out = Console


async def _members(conn: Connection, ns: argparse.Namespace, out: Out) -> int:
    selected: MemberFilter = ns.member_filter
    if ns.watch:
        async with conn.stream("members.watch") as events:
            async for event in events:
                m = event.get("member", {})
                if not selected.matches(m):
                    continue
                if _json(ns):
                    print(json.dumps(event), flush=True)
                    continue
                out.print(
                    render.status_text(m.get("status", "")),
                    f"{event.get('kind')}: {m.get('name')} ({m.get('addr')}, "
                    f"incarnation {m.get('incarnation')})",
                )
        return EXIT_OK
    result = selected.select(await conn.call("members", timeout=ns.timeout))
    if _json(ns):
        _print_json(result)
    else:
        out.print(render.members_table(result, title=f"members seen by {conn.node}"))
    return EXIT_OK


async def _info(conn: Connection, ns: argparse.Namespace, out: Out) -> int:
    result = await conn.call("info", timeout=ns.timeout)
    _print_json(result) if _json(ns) else out.print(render.info_table(result))
    return EXIT_OK


async def _leave(conn: Connection, ns: argparse.Namespace, out: Out) -> int:
    result = await conn.call("leave", timeout=ns.timeout)
    _print_json(result) if _json(ns) else out.print(f"{conn.node} is leaving the cluster")
    return EXIT_OK


async def _remove(conn: Connection, ns: argparse.Namespace, out: Out) -> int:
    result = await conn.call("members.remove", {"node": ns.node}, timeout=ns.timeout)
    if _json(ns):
        _print_json(result)
    elif result["removed"]:
        out.print(f"{ns.node} removed: every member will show it as left")
    else:
        out.print(f"{ns.node} had already left")
    return EXIT_OK


async def _agents(conn: Connection, ns: argparse.Namespace, out: Out) -> int:
    args: dict[str, Any] = {"limit": ns.limit}
    for key in ("kind", "capability", "node"):
        if getattr(ns, key):
            args[key] = getattr(ns, key)
    result = await conn.call("agents", args, timeout=ns.timeout)
    if _json(ns):
        _print_json(result)
    else:
        out.print(render.agents_table(result, title=f"agents resolved by {conn.node}"))
    return EXIT_OK


async def _events(conn: Connection, ns: argparse.Namespace, out: Out) -> int:
    async with conn.stream("registry.watch") as events:
        async for event in events:
            if _json(ns):
                print(json.dumps(event), flush=True)
            else:
                out.print(render.registry_event(event))
    return EXIT_OK


async def _state(conn: Connection, ns: argparse.Namespace, out: Out) -> int:
    if ns.state_op == "list":
        result = await conn.call("state.list", timeout=ns.timeout)
        _print_json(result) if _json(ns) else out.print(render.state_table(result))
        return EXIT_OK
    if ns.state_op == "get":
        value = await conn.call("state.get", {"doc": ns.name}, timeout=ns.timeout)
        print(json.dumps(value, indent=None if _json(ns) else 2, default=_bytes))
        return EXIT_OK
    async with conn.stream("state.watch", {"doc": ns.name}) as changes:
        async for change in changes:
            print(json.dumps(change, default=_bytes), flush=True)
    return EXIT_OK


async def _storage(conn: Connection, ns: argparse.Namespace, out: Out) -> int:
    op = "storage.snapshot" if ns.action == "snapshot" else "storage"
    timeout = max(ns.timeout, 60.0) if ns.action == "snapshot" else ns.timeout
    result = await conn.call(op, timeout=timeout)
    _print_json(result) if _json(ns) else out.print(render.storage_table(result))
    return EXIT_OK if result.get("healthy", True) else EXIT_ERROR


async def _keys(conn: Connection, ns: argparse.Namespace, out: Out) -> int:
    args = {"op": ns.keys_op}
    if ns.keys_op != "list":
        args["key"] = ns.key
    result = await conn.call("keys", args, timeout=ns.timeout)
    failures = render.key_failures(result)
    if _json(ns):
        _print_json(result)
    else:
        out.print(render.keys_table(result))
        for line in failures:
            out.print(f"[red]failed[/red] {line}")
    return EXIT_ERROR if failures else EXIT_OK


def _json_arg(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise errors.Invalid(f"{what} is not valid JSON: {exc}") from None


async def _message(conn: Connection, ns: argparse.Namespace, out: Out) -> int:
    args = {
        "to": ns.agent,
        "body": _json_arg(ns.body, "body"),
        "timeout": ns.timeout,
        "at_least_once": ns.at_least_once,
    }
    if ns.at_least_once or ns.trace:
        args["id"] = uuid.uuid4().hex
    trace = tracecontext.new_root() if ns.trace else None
    if trace is not None:
        trace.to_args(args)
        if not _json(ns):
            # On stderr, before the call: stdout stays the reply, and a failed call's trace
            # id is known too.
            print(f"trace id: {trace.trace_id}  message id: {args['id']}", file=sys.stderr)
    result = await conn.call(ns.command, args, timeout=ns.timeout + 1)
    if trace is not None and _json(ns):
        out_json: dict[str, Any] = {"trace_id": trace.trace_id, "msg_id": args["id"]}
        if ns.command == "request":
            out_json["reply"] = result
        else:
            out_json.update(sent=ns.agent, at_least_once=ns.at_least_once)
        print(json.dumps(out_json, default=_bytes))
    elif ns.command == "request":
        print(json.dumps(result, indent=None if _json(ns) else 2, default=_bytes))
    elif _json(ns):
        _print_json({"sent": ns.agent, "at_least_once": ns.at_least_once})
    else:
        out.print(f"sent to {ns.agent}")
    return EXIT_OK


async def _publish(conn: Connection, ns: argparse.Namespace, out: Out) -> int:
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": uuid.uuid4().hex,
        "source": f"meshctl://{conn.node}",
        "type": ns.type or ns.topic,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": _json_arg(ns.data, "data"),
    }
    if ns.subject:
        event["subject"] = ns.subject
    result = await conn.call("publish", {"topic": ns.topic, "event": event}, timeout=ns.timeout)
    _print_json(result) if _json(ns) else out.print(f"published to {result['hosts']} host(s)")
    return EXIT_OK


async def _subscribe(conn: Connection, ns: argparse.Namespace, out: Out) -> int:
    async with conn.stream("subscribe", {"pattern": ns.pattern}) as signals:
        async for signal in signals:
            print(json.dumps(signal, default=_bytes), flush=True)
    return EXIT_OK


async def _health(conn: Connection, ns: argparse.Namespace, out: Out) -> int:
    result = await conn.call("health", {"name": ns.agent}, timeout=ns.timeout)
    if _json(ns):
        _print_json(result)
    else:
        out.print(
            f"{ns.agent}: {result['health']}"
            + (f" on {result['node']}" if "node" in result else "")
        )
    return EXIT_OK if result["health"] in ("healthy", "degraded") else EXIT_ERROR


async def _spawn(conn: Connection, ns: argparse.Namespace, out: Out) -> int:
    result = await conn.call("spawn", {"kind": ns.kind, "name": ns.name}, timeout=ns.timeout + 1)
    _print_json(result) if _json(ns) else out.print(f"{ns.name} runs on {result['node']}")
    return EXIT_OK


async def _drain(conn: Connection, ns: argparse.Namespace, out: Out) -> int:
    args = {"node": ns.node} if ns.node else {}
    result = await conn.call("drain", args, timeout=ns.timeout)
    if _json(ns):
        _print_json(result)
    else:
        out.print(f"{result['node']} is draining; moving {result['moving']} agent(s)")
    return EXIT_OK


async def _kinds(conn: Connection, ns: argparse.Namespace, out: Out) -> int:
    result = await conn.call("kinds", timeout=ns.timeout)
    _print_json(result) if _json(ns) else out.print(render.kinds_table(result))
    return EXIT_OK


async def _placement(conn: Connection, ns: argparse.Namespace, out: Out) -> int:
    result = await conn.call("placement", {"kind": ns.kind, "name": ns.name}, timeout=ns.timeout)
    if _json(ns):
        _print_json(result)
    else:
        out.print(
            f"{ns.name} belongs on {result['owner']} "
            f"(strategy {result['strategy']}, majority here: {result['majority']})"
        )
    return EXIT_OK


COMMANDS: dict[str, Callable[[Connection, argparse.Namespace, Out], Awaitable[int]]] = {
    "spawn": _spawn,
    "drain": _drain,
    "kinds": _kinds,
    "placement": _placement,
    "send": _message,
    "request": _message,
    "publish": _publish,
    "subscribe": _subscribe,
    "health": _health,
    "members": _members,
    "info": _info,
    "leave": _leave,
    "remove": _remove,
    "agents": _agents,
    "events": _events,
    "state": _state,
    "storage": _storage,
    "keys": _keys,
}


class DaemonUnreachable(Exception):
    """The local daemon could not be reached, or the connection to it was lost."""

    def __init__(self, cause: MeshError) -> None:
        super().__init__(cause.message)
        self.cause = cause


async def _run(ns: argparse.Namespace) -> int:
    out = render.console(_json(ns))
    opened = False
    try:
        async with Connection.open(ns.socket, client="meshctl", timeout=ns.timeout) as conn:
            opened = True
            return await COMMANDS[ns.command](conn, ns, out)
    except (errors.Unreachable, errors.Timeout, errors.Closed) as exc:
        # Before the session opened: nothing answers on the socket. Closed at any time: the
        # daemon went away (or is shutting down). An unreachable *agent* is an error (1).
        if not opened or isinstance(exc, errors.Closed):
            raise DaemonUnreachable(exc) from None
        raise


def main(argv: Sequence[str] | None = None) -> int:
    cli = parser()
    ns = cli.parse_args(argv)
    if ns.command == "completion":
        print(completion.script(ns.shell, cli), end="")
        return EXIT_OK
    if ns.command == "members":
        try:
            ns.member_filter = MemberFilter.parse(ns.status, ns.name, ns.tag)
        except FilterError as exc:
            cli.error(str(exc))  # exits with EXIT_USAGE
    try:
        return anyio.run(_run, ns)
    except DaemonUnreachable as exc:
        print(f"meshctl: {exc.cause.kind.value}: {exc.cause.message}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except MeshError as exc:
        print(f"meshctl: {exc.kind.value}: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
