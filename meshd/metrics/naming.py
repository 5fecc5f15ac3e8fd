"""Prometheus naming conventions, checked on what a daemon really exports (see
tests/e2e/test_dashboard_e2e.py): base units spelled out at the end of the name
(``_seconds``, ``_bytes``), counters and only counters ending in ``_total``."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from meshd.metrics.registry import Kind

NAME_RE: Final = re.compile(r"meshd_[a-z][a-z0-9_]*[a-z0-9]")
UNITS: Final = ("seconds", "bytes")
# Scaled or abbreviated units: Prometheus wants base units (seconds, bytes, ratios 0..1).
NOT_BASE_UNITS: Final = frozenset(
    {
        "ms", "msec", "millis", "milliseconds", "us", "usec", "microseconds", "ns",
        "nanoseconds", "sec", "secs", "s", "minutes", "mins", "hours", "days", "kb", "kib",
        "mb", "mib", "gb", "gib", "kilobytes", "megabytes", "percent", "pct",
    }
)  # fmt: skip
HISTOGRAM_SUFFIXES: Final = ("_bucket", "_sum", "_count")


def family(name: str, kind: Kind) -> str:
    """The family a sample belongs to (a histogram's samples carry a suffix)."""
    if kind == "histogram":
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix):
                return name.removesuffix(suffix)
    return name


def problems(name: str, kind: Kind) -> list[str]:
    """What is wrong with a metric family's name, as a list of sentences (empty: fine)."""
    found: list[str] = []
    if not NAME_RE.fullmatch(name) or "__" in name:
        found.append(f"{name}: not meshd_ followed by lower-case words joined by _")
    words = name.split("_")
    base = words[:-1] if kind == "counter" and words[-1] == "total" else words
    if kind == "counter" and words[-1] != "total":
        found.append(f"{name}: a counter must end in _total")
    if kind != "counter" and words[-1] == "total":
        found.append(f"{name}: only counters end in _total ({kind})")
    found.extend(
        f"{name}: {word!r} is not a base unit (use seconds or bytes)"
        for word in base
        if word in NOT_BASE_UNITS
    )
    found.extend(
        f"{name}: the unit {unit!r} goes at the end (before _total)"
        for unit in UNITS
        if unit in base[:-1]
    )
    if kind == "histogram" and base[-1] not in UNITS:
        found.append(f"{name}: a histogram names its unit at the end (_seconds or _bytes)")
    return found


def stat_metric(prefix: str, field: str) -> str:
    """A component's counter field as a counter name, the unit moved to the end:
    ``bytes_in`` -> ``<prefix>_received_bytes_total``, ``repair_bytes_sent`` ->
    ``<prefix>_repair_sent_bytes_total``."""
    words = field.split("_")
    for unit in UNITS:
        if unit in words[:-1]:
            words.remove(unit)
            words = [{"in": "received", "out": "sent"}.get(w, w) for w in words] + [unit]
    return f"{prefix}_{'_'.join(words)}_total"


def check(samples: Iterable[tuple[str, Kind]]) -> list[str]:
    """Every problem of every family among ``(sample name, kind)`` pairs."""
    families = {family(name, kind): kind for name, kind in samples}
    return [p for name, kind in sorted(families.items()) for p in problems(name, kind)]
