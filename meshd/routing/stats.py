"""Routing counters (exported as ``meshd_routing_*``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class RouterStats:
    local_deliveries: int = 0
    forwarded: int = 0
    received: int = 0
    results: int = 0
    duplicates: int = 0
    unreachable: int = 0
    timeouts: int = 0
    signals_published: int = 0
    signals_delivered: int = 0
    signal_hosts: int = 0
    # DELIVERs whose trace field was not valid W3C trace context (delivered untraced)
    bad_trace_context: int = 0
