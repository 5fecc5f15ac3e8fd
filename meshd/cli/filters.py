"""Serf-style member filters for ``meshctl members``: ``--status``, ``--name`` and
``--tag KEY=REGEX`` are regular expressions that must match the whole value (Serf anchors
them too); every filter given must match. Applied in meshctl, so the daemon never runs a
caller's regular expression."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class FilterError(ValueError):
    """A filter that is not a valid regular expression or ``KEY=REGEX``."""


def _compile(what: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise FilterError(f"{what}: {pattern!r} is not a regular expression: {exc}") from None


@dataclass(frozen=True)
class MemberFilter:
    status: re.Pattern[str] | None = None
    name: re.Pattern[str] | None = None
    tags: tuple[tuple[str, re.Pattern[str]], ...] = ()

    @classmethod
    def parse(
        cls, status: str | None = None, name: str | None = None, tags: Sequence[str] = ()
    ) -> MemberFilter:
        parsed: list[tuple[str, re.Pattern[str]]] = []
        for item in tags:
            key, sep, pattern = item.partition("=")
            if not sep or not key:
                raise FilterError(f"--tag: {item!r} is not KEY=REGEX")
            parsed.append((key, _compile(f"--tag {key}", pattern)))
        return cls(
            _compile("--status", status) if status is not None else None,
            _compile("--name", name) if name is not None else None,
            tuple(parsed),
        )

    def matches(self, member: Mapping[str, Any]) -> bool:
        """A member (as the ``members`` op returns it) passes every filter. A missing tag
        is matched as the empty string, as in Serf."""
        if self.status is not None and not self.status.fullmatch(str(member.get("status", ""))):
            return False
        if self.name is not None and not self.name.fullmatch(str(member.get("name", ""))):
            return False
        tags = member.get("tags") or {}
        return all(pattern.fullmatch(str(tags.get(key, ""))) for key, pattern in self.tags)

    def select(self, members: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        return [m for m in members if self.matches(m)]
