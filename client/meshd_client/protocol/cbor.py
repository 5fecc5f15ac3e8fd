"""Safe CBOR for untrusted input.

cbor2 decodes many semantic tags into rich Python objects (regular expressions, e-mail
messages, shared references, datetimes). Nothing meshd exchanges needs them, and some are
dangerous on input from a network or a socket, so every tag is refused. Indefinite-length
items, deep nesting and non-string map keys are refused too: decoded values are plain
``None | bool | int | float | str | bytes | list | dict``.
"""

from __future__ import annotations

import io
from typing import Any, Final

import cbor2

__all__ = ["MAX_DEPTH", "CodecError", "dumps", "loads", "loads_sequence", "split_sequence"]

MAX_DEPTH: Final = 32

# Every tag cbor2 decodes natively (RFC 8949 and the IANA registry entries it supports).
_KNOWN_TAGS: Final = (
    0,
    1,
    2,
    3,
    4,
    5,
    25,
    28,
    29,
    30,
    35,
    36,
    37,
    100,
    256,
    258,
    260,
    261,
    1004,
    55799,
)


class CodecError(ValueError):
    """The bytes are not a well-formed, acceptable CBOR item."""


def _refuse_semantic(_decoder: Any, _value: Any) -> Any:
    raise CodecError("CBOR tags are not accepted")


def _refuse_tag(_decoder: Any, _tag: Any) -> Any:
    raise CodecError("CBOR tags are not accepted")


_SEMANTIC: Final = dict.fromkeys(_KNOWN_TAGS, _refuse_semantic)
_OPTIONS: Final[dict[str, Any]] = {
    "tag_hook": _refuse_tag,
    "semantic_decoders": _SEMANTIC,
    "max_depth": MAX_DEPTH,
    "allow_indefinite": False,
    "strict_hashable_types": True,
    "allow_duplicate_keys": False,
}


# What cbor2 raises on hostile input (deep nesting, huge lengths, truncation, bad types).
_MALFORMED = (
    cbor2.CBORError,
    ValueError,
    TypeError,
    OverflowError,
    RecursionError,
    MemoryError,
    EOFError,
)


def dumps(value: object) -> bytes:
    """Encode a plain value (no tags are ever produced for plain values)."""
    try:
        return cbor2.dumps(value)
    except (cbor2.CBORError, TypeError, ValueError) as exc:
        raise CodecError(f"cannot encode: {exc}") from exc


def loads(data: bytes) -> Any:
    """Decode exactly one CBOR item; trailing bytes are an error."""
    try:
        decoder = cbor2.CBORDecoder(io.BytesIO(data), **_OPTIONS)
        value = decoder.decode()
        if decoder.fp.tell() != len(data):
            raise CodecError("trailing bytes after CBOR item")
        return value
    except CodecError:
        raise
    except _MALFORMED as exc:
        raise CodecError(f"malformed CBOR: {exc}") from exc


def loads_sequence(data: bytes, max_items: int) -> list[Any]:
    """Decode a CBOR sequence (RFC 8742): items concatenated back to back."""
    return [value for value, _ in split_sequence(data, max_items)]


def split_sequence(data: bytes, max_items: int) -> list[tuple[Any, bytes]]:
    """Like :func:`loads_sequence`, also returning each item's exact bytes (for de-duplication)."""
    items: list[tuple[Any, bytes]] = []
    stream = io.BytesIO(data)
    start = 0
    try:
        decoder = cbor2.CBORDecoder(stream, **_OPTIONS)
        while start < len(data):
            if len(items) >= max_items:
                raise CodecError(f"more than {max_items} items")
            value = decoder.decode()
            end = stream.tell()
            items.append((value, data[start:end]))
            start = end
    except CodecError:
        raise
    except _MALFORMED as exc:
        raise CodecError(f"malformed CBOR: {exc}") from exc
    return items
