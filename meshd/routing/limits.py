"""Routing's size limits (fixed; not configurable)."""

from __future__ import annotations

from typing import Any, Final

from meshd_client.protocol import cbor, errors

MAX_BODY: Final = 512 * 1024  # bytes of a message body, a reply or a signal event
MAX_PENDING_PER_AGENT: Final = 1024  # deliveries awaiting one agent's answer


def body_size(body: Any) -> int:
    try:
        return len(cbor.dumps(body))
    except cbor.CodecError:
        raise errors.Invalid("the body is not encodable as CBOR") from None


def check_body(body: Any, what: str = "message body") -> None:
    if body_size(body) > MAX_BODY:
        raise errors.Invalid(f"{what} larger than {MAX_BODY} bytes")
