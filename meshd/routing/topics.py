"""Signal topics and subscription patterns.

Topics are dot-separated segments (``orders.eu.created``). In a pattern, ``*`` matches exactly
one segment and ``**`` (only as the last segment) matches one or more: ``orders.*`` matches
``orders.created`` but not ``orders.eu.created``; ``orders.**`` matches both but not ``orders``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Final

from meshd_client.protocol import errors

MAX_TOPIC: Final = 256
MAX_SEGMENTS: Final = 32


def _segments(text: str, what: str) -> list[str]:
    if not isinstance(text, str) or not 0 < len(text) <= MAX_TOPIC or not text.isprintable():
        raise errors.Invalid(f"{what} must be 1..{MAX_TOPIC} printable characters")
    parts = text.split(".")
    if len(parts) > MAX_SEGMENTS or any(not p for p in parts):
        raise errors.Invalid(f"{what} must be dot-separated, non-empty segments")
    return parts


def check_topic(topic: str) -> str:
    if any(part in ("*", "**") for part in _segments(topic, "topic")):
        raise errors.Invalid("a topic cannot contain wildcards")
    return topic


def check_pattern(pattern: str) -> str:
    parts = _segments(pattern, "pattern")
    if "**" in parts[:-1]:
        raise errors.Invalid("'**' may only be the last segment of a pattern")
    for part in parts:
        if part not in ("*", "**") and ("*" in part):
            raise errors.Invalid("wildcards must be whole segments ('*' or '**')")
    return pattern


@lru_cache(maxsize=4096)
def _compiled(pattern: str) -> tuple[tuple[str, ...], bool]:
    parts = tuple(pattern.split("."))
    if parts[-1] == "**":
        return parts[:-1], True
    return parts, False


def matches(pattern: str, topic: str) -> bool:
    prefix, deep = _compiled(pattern)
    segments = topic.split(".")
    if deep:
        if len(segments) <= len(prefix):
            return False
    elif len(segments) != len(prefix):
        return False
    return all(p in ("*", s) for p, s in zip(prefix, segments, strict=False))
