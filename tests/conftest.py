"""Suite-wide collection rules.

Under ``pytest -n 2 --dist loadgroup`` (how ``make test`` runs), every chaos test goes to one
worker, one after another: each starts five daemons in network namespaces, and two such
clusters at once on a 2-core machine would measure the machine, not meshd.

Hypothesis runs under the ``ci`` or ``dev`` profile (``hypothesis_budget.py``).
"""

from __future__ import annotations

import hypothesis_budget
import pytest

HYPOTHESIS_PROFILE = hypothesis_budget.load()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/chaos/" in str(item.path):
            item.add_marker(pytest.mark.xdist_group("chaos"))


def pytest_report_header() -> str:
    return f"hypothesis profile: {HYPOTHESIS_PROFILE} (HYPOTHESIS_PROFILE=ci|dev)"
