"""Weighted rendezvous (highest random weight) hashing.

Every daemon computes the owner of an agent from the same inputs — the agent's name and the
hosts that serve its kind with their capacity weights — so all agree without talking. Adding
or removing a host only moves the agents that host wins or loses (about 1/N of them), never
reshuffles the rest.

Score of host h for key k: ``-w_h / ln(u)``, with ``u = hash(k, h)`` mapped into (0, 1): the
highest score wins (Schindelhauer & Schomaker's weighted variant: a host with twice the
weight wins twice as often).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping


def _unit(key: str, host: str) -> float:
    digest = hashlib.blake2b(f"{key}\x00{host}".encode(), digest_size=8).digest()
    # 53 bits into (0, 1): never 0 (log of 0) and never 1 (log of 1 is 0).
    return (int.from_bytes(digest, "big") >> 11 | 1) / float(1 << 53)


def score(key: str, host: str, weight: float) -> float:
    return -weight / math.log(_unit(key, host))


def owner(key: str, hosts: Mapping[str, float]) -> str | None:
    """The host with the highest weighted score for ``key`` (ties by name); None if no host
    has a positive weight."""
    best: tuple[float, str] | None = None
    for host, weight in hosts.items():
        if weight <= 0:
            continue
        candidate = (score(key, host, weight), host)
        if best is None or candidate > best:
            best = candidate
    return best[1] if best is not None else None


def ranked(key: str, hosts: Mapping[str, float]) -> list[str]:
    """All hosts with positive weight, best first (the order failover falls through)."""
    scored = [(score(key, h, w), h) for h, w in hosts.items() if w > 0]
    return [h for _, h in sorted(scored, reverse=True)]


def moved_fraction(
    keys: Iterable[str], before: Mapping[str, float], after: Mapping[str, float]
) -> float:
    """The share of ``keys`` whose owner differs between two host sets (for benchmarks)."""
    total = moved = 0
    for key in keys:
        total += 1
        moved += owner(key, before) != owner(key, after)
    return moved / total if total else 0.0
