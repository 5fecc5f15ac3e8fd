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


class _Node:
    __slots__ = ("children", "deep", "ends")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.ends: str | None = None  # the pattern whose segments end here
        self.deep: str | None = None  # the pattern whose segments end here, then ``**``


class PatternIndex:
    """A set of (valid) patterns, matched against a topic by walking a tree of segments:
    adding and removing cost the pattern's length, matching the topic's length and the
    patterns it touches — never the number of patterns held."""

    def __init__(self) -> None:
        self._root = _Node()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, pattern: str) -> None:
        parts = pattern.split(".")
        deep = parts[-1] == "**"
        node = self._root
        for part in parts[:-1] if deep else parts:
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = _Node()
            node = child
        if deep:
            self._size += node.deep is None
            node.deep = pattern
        else:
            self._size += node.ends is None
            node.ends = pattern

    def discard(self, pattern: str) -> None:
        parts = pattern.split(".")
        deep = parts[-1] == "**"
        path = [self._root]
        for part in parts[:-1] if deep else parts:
            child = path[-1].children.get(part)
            if child is None:
                return
            path.append(child)
        node = path[-1]
        if deep and node.deep == pattern:
            node.deep = None
            self._size -= 1
        elif not deep and node.ends == pattern:
            node.ends = None
            self._size -= 1
        # Prune the branch that no pattern uses any more.
        keys = parts[:-1] if deep else parts
        for depth in range(len(path) - 1, 0, -1):
            node = path[depth]
            if node.children or node.ends is not None or node.deep is not None:
                break
            del path[depth - 1].children[keys[depth - 1]]

    def match(self, topic: str) -> list[str]:
        """The patterns that match ``topic`` (each once)."""
        found: list[str] = []
        frontier = [self._root]
        for segment in topic.split("."):
            following: list[_Node] = []
            for node in frontier:
                if node.deep is not None:
                    found.append(node.deep)  # ``**`` takes this segment and any after it
                child = node.children.get(segment)
                if child is not None:
                    following.append(child)
                if segment != "*":
                    child = node.children.get("*")
                    if child is not None:
                        following.append(child)
            frontier = following
            if not frontier:
                return found
        found.extend(node.ends for node in frontier if node.ends is not None)
        return found
