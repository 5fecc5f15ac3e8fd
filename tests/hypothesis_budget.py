"""Hypothesis profiles, and how many examples a property test draws under each.

Each property test states the budget it needs in CI (``max_examples=examples(300)``). The
``ci`` profile runs that many; the ``dev`` profile, for a developer's edit-and-test loop, a
quarter of it (at least ten). The profile is ``HYPOTHESIS_PROFILE`` if set, else ``ci`` when
``CI`` is set (``.ci/run`` sets it), else ``dev``. ``tests/conftest.py`` loads it before any
test module is imported, so the budgets below see the right profile.
"""

from __future__ import annotations

import os

from hypothesis import settings

PROFILES = ("ci", "dev")
DEV_SHARE = 0.25

settings.register_profile("ci", deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=25)


def profile_name() -> str:
    name = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
    if name not in PROFILES:
        raise ValueError(f"HYPOTHESIS_PROFILE={name!r}: expected one of {', '.join(PROFILES)}")
    return name


def load() -> str:
    name = profile_name()
    settings.load_profile(name)
    return name


def examples(ci_budget: int) -> int:
    """The examples to draw for a test that needs ``ci_budget`` of them in CI."""
    if profile_name() == "ci":
        return ci_budget
    return max(10, int(ci_budget * DEV_SHARE))
