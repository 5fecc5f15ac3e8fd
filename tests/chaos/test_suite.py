"""The short chaos suite `make test` runs: partition-heal, kill, pause, loss and a power loss
of the whole cluster, for real.

Each scenario runs on a fresh cluster of five meshd daemons in network namespaces, with the
recorded workload and the checker, exactly as ``python -m chaos run`` does. A failure
prints the failing invariants and where the history and logs were kept. The full suite
(every shipped scenario) is ``make chaos``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from chaos.netns import existing_links, existing_namespaces
from chaos.runner import RunOptions, run_scenario
from chaos.scenario import Scenario, shipped

CI = [s for s in shipped() if s.ci]


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("scenario", CI, ids=[s.name for s in CI])
async def test_ci_scenario_passes(
    host_layer: None, scenario: Scenario, tmp_path: Path, unique_net: tuple[str, str]
) -> None:
    prefix, subnet = unique_net
    # CHAOS_RESULTS keeps histories and logs somewhere CI can upload them from.
    results = Path(os.environ.get("CHAOS_RESULTS", tmp_path / "results"))
    verdict = await run_scenario(
        scenario, RunOptions(prefix=prefix, subnet=subnet, results=results)
    )
    # Nothing is left behind, pass or fail.
    assert not {n for n in existing_namespaces() if n.startswith(prefix)}
    assert not {n for n in existing_links() if n.startswith(prefix)}
    saved = json.loads(
        next(results.glob(f"*-{scenario.name}-{verdict.seed}/verdict.json")).read_text()
    )
    assert saved["passed"] == verdict.ok
    failed = {c.name: c.summary for c in verdict.checks if not c.ok}
    assert verdict.ok, (
        f"{scenario.name} (seed {verdict.seed}) failed {failed}; "
        f"history and logs in {verdict.stats.get('results')}"
    )
    assert verdict.lost_writes == 0 and verdict.duplicate_deliveries == 0
