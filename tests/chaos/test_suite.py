"""The short chaos suite `make test` runs, for real, on both backends.

On network namespaces: every scenario marked ``ci = true`` (partition-heal, kill-minority,
pause-long, loss-20, power-loss). On Docker containers: :data:`DOCKER_CI`, the two that
matter most there — a partition that heals and a power loss of the whole cluster — within
the CI budget (every Docker scenario costs about 40 s on two cores); ``make chaos`` runs
every shipped scenario on both.

Each scenario runs on a fresh cluster of five meshd daemons, with the recorded workload and
the checker, exactly as ``python -m chaos run`` does. A failure prints the failing
invariants and where the history and logs were kept. Namespace runs come first: the Docker
ones wait for nothing, but a cold machine's image build (``make test`` does it before
pytest) is then long done.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from chaos.netns import existing_links, existing_namespaces
from chaos.runner import RunOptions, run_scenario
from chaos.scenario import Scenario, shipped

CI = [s for s in shipped() if s.ci]
DOCKER_CI = [s for s in CI if s.name in ("partition-heal", "power-loss")]


CASES = [pytest.param("netns", s, id=s.name) for s in CI] + [
    pytest.param("docker", s, id=f"docker-{s.name}") for s in DOCKER_CI
]


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize(("backend", "scenario"), CASES)
async def test_ci_scenario_passes(
    backend: str,
    scenario: Scenario,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    unique_net: tuple[str, str],
) -> None:
    # Skips with the reason where the backend cannot run, and fails instead under CI.
    request.getfixturevalue("host_layer" if backend == "netns" else "docker_engine")
    prefix, subnet = unique_net
    # CHAOS_RESULTS keeps histories and logs somewhere CI can upload them from.
    results = Path(os.environ.get("CHAOS_RESULTS", tmp_path / "results"))
    options = RunOptions(
        prefix=prefix,
        subnet=subnet,
        backend=backend,
        docker_net="10.78." + subnet.split(".")[2],  # per test session, as the subnet
        results=results,
    )
    verdict = await run_scenario(scenario, options)
    # Nothing is left behind, pass or fail.
    if backend == "netns":
        assert not {n for n in existing_namespaces() if n.startswith(prefix)}
        assert not {n for n in existing_links() if n.startswith(prefix)}
    else:
        label = f"label=com.docker.compose.project={prefix}"
        for listing in (["ps", "-a", "-q"], ["network", "ls", "-q"]):
            left = subprocess.run(
                ["docker", *listing, "--filter", label], capture_output=True, text=True, check=True
            ).stdout
            assert not left.split(), f"docker {' '.join(listing)} still lists {left.split()}"
    saved = json.loads(
        next(results.glob(f"*-{scenario.name}-{verdict.seed}/verdict.json")).read_text()
    )
    assert saved["passed"] == verdict.ok
    failed = {c.name: c.summary for c in verdict.checks if not c.ok}
    assert verdict.ok, (
        f"{scenario.name} on {backend} (seed {verdict.seed}) failed {failed}; "
        f"history and logs in {verdict.stats.get('results')}"
    )
    assert verdict.lost_writes == 0 and verdict.duplicate_deliveries == 0
