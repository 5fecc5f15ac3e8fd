"""Shared fixtures for the chaos tests: the host-layer and Docker gates, names that cannot
collide.

Tests that need root, namespaces and nftables skip with the reason where those are missing,
and fail instead when ``CI`` is set (CI is where they must run). Names and subnets include
this process's pid, so two test sessions on one machine (or a hand-made ``chaos up``
cluster) never collide.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from chaos import engine
from chaos.docker import engine_unavailable_reason
from chaos.netns import ChaosError, unavailable_reason

HOST_LAYER = unavailable_reason()
COMPOSE_V2 = engine.COMPOSE_V2
_names = itertools.count()


@pytest.fixture
def host_layer() -> None:
    if HOST_LAYER is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"chaos tests must run in CI, but: {HOST_LAYER}")
    pytest.skip(f"chaos host layer unavailable: {HOST_LAYER}")


@pytest.fixture
def unique_net() -> tuple[str, str]:
    """A (prefix, subnet) no other test of any session on this machine uses now."""
    k = next(_names)
    pid = os.getpid()
    return f"cx{pid % 10000}{chr(ord('a') + k % 26)}", f"10.79.{(pid % 50) * 5 + k % 5}.0/24"


@pytest.fixture(scope="session")
def docker_engine() -> str:
    """The meshd image (its tag) on a Docker engine that answers, built if missing.

    ``make test`` brings the engine up first where it can (``make docker-engine``). Where
    there is none the test skips with the reason, and under ``CI`` it fails instead.
    """
    # `make test` brings the engine up in the background: wait for it, and keep its error.
    try:
        failed_up = engine.wait_for_up()
    except ChaosError as exc:
        failed_up = str(exc)
    why = engine_unavailable_reason()
    if why is not None and failed_up:
        why = f"{why}; the last `python -m chaos.engine up` failed: {failed_up}"
    if why is None:
        try:
            return engine.ensure_image()
        except ChaosError as exc:
            why = f"the meshd image could not be built: {exc}"
    if os.environ.get("CI"):
        pytest.fail(f"Docker tests must run in CI, but: {why}")
    pytest.skip(f"Docker engine unavailable: {why}")


@pytest.fixture
def compose_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[str], list[str]]:
    """``compose_cli("v2")`` / ``("v1")``: make the backend use that compose CLI (through
    ``CHAOS_COMPOSE``) and return its command. v2 is the ``docker compose`` plugin, or the
    pinned binary ``make docker-engine`` fetches for the tests (build/compose-v2/), plugged
    in through a private ``DOCKER_CONFIG``; v1 is Debian's ``docker-compose`` 1.29."""

    def use(cli: str) -> list[str]:
        argv = ["docker", "compose"] if cli == "v2" else ["docker-compose"]
        if cli == "v2" and _compose_version(argv) is None and COMPOSE_V2.exists():
            config = tmp_path / "docker-config"
            (config / "cli-plugins").mkdir(parents=True)
            (config / "cli-plugins" / "docker-compose").symlink_to(COMPOSE_V2)
            monkeypatch.setenv("DOCKER_CONFIG", str(config))
        version = _compose_version(argv)
        if version is None or not version.startswith("1." if cli == "v1" else "2."):
            why = f"no compose {cli} here (`{' '.join(argv)} version`: {version})"
            if os.environ.get("CI"):
                pytest.fail(f"Docker tests must run in CI, but: {why}")
            pytest.skip(why)
        monkeypatch.setenv("CHAOS_COMPOSE", " ".join(argv))
        return argv

    return use


def _compose_version(argv: list[str]) -> str | None:
    try:
        res = subprocess.run(
            [*argv, "version", "--short"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError:
        return None
    return res.stdout.strip().lstrip("v") if res.returncode == 0 else None
