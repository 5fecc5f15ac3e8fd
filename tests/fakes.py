"""Stand-ins shared by the unit and simulation tests, for what a real daemon's other layers
would say. Each is a plain, complete implementation of one protocol of ``meshd`` (no
mocking): tests set its state by hand."""

from __future__ import annotations

from collections.abc import Iterable


class StaticLiveness:
    """Who is up and which boot epoch each node runs, as membership would say (the
    registry's ``Liveness`` protocol)."""

    def __init__(self, up: Iterable[str] = (), epoch: int = 1) -> None:
        self.epochs: dict[str, int] = dict.fromkeys(up, epoch)
        self.down_since: dict[str, float] = {}

    def set_up(self, node: str, epoch: int | None) -> None:
        if epoch is not None:
            self.epochs[node] = epoch
        self.down_since.pop(node, None)

    def set_down(self, node: str, since: float) -> None:
        self.down_since[node] = since

    def up(self, node: str) -> bool:
        return node in self.epochs and node not in self.down_since

    def epoch(self, node: str) -> int | None:
        return self.epochs.get(node)

    def gone_for(self, node: str, now: float) -> float | None:
        since = self.down_since.get(node)
        return None if since is None else now - since
