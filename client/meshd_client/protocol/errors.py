"""Error kinds: what went wrong, in terms a caller can act on.

Every failure crossing the API carries one of these kinds; the client raises the matching
exception class, so code can ``except Unreachable`` instead of parsing messages.
"""

from __future__ import annotations

import enum
from typing import Any


class ErrorKind(enum.StrEnum):
    NOT_FOUND = "not_found"  # no such agent, member, document or subscription
    UNREACHABLE = "unreachable"  # the target exists but its host cannot be reached now
    TIMEOUT = "timeout"  # no answer in time; the operation may or may not have happened
    CONFLICT = "conflict"  # the name is taken, or the state changed underneath
    INVALID = "invalid"  # the request itself is wrong: fix it, do not retry
    UNAUTHORIZED = "unauthorized"  # the caller may not do this
    OVERLOADED = "overloaded"  # back off and retry later
    CLOSED = "closed"  # the connection or the daemon is shutting down
    INTERNAL = "internal"  # a bug in meshd: the daemon logged it


class MeshError(Exception):
    """Base of every error the client raises for a failed operation."""

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(self, message: str, *, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail: dict[str, Any] = detail or {}

    def to_wire(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "message": self.message, "detail": self.detail}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class NotFound(MeshError):
    kind = ErrorKind.NOT_FOUND


class Unreachable(MeshError):
    kind = ErrorKind.UNREACHABLE


class Timeout(MeshError):
    kind = ErrorKind.TIMEOUT


class Conflict(MeshError):
    kind = ErrorKind.CONFLICT


class Invalid(MeshError):
    kind = ErrorKind.INVALID


class Unauthorized(MeshError):
    kind = ErrorKind.UNAUTHORIZED


class Overloaded(MeshError):
    kind = ErrorKind.OVERLOADED


class Closed(MeshError):
    kind = ErrorKind.CLOSED


class Internal(MeshError):
    kind = ErrorKind.INTERNAL


# Failures that say "not now" rather than "no": the operation may be tried again as it is
# (an at-least-once sender does, with the same id).
RETRYABLE: tuple[type[MeshError], ...] = (Unreachable, Timeout, Closed, Overloaded)

_BY_KIND: dict[ErrorKind, type[MeshError]] = {
    cls.kind: cls
    for cls in (
        NotFound,
        Unreachable,
        Timeout,
        Conflict,
        Invalid,
        Unauthorized,
        Overloaded,
        Closed,
        Internal,
    )
}


def error_class(kind: ErrorKind) -> type[MeshError]:
    return _BY_KIND[kind]


def error_from_wire(value: Any) -> MeshError:
    """Rebuild an error from its wire form; anything malformed becomes Internal."""
    if not isinstance(value, dict):
        return Internal("malformed error from daemon")
    raw_kind = value.get("kind")
    try:
        kind = ErrorKind(raw_kind) if isinstance(raw_kind, str) else ErrorKind.INTERNAL
    except ValueError:
        kind = ErrorKind.INTERNAL
    message = value.get("message")
    detail = value.get("detail")
    return error_class(kind)(
        message if isinstance(message, str) else kind.value,
        detail=detail if isinstance(detail, dict) else None,
    )
