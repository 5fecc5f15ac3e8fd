"""Prometheus text exposition format 0.0.4.

Rendering is a pure function of the samples so it can be tested without a server. Output is
deterministic (families by name, samples by labels) so scrapes diff cleanly. Samples that would
make the whole scrape invalid (bad names, type conflicts, duplicates) are dropped with a warning
instead: Prometheus rejects an entire scrape over a single malformed line.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from typing import Final

from meshd.metrics.registry import Kind, Labels, Sample

_log: Final = logging.getLogger(__name__)

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

_METRIC_NAME: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def render_text(samples: Iterable[Sample]) -> str:
    """Formats ``samples`` as one exposition document (empty string for no samples)."""
    families: dict[str, dict[tuple[str, Labels], Sample]] = {}
    kinds: dict[str, Kind] = {}
    helps: dict[str, str] = {}
    for sample in samples:
        labels = _normalized_labels(sample)
        if labels is None:
            continue
        name = _family_name(sample)
        if name is None:
            _log.warning("histogram sample %s lacks a histogram suffix; dropped", sample.name)
            continue
        kind = kinds.setdefault(name, sample.kind)
        if kind != sample.kind:
            _log.warning("metric %s: %s sample in a %s family; dropped", name, sample.kind, kind)
            continue
        family = families.setdefault(name, {})
        key = (sample.name, labels)
        if key in family:
            _log.warning("metric %s%s: duplicate sample; dropped", sample.name, dict(labels))
            continue
        family[key] = sample
        if sample.help and name not in helps:
            helps[name] = sample.help

    lines: list[str] = []
    for name in sorted(families):
        lines.append(f"# HELP {name} {_escape_help(helps.get(name, ''))}")
        lines.append(f"# TYPE {name} {kinds[name]}")
        family = families[name]
        for sample_name, labels in sorted(family, key=_histogram_order):
            value = _format_value(family[(sample_name, labels)].value)
            lines.append(f"{sample_name}{_format_labels(labels)} {value}")
    return "".join(line + "\n" for line in lines)


_HISTOGRAM_SUFFIXES: Final = ("_bucket", "_sum", "_count")


def _family_name(sample: Sample) -> str | None:
    if sample.kind != "histogram":
        return sample.name
    for suffix in _HISTOGRAM_SUFFIXES:
        if sample.name.endswith(suffix):
            return sample.name[: -len(suffix)]
    return None


def _histogram_order(key: tuple[str, Labels]) -> tuple[Labels, int, float, str]:
    """Samples by their other labels, then buckets in ``le`` order, then sum and count."""
    name, labels = key
    others = tuple((k, v) for k, v in labels if k != "le")
    try:
        bound = float(dict(labels).get("le", "+Inf"))
    except ValueError:
        bound = math.inf
    rank = next((i for i, s in enumerate(_HISTOGRAM_SUFFIXES) if name.endswith(s)), 0)
    return (others, rank, bound, name)


def _normalized_labels(sample: Sample) -> Labels | None:
    """Labels sorted by name, or None (after a warning) when the sample cannot be rendered."""
    if not _METRIC_NAME.fullmatch(sample.name):
        _log.warning("invalid metric name %r; sample dropped", sample.name)
        return None
    if not _is_number(sample.value):
        _log.warning("metric %s: non-numeric value %r; sample dropped", sample.name, sample.value)
        return None
    names = [k for k, _ in sample.labels]
    for key in names:
        # Names starting with "__" are reserved for Prometheus' own use.
        if not _LABEL_NAME.fullmatch(key) or key.startswith("__"):
            _log.warning("metric %s: invalid label name %r; sample dropped", sample.name, key)
            return None
    if len(set(names)) != len(names):
        _log.warning("metric %s: repeated label names %r; sample dropped", sample.name, names)
        return None
    return tuple(sorted((k, str(v)) for k, v in sample.labels))


def _is_number(value: object) -> bool:
    """Collectors are typed but not trusted: a bool, a string or an int too large for a float
    would otherwise corrupt or abort the scrape."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_labels(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape_label_value(v)}"' for k, v in labels)
    return "{" + inner + "}"


def _format_value(value: float) -> str:
    """Integral values without a fraction (counters read naturally); Go's spellings otherwise."""
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)
