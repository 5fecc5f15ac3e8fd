"""The short chaos suite `make test` runs, for real, on both backends.

The scenarios marked ``ci = true`` (partition-heal, loss-20, kill-minority, pause-long,
power-loss) run on network namespaces and on Docker containers. On Docker they take turns
between the two compose CLIs (:data:`DOCKER_CI`: the v2 plugin and docker-compose 1.29), and
each run also checks that the host's firewall and sysctls are what they were; ``make chaos``
runs every shipped scenario on both backends.

Each scenario runs on a fresh cluster of five meshd daemons, with the recorded workload and
the checker, exactly as ``python -m chaos run`` does. A failure prints the failing
invariants and where the history and logs were kept. Namespace runs come first: a cold
machine's image build (``make test`` starts it before pytest) is then long done.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from chaos import engine
from chaos.netns import existing_links, existing_namespaces
from chaos.runner import RunOptions, run_scenario
from chaos.scenario import Scenario, shipped

CI = [s for s in shipped() if s.ci]
# (scenario, compose CLI): every CI scenario on Docker, each compose CLI at least twice
DOCKER_CI = [(s, "v2" if i % 2 == 0 else "v1") for i, s in enumerate(CI)]

CASES = [pytest.param("netns", s, "", id=s.name) for s in CI] + [
    pytest.param("docker", s, cli, id=f"docker-{cli}-{s.name}") for s, cli in DOCKER_CI
]


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize(("backend", "scenario", "cli"), CASES)
async def test_ci_scenario_passes(
    backend: str,
    scenario: Scenario,
    cli: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    unique_net: tuple[str, str],
) -> None:
    # Skips with the reason where the backend cannot run, and fails instead under CI.
    request.getfixturevalue("host_layer" if backend == "netns" else "docker_engine")
    compose: list[str] = []
    if backend == "docker":
        compose = request.getfixturevalue("compose_cli")(cli)
    host_before = (engine.firewall_text(), engine.read_sysctls())
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
        up = next(e for e in read_history(results, scenario.name, verdict.seed) if is_up(e))
        assert up["args"]["compose"] == compose  # the CLI under test drove the project
        assert up["args"]["image"] == request.getfixturevalue("docker_engine")
        # The engine's settings left the host's firewall and sysctls alone (dockerd's
        # defaults would turn FORWARD to DROP and cut the namespace bridges).
        assert (engine.firewall_text(), engine.read_sysctls()) == host_before
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


def read_history(results: Path, name: str, seed: int) -> list[dict[str, Any]]:
    path = next(results.glob(f"*-{name}-{seed}/history.jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_up(event: dict[str, Any]) -> bool:
    return event.get("type") == "fault" and event.get("action") == "up"
