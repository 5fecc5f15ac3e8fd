"""Samples and the registry of collectors that produce them.

The registry stores no metric values: it only knows which callables to ask at scrape time, so
components own their counters and the registry cannot drift out of date.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Literal

_log: Final = logging.getLogger(__name__)

Kind = Literal["counter", "gauge", "histogram"]
Labels = tuple[tuple[str, str], ...]
COLLECTOR_ERRORS: Final = "meshd_metrics_collector_errors_total"


@dataclass(frozen=True, slots=True)
class Sample:
    """One value of one metric at scrape time.

    ``name`` is the full metric name (a counter carries its ``_total`` suffix itself).
    Samples sharing a name form a family; ``kind`` and ``help`` are taken from the family. A
    histogram's samples are named ``<family>_bucket`` (with an ``le`` label), ``_sum`` and
    ``_count``, and form the family named without the suffix.
    """

    name: str
    value: float
    labels: Labels = ()
    kind: Kind = "gauge"
    help: str = ""


Collector = Callable[[], Iterable[Sample]]
"""Returns the current samples of one component; called once per scrape."""


class MetricsRegistry:
    """The collectors to call on each scrape.

    One instance per daemon, created by whoever wires the components together and passed to
    them explicitly (no global default registry).
    """

    def __init__(self, *, logger: logging.Logger | None = None) -> None:
        self._collectors: list[Collector] = []
        self.collector_errors = 0
        """Collector calls that raised, since start (exported as a counter)."""
        self._log = logger or _log

    def register(self, collector: Collector) -> Callable[[], None]:
        """Adds ``collector``; returns a function that unregisters it (idempotently)."""
        self._collectors.append(collector)

        def unregister() -> None:
            self.unregister(collector)

        return unregister

    def unregister(self, collector: Collector) -> None:
        """Removes ``collector`` if it is registered; for components that shut down."""
        try:
            self._collectors.remove(collector)
        except ValueError:
            pass

    def collect(self) -> list[Sample]:
        """Samples from every collector, in registration order.

        A collector that raises (also midway through a generator) contributes nothing to this
        scrape: it is logged, counted, and the other collectors' samples are still returned, so
        one buggy component cannot blank the whole scrape.
        """
        samples: list[Sample] = []
        for collector in list(self._collectors):
            try:
                produced = list(collector())
            except Exception:
                self.collector_errors += 1
                self._log.exception("metrics collector %r failed; skipped", collector)
                continue
            samples.extend(produced)
        samples.append(
            Sample(
                COLLECTOR_ERRORS,
                self.collector_errors,
                kind="counter",
                help="Metric collectors that raised during a scrape.",
            )
        )
        return samples
