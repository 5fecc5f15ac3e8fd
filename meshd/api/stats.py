"""The API server's counters: connections, sessions, requests, errors and latency by op
(shared by the server and its sessions; exported as ``meshd_api_*`` metrics)."""

from __future__ import annotations

from dataclasses import dataclass, field
from time import perf_counter

from meshd.metrics.histogram import Histogram
from meshd.rejections import Rejections


@dataclass(slots=True)
class ApiStats(Rejections):
    connections: int = 0
    active_sessions: int = 0
    requests: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    # Seconds from a request's arrival to its answer, by op (registered ops only; streams
    # are not timed: they last as long as their client wants).
    latency: dict[str, Histogram] = field(default_factory=dict)

    def error(self, kind: str) -> None:
        self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + 1

    def answered(self, op: str, started: float) -> None:
        """``started``: ``time.perf_counter()`` when the request arrived (cheaper than
        trio's clock, which this runs twice per request)."""
        histogram = self.latency.get(op)
        if histogram is None:
            histogram = self.latency[op] = Histogram()
        histogram.observe(perf_counter() - started)
