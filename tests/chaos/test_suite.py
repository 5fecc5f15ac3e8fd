"""The short chaos suite `make test` runs, for real, on both backends.

The scenarios marked ``ci = true`` (partition-heal, loss-20, kill-minority, pause-long,
power-loss) run on network namespaces and on Docker containers. On Docker they take turns
between the two compose CLIs (:data:`DOCKER_CI`: the v2 plugin and docker-compose 1.29), and
each run also checks that the host's firewall and sysctls are what they were. Last, a real
``chaos cleanup`` of containers after a harness that crashed. ``make chaos`` runs every
shipped scenario on both backends.

Each scenario runs on a fresh cluster of five meshd daemons, with the recorded workload and
the checker, exactly as ``python -m chaos run`` does. A failure prints the failing
invariants and where the history and logs were kept. This is the last chaos file collected
and the namespace runs come first: ``make test`` brings the Docker engine and image up in the
background, and the first Docker test waits for that (``chaos.engine.wait_for_up``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    host_before = host_state()
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
        assert project_leftovers(prefix) == []
        up = next(e for e in read_history(results, scenario.name, verdict.seed) if is_up(e))
        assert up["args"]["compose"] == compose  # the CLI under test drove the project
        assert up["args"]["image"] == request.getfixturevalue("docker_engine")
        # The engine's settings left the host's firewall and sysctls alone (dockerd's
        # defaults would turn FORWARD to DROP and cut the namespace bridges).
        assert host_state() == host_before
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


def host_state() -> tuple[str, dict[str, str]]:
    """What the harness promises to leave alone: the host's firewall and sysctls."""
    return engine.firewall_text(), engine.read_sysctls()


def project_leftovers(project: str) -> list[str]:
    label = f"label=com.docker.compose.project={project}"
    left = []
    for listing in (["ps", "-a", "-q"], ["network", "ls", "-q"]):
        out = subprocess.run(
            ["docker", *listing, "--filter", label], capture_output=True, text=True, check=True
        ).stdout
        left += out.split()
    return left


@pytest.mark.root
@pytest.mark.slow
def test_cleanup_after_a_crashed_harness_removes_containers_network_and_disk(
    docker_engine: str, tmp_path: Path, unique_net: tuple[str, str]
) -> None:
    """``chaos up --backend docker`` from the command line, then the harness "dies" (its
    cluster file gone): ``chaos cleanup`` removes the containers, the network and the small
    disk's mount from the Docker state file alone. (The scenarios in test_suite.py drive
    containers through each compose CLI; this is the crash path.)"""
    prefix, subnet = unique_net
    run_dir = tmp_path / "run"
    net = "10.78." + subnet.split(".")[2]
    before = host_state()

    argv = [sys.executable, "-m", "chaos", "--prefix", prefix, "--run-dir", str(run_dir)]

    def chaos(*args: str) -> str:
        res = subprocess.run(
            [*argv, *args], capture_output=True, text=True, timeout=180, check=False
        )
        assert res.returncode == 0, f"chaos {' '.join(args)}: {res.stdout}\n{res.stderr}"
        return res.stdout

    try:
        chaos("up", "2", "--backend", "docker", "--docker-net", net, "--small-disk", "h2=16m")
        names = [f"{prefix}-h1", f"{prefix}-h2"]
        running = subprocess.run(
            ["docker", "inspect", "--format", "{{.State.Running}} {{.Config.Image}}", *names],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
        assert running[:2] == [f"true {docker_engine}"] * 2
        data = os.path.realpath(run_dir / "h2" / "data")
        assert data in Path("/proc/self/mounts").read_text()  # the small disk is mounted
        (run_dir / "cluster.json").unlink()  # as if the harness died
        chaos("cleanup")
        assert project_leftovers(prefix) == []
        assert data not in Path("/proc/self/mounts").read_text()
        assert not (run_dir / "docker-state.json").exists()
    finally:
        if (run_dir / "docker-state.json").exists():
            subprocess.run(
                [*argv, "cleanup"],
                capture_output=True,
                timeout=120,
                check=False,
            )
    assert host_state() == before, "the host's firewall or sysctls changed"
