"""Strict field validators for decoded CBOR: every value from the network passes one of these.

Each raises :class:`WireError` with a short reason; decoders never let another exception out.
"""

from __future__ import annotations

import socket
from typing import Any, Final

MAX_NAME: Final = 128
MAX_TAGS: Final = 32
MAX_TAG_BYTES: Final = 512
MAX_UINT64: Final = 2**64 - 1

Address = tuple[str, int]


class WireError(ValueError):
    """A decoded message that does not match its schema."""


def expect_list(value: Any, min_len: int, max_len: int, what: str) -> list[Any]:
    if not isinstance(value, list) or not min_len <= len(value) <= max_len:
        raise WireError(f"{what}: expected an array of {min_len}..{max_len} items")
    return value


def expect_str(value: Any, what: str, max_len: int = MAX_NAME, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or len(value) > max_len or (not value and not allow_empty):
        raise WireError(f"{what}: expected a string of at most {max_len} characters")
    return value


def expect_name(value: Any, what: str = "name") -> str:
    name = expect_str(value, what)
    if not name.isprintable():
        raise WireError(f"{what}: not printable")
    return name


def expect_uint(value: Any, what: str, maximum: int = MAX_UINT64) -> int:
    if type(value) is not int or not 0 <= value <= maximum:
        raise WireError(f"{what}: expected an integer in 0..{maximum}")
    return value


def expect_bool(value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise WireError(f"{what}: expected a boolean")
    return value


def expect_bytes(value: Any, what: str, max_len: int) -> bytes:
    if not isinstance(value, bytes) or len(value) > max_len:
        raise WireError(f"{what}: expected at most {max_len} bytes")
    return value


def expect_addr(value: Any, what: str = "addr") -> Address:
    """An address travels as [packed IPv4/IPv6 bytes, port]: cheap to check, compact."""
    if type(value) is not list or len(value) != 2:
        raise WireError(f"{what}: expected [ip bytes, port]")
    packed, port = value
    if type(packed) is not bytes or type(port) is not int or not 0 < port <= 65535:
        raise WireError(f"{what}: expected [ip bytes, port 1..65535]")
    size = len(packed)
    if size == 4:
        return (socket.inet_ntop(socket.AF_INET, packed), port)
    if size == 16:
        return (socket.inet_ntop(socket.AF_INET6, packed), port)
    raise WireError(f"{what}: ip must be 4 or 16 bytes")


def addr_to_wire(addr: Address) -> list[Any]:
    host, port = addr
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return [socket.inet_pton(family, host), port]


def expect_tags(value: Any, what: str = "tags") -> dict[str, str]:
    if not isinstance(value, dict) or len(value) > MAX_TAGS:
        raise WireError(f"{what}: expected a map of at most {MAX_TAGS} entries")
    size = 0
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise WireError(f"{what}: keys and values must be strings")
        size += len(key.encode()) + len(item.encode())
    if size > MAX_TAG_BYTES:
        raise WireError(f"{what}: more than {MAX_TAG_BYTES} bytes")
    return value
