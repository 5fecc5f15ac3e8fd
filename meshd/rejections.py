"""Counting what a layer refused, by reason: one definition for every layer's stats."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Rejections:
    """A stats record that counts rejected input (exported as ``meshd_rejected_total``)."""

    rejected: dict[str, int] = field(default_factory=dict)

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
