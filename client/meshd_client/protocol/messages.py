"""Local API messages: every frame is a CBOR map with a type field ``t``.

Client to daemon::

    {"t": "hello", "versions": [1], "client": "meshctl/0.1.0"}     first frame, always
    {"t": "req", "id": 7, "op": "members", "args": {...}}         a request
    {"t": "cancel", "id": 7}                                      end the stream of request 7
    {"t": "note", "op": "agent.reply", "args": {...}}             a request with no answer

Daemon to client::

    {"t": "hello", "version": 1, "node": "a", "daemon": "meshd/0.1.0"}
    {"t": "res", "id": 7, "ok": true, "value": ...}               the answer to request 7
    {"t": "res", "id": 7, "ok": false, "error": {"kind", "message", "detail"}}
    {"t": "evt", "id": 7, "event": {...}}                         an item of stream 7
    {"t": "end", "id": 7, "error": {...} | null}                  stream 7 is over

Request ids are chosen by the client, unique per connection while in flight. A request that
opens a stream (``subscribe``-like ops) is answered with ``res`` first, then ``evt`` frames
until ``end``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from meshd_client.protocol.errors import Invalid, MeshError

API_VERSION: Final = 1
SUPPORTED_VERSIONS: Final = (1,)
MAX_REQUEST_ID: Final = 2**63 - 1
MAX_OP_LENGTH: Final = 64


@dataclass(frozen=True, slots=True)
class Hello:
    versions: tuple[int, ...]
    client: str


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    op: str
    args: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Cancel:
    id: int


@dataclass(frozen=True, slots=True)
class Note:
    """A one-way request: the daemon acts on it and sends nothing back (failures are counted
    and logged). Saves a round trip where the answer would be ignored anyway."""

    op: str
    args: dict[str, Any]


ClientFrame = Hello | Request | Cancel | Note


def _request_id(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= MAX_REQUEST_ID:
        raise Invalid("request id must be a non-negative integer")
    return value


def usable_id(frame: dict[str, Any]) -> int | None:
    """The frame's request id if it is a valid one (to answer a frame refused as a whole),
    else None: an id out of range is not echoed back."""
    value = frame.get("id")
    if type(value) is int and 0 <= value <= MAX_REQUEST_ID:
        return value
    return None


def parse_client_frame(frame: dict[str, Any]) -> ClientFrame:
    """Validate a frame from a client; raises :class:`Invalid` naming what is wrong."""
    kind = frame.get("t")
    if kind == "req":
        op = frame.get("op")
        if not isinstance(op, str) or not 0 < len(op) <= MAX_OP_LENGTH:
            raise Invalid("op must be a non-empty string")
        args = frame.get("args", {})
        if not isinstance(args, dict):
            raise Invalid("args must be a map")
        return Request(_request_id(frame.get("id")), op, args)
    if kind == "cancel":
        return Cancel(_request_id(frame.get("id")))
    if kind == "note":
        op = frame.get("op")
        if not isinstance(op, str) or not 0 < len(op) <= MAX_OP_LENGTH:
            raise Invalid("op must be a non-empty string")
        args = frame.get("args", {})
        if not isinstance(args, dict):
            raise Invalid("args must be a map")
        return Note(op, args)
    if kind == "hello":
        versions = frame.get("versions")
        if (
            not isinstance(versions, list)
            or not versions
            or len(versions) > 16
            or not all(type(v) is int for v in versions)
        ):
            raise Invalid("hello.versions must be a non-empty list of integers")
        client = frame.get("client", "")
        if not isinstance(client, str) or len(client) > 128:
            raise Invalid("hello.client must be a short string")
        return Hello(tuple(versions), client)
    raise Invalid(f"unknown frame type {kind!r}")


def negotiate(offered: tuple[int, ...]) -> int | None:
    """The highest version both sides speak, or None."""
    common = set(offered) & set(SUPPORTED_VERSIONS)
    return max(common) if common else None


def hello(client: str) -> dict[str, Any]:
    return {"t": "hello", "versions": list(SUPPORTED_VERSIONS), "client": client}


def hello_reply(version: int, node: str, daemon: str) -> dict[str, Any]:
    return {"t": "hello", "version": version, "node": node, "daemon": daemon}


def request(request_id: int, op: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"t": "req", "id": request_id, "op": op, "args": args}


def note(op: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"t": "note", "op": op, "args": args}


def cancel(request_id: int) -> dict[str, Any]:
    return {"t": "cancel", "id": request_id}


def ok(request_id: int, value: Any) -> dict[str, Any]:
    return {"t": "res", "id": request_id, "ok": True, "value": value}


def failed(request_id: int | None, error: MeshError) -> dict[str, Any]:
    return {"t": "res", "id": request_id, "ok": False, "error": error.to_wire()}


def event(request_id: int, payload: Any) -> dict[str, Any]:
    return {"t": "evt", "id": request_id, "event": payload}


def end(request_id: int, error: MeshError | None = None) -> dict[str, Any]:
    return {"t": "end", "id": request_id, "error": error.to_wire() if error else None}
