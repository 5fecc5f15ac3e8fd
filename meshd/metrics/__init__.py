"""Prometheus metrics, pulled at scrape time.

The protocol cores keep plain integer counters in their own dataclasses, because incrementing an
attribute is as cheap as a hot path can afford and keeps them free of a metrics dependency. A
scrape walks the registered collectors, which read those counters and turn them into
:class:`Sample` values; :func:`render_text` formats them and :func:`serve_metrics` serves them.
"""

from meshd.metrics.exposition import CONTENT_TYPE, render_text
from meshd.metrics.registry import Collector, MetricsRegistry, Sample
from meshd.metrics.server import serve_metrics

__all__ = [
    "CONTENT_TYPE",
    "Collector",
    "MetricsRegistry",
    "Sample",
    "render_text",
    "serve_metrics",
]
