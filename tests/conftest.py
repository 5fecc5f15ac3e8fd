"""Suite-wide collection rules.

Under ``pytest -n 2 --dist loadgroup`` (how ``make test`` runs), every chaos test goes to one
worker, one after another: each starts five daemons in network namespaces, and two such
clusters at once on a 2-core machine would measure the machine, not meshd.

Hypothesis runs under the ``ci`` or ``dev`` profile (``hypothesis_budget.py``).
"""

from __future__ import annotations

from typing import Any

import hypothesis_budget
import pytest

HYPOTHESIS_PROFILE = hypothesis_budget.load()
CHAOS_TESTS = "tests/chaos/"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under ``--dist loadgroup``, every test under tests/chaos/ is one work unit (one
    worker, one after another). Done here rather than by an ``xdist_group`` mark: with
    pytest 9, xdist's renaming of marked node ids (``…@group``) has no effect, so the mark
    alone spread the chaos tests over both workers."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class ChaosOnOneWorker(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "chaos" if nodeid.startswith(CHAOS_TESTS) else super()._split_scope(nodeid)

    return ChaosOnOneWorker(config, log)


def pytest_report_header() -> str:
    return f"hypothesis profile: {HYPOTHESIS_PROFILE} (HYPOTHESIS_PROFILE=ci|dev)"
