"""A latency histogram kept by a component and exported at scrape time (Prometheus buckets)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field

from meshd.metrics.registry import Labels, Sample

# Seconds: from a fast local op (tens of microseconds) to a request that waits for its timeout.
LATENCY_BOUNDS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip


@dataclass(slots=True)
class Histogram:
    """Observations counted into buckets by upper bound (``le``); the last bucket is +Inf."""

    bounds: tuple[float, ...] = LATENCY_BOUNDS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1

    def samples(self, name: str, help_text: str, labels: Labels = ()) -> Iterator[Sample]:
        """The family ``name``: cumulative ``_bucket`` samples, ``_sum`` and ``_count``."""
        counts = self.counts or [0] * (len(self.bounds) + 1)
        running = 0
        for bound, count in zip(self.bounds, counts, strict=False):
            running += count
            yield Sample(
                f"{name}_bucket", running, (*labels, ("le", repr(bound))), "histogram", help_text
            )
        yield Sample(f"{name}_bucket", self.n, (*labels, ("le", "+Inf")), "histogram", help_text)
        yield Sample(f"{name}_sum", self.total, labels, "histogram", help_text)
        yield Sample(f"{name}_count", self.n, labels, "histogram", help_text)
