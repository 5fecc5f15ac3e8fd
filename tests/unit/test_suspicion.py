"""Lifeguard's dynamic suspicion timeout: bounds, k, and shrinking with confirmations."""

from __future__ import annotations

import math

import pytest

from meshd.config.profiles import profile_tuning
from meshd.membership.suspicion import Suspicion, expected_confirmations, suspicion_bounds

LAN = profile_tuning("lan")
WAN = profile_tuning("wan")


def lan_bounds(n: int) -> tuple[float, float]:
    return suspicion_bounds(
        LAN.suspicion_mult, LAN.suspicion_max_timeout_mult, n, LAN.probe_interval
    )


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, (4.0, 24.0)),
        (1, (4.0, 24.0)),
        (5, (4.0, 24.0)),  # memberlist's LAN defaults: log10(5) < 1, so the scale is 1
        (10, (4.0, 24.0)),
        (100, (8.0, 48.0)),
        (1000, (12.0, 72.0)),
    ],
)
def test_bounds_match_memberlist_for_the_lan_profile(n: int, expected: tuple[float, float]) -> None:
    assert lan_bounds(n) == pytest.approx(expected)


def test_bounds_scale_with_log10_of_the_cluster_size() -> None:
    lo, hi = lan_bounds(50)
    assert lo == pytest.approx(4.0 * math.log10(50))
    assert hi == pytest.approx(6 * lo)


def test_bounds_scale_with_the_probe_interval() -> None:
    lo, hi = suspicion_bounds(WAN.suspicion_mult, WAN.suspicion_max_timeout_mult, 5, 5.0)
    assert (lo, hi) == pytest.approx((30.0, 180.0))


@pytest.mark.parametrize(
    ("mult", "n", "k"),
    [
        (4, 1, 0),
        (4, 3, 0),  # n - 2 < k: not enough other members to confirm
        (4, 4, 2),
        (4, 5, 2),
        (4, 1000, 2),
        (6, 5, 0),
        (6, 6, 4),
        (2, 5, 0),
        (1, 5, 0),  # never negative
    ],
)
def test_expected_confirmations(mult: int, n: int, k: int) -> None:
    assert expected_confirmations(mult, n) == k


def test_unconfirmed_suspicion_runs_for_the_maximum() -> None:
    s = Suspicion(10.0, 4.0, 24.0, 2)
    assert s.deadline() == pytest.approx(34.0)


def test_each_confirmation_shrinks_the_timeout_down_to_the_minimum() -> None:
    s = Suspicion(10.0, 4.0, 24.0, 2)
    assert s.confirm("b")
    assert s.deadline() == pytest.approx(10.0 + 24.0 - 20.0 * math.log(2) / math.log(3))
    assert s.confirm("c")
    assert s.deadline() == pytest.approx(14.0)
    assert not s.confirm("d")  # k reached: no more are taken
    assert s.confirmers == {"b", "c"}
    assert s.deadline() == pytest.approx(14.0)


def test_duplicate_confirmations_do_not_count() -> None:
    s = Suspicion(0.0, 4.0, 24.0, 3)
    assert s.confirm("b")
    first = s.deadline()
    assert not s.confirm("b")
    assert s.deadline() == first
    assert s.confirmers == {"b"}


def test_the_accuser_is_not_a_confirmation() -> None:
    s = Suspicion(0.0, 4.0, 24.0, 2, accuser="a")
    assert not s.confirm("a")
    assert s.deadline() == pytest.approx(24.0)
    assert s.confirm("b")
    assert not s.confirm("a")
    assert s.confirmers == {"b"}


def test_no_expected_confirmations_means_the_minimum_at_once() -> None:
    s = Suspicion(5.0, 4.0, 24.0, 0)
    assert s.deadline() == pytest.approx(9.0)
    assert not s.confirm("b")
    assert s.deadline() == pytest.approx(9.0)


def test_deadline_never_grows_and_never_drops_below_the_minimum() -> None:
    s = Suspicion(0.0, 4.0, 24.0, 5)
    deadlines = [s.deadline()]
    for name in "bcdefgh":
        s.confirm(name)
        deadlines.append(s.deadline())
    assert deadlines == sorted(deadlines, reverse=True)
    assert min(deadlines) == pytest.approx(4.0)


# memberlist's TestSuspicion_remainingSuspicionTime: (confirmations, k, elapsed, min, max,
# remaining). memberlist truncates to milliseconds; these are exact.
@pytest.mark.parametrize(
    ("c", "k", "elapsed", "lo", "hi", "remaining"),
    [
        (0, 3, 0.0, 2.0, 30.0, 30.0),
        (1, 3, 2.0, 2.0, 30.0, 14.0),
        (2, 3, 3.0, 2.0, 30.0, 4.81),
        (3, 3, 4.0, 2.0, 30.0, -2.0),
    ],
)
def test_remaining_time_matches_memberlist(
    c: int, k: int, elapsed: float, lo: float, hi: float, remaining: float
) -> None:
    s = Suspicion(100.0, lo, hi, k)
    for i in range(c):
        assert s.confirm(f"n{i}")
    assert s.deadline() - (100.0 + elapsed) == pytest.approx(remaining, abs=1e-3)
