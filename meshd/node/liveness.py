"""Membership as the registry sees it: who is up, and which boot epoch each node runs."""

from __future__ import annotations

from typing import Final

from meshd.membership.core import Membership

EPOCH_TAG: Final = "meshd.epoch"


class MembershipLiveness:
    def __init__(self, core: Membership) -> None:
        self.membership_core = core

    def up(self, node: str) -> bool:
        state = self.membership_core.peek(node)
        return state is not None and state[0].up

    def epoch(self, node: str) -> int | None:
        state = self.membership_core.peek(node)
        if state is None:
            return None
        raw = state[1].get(EPOCH_TAG)
        return int(raw) if raw is not None and raw.isdigit() else None

    def gone_for(self, node: str, now: float) -> float | None:
        state = self.membership_core.peek(node)
        if state is None or state[0].up:
            return None
        return now - state[2]
