"""Lifeguard local health awareness: a bounded score that stretches timeouts."""

from __future__ import annotations

import pytest

from meshd.config.profiles import profile_tuning
from meshd.membership.awareness import Awareness


def test_starts_healthy_and_does_not_scale() -> None:
    a = Awareness(8)
    assert a.score == 0
    assert a.scale(0.5) == 0.5


def test_score_is_clamped_to_zero_and_max_minus_one() -> None:
    a = Awareness(8)
    a.apply(-1)
    assert a.score == 0
    a.apply(3)
    assert a.score == 3
    a.apply(100)
    assert a.score == 7
    a.apply(-2)
    assert a.score == 5
    a.apply(-100)
    assert a.score == 0


@pytest.mark.parametrize("score", range(8))
def test_scale_is_score_plus_one(score: int) -> None:
    a = Awareness(8)
    a.apply(score)
    assert a.scale(1.0) == pytest.approx(score + 1)
    assert a.scale(0.5) == pytest.approx(0.5 * (score + 1))


def test_max_multiplier_bounds_the_scale() -> None:
    tuning = profile_tuning("lan")
    a = Awareness(tuning.awareness_max_multiplier)
    for _ in range(50):
        a.apply(1)
    assert a.scale(tuning.probe_interval) == pytest.approx(
        tuning.awareness_max_multiplier * tuning.probe_interval
    )


def test_multiplier_of_one_disables_awareness() -> None:
    a = Awareness(1)
    a.apply(5)
    assert a.score == 0
    assert a.scale(2.0) == 2.0


def test_unit_steps_up_and_down() -> None:
    a = Awareness(4)
    for expected in (1, 2, 3, 3):
        a.apply(1)
        assert a.score == expected
    for expected in (2, 1, 0, 0):
        a.apply(-1)
        assert a.score == expected
