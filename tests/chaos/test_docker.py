"""The Docker backend: the pieces that need no engine here, the engine where there is one.

Without an engine (this machine and CI have the ``docker`` CLI but no daemon) the backend's
commands are checked as rendered: each goes through the backend's ``runner`` callable,
which these tests replace with a recorder that answers ``docker inspect`` like an engine
would. The claim worth testing is that the *same nft text* reaches a container as reaches a
namespace, through ``docker exec -i <container> nft -f -``. The engine test at the end runs
only where ``docker info`` answers, and otherwise skips saying so.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from chaos.backends import DaemonSpec
from chaos.docker import COMPOSE_FILE, DockerBackend, engine_unavailable_reason, render_compose
from chaos.faults import Faults, partition_groups, render_ruleset
from chaos.netns import ChaosError

REPO = Path(__file__).resolve().parents[2]
KEY = "q" * 43 + "="


class Recorder:
    """Stands in for the engine: records every command, answers ``inspect`` from a table."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], str | None]] = []
        self.running: dict[str, bool] = {}
        self.exit_code: dict[str, int] = {}

    def __call__(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        argv = list(argv)
        self.calls.append((argv, kw.get("input")))
        out = ""
        if argv[1] == "inspect":
            name = argv[-1]
            up = self.running.get(name, True)
            out = json.dumps(
                {"Running": up, "Pid": 4242 if up else 0, "ExitCode": self.exit_code.get(name, 0)}
            )
        elif argv[1] == "kill" and argv[3] == "SIGKILL":
            self.running[argv[-1]] = False
            self.exit_code[argv[-1]] = 137
        elif argv[1] == "stop":
            self.running[argv[-1]] = False
        elif argv[1] == "start":
            self.running[argv[-1]] = True
        return subprocess.CompletedProcess(argv, 0, out, "")

    def commands(self, verb: str) -> list[list[str]]:
        return [argv for argv, _ in self.calls if argv[1] == verb]


@pytest.fixture
def docker(tmp_path: Path) -> tuple[DockerBackend, Recorder]:
    rec = Recorder()
    backend = DockerBackend(
        tmp_path / "run", DaemonSpec(key=KEY), hosts=5, project="mshd", net="10.78.9", runner=rec
    )
    return backend, rec


def test_the_shipped_compose_file_is_the_rendered_one() -> None:
    assert COMPOSE_FILE == REPO / "deploy" / "docker-compose.yml"
    assert COMPOSE_FILE.read_text() == render_compose(5), (
        "deploy/docker-compose.yml drifted from chaos.docker.render_compose(5); regenerate it"
    )


def test_compose_file_gives_each_host_what_the_backend_expects() -> None:
    text = render_compose(3)
    for i, host in enumerate(["h1", "h2", "h3"], start=2):
        assert f'container_name: "${{CHAOS_PREFIX:-mshc}}-{host}"' in text
        assert f'ipv4_address: "${{CHAOS_NET:-10.78.0}}.{i}"' in text
        assert f'"${{CHAOS_RUN_DIR:-./run}}/{host}:/run/meshd"' in text
    assert "cap_add: [NET_ADMIN]" in text
    assert "init: false" in text  # meshd is PID 1: docker kill --signal reaches it
    assert "exec meshd run" in text
    assert "${CHAOS_KEY:?" in text  # no key, no cluster
    assert "h4:" not in text


def test_dockerfile_builds_from_the_lock_files_with_uv() -> None:
    text = (REPO / "deploy" / "Dockerfile").read_text()
    assert "uv pip sync" in text and "--require-hashes requirements/runtime.lock" in text
    assert "nftables" in text
    assert "--no-deps --no-build-isolation ./client ." in text
    assert "ENTRYPOINT" not in text and "tini" not in text  # no init in front of meshd


def test_faults_load_the_same_rule_text_as_in_a_namespace(
    docker: tuple[DockerBackend, Recorder],
) -> None:
    backend, rec = docker
    backend.partition([["h1", "h2"]])
    loads = [(argv, text) for argv, text in rec.calls if argv[-3:] == ["nft", "-f", "-"]]
    assert [argv[:4] for argv, _ in loads] == [
        ["docker", "exec", "-i", f"mshd-h{i}"] for i in range(1, 6)
    ]
    faults = Faults(groups=partition_groups(backend.hosts, [["h1", "h2"]]))
    addr_of = {h: backend.addr(h) for h in backend.hosts}
    for (_argv, text), host in zip(loads, backend.hosts, strict=True):
        expected = render_ruleset(faults.rules_for(host, addr_of), exempt=["10.78.9.1"])
        assert text == expected
    assert "ip saddr { 10.78.9.4, 10.78.9.5, 10.78.9.6 }" in (loads[0][1] or "")


def test_loss_block_and_heal_commands(docker: tuple[DockerBackend, Recorder]) -> None:
    backend, rec = docker
    backend.set_loss("h2", 0.2)
    assert rec.calls[-1][0] == ["docker", "exec", "-i", "mshd-h2", "nft", "-f", "-"]
    assert "numgen random mod 100 < 20" in (rec.calls[-1][1] or "")
    backend.block("h1", "h3")  # enforced on the receiver
    assert rec.calls[-1][0][3] == "mshd-h3"
    assert 'ip saddr { 10.78.9.2 } counter drop comment "block h1 -> h3"' in (
        rec.calls[-1][1] or ""
    )
    rec.calls.clear()
    backend.heal()
    assert [argv for argv, _ in rec.calls] == [
        ["docker", "exec", f"mshd-h{i}", "nft", "flush", "table", "inet", "meshd_chaos"]
        for i in range(1, 6)
    ]
    assert backend.faults.empty


def test_process_faults_signal_the_containers_pid_1(
    docker: tuple[DockerBackend, Recorder],
) -> None:
    backend, rec = docker
    assert backend.signal_daemon("h3", signal.SIGSTOP)
    assert backend.signal_daemon("h3", signal.SIGCONT)
    assert rec.commands("kill") == [
        ["docker", "kill", "--signal", "SIGSTOP", "mshd-h3"],
        ["docker", "kill", "--signal", "SIGCONT", "mshd-h3"],
    ]
    assert backend.kill_daemon("h4") == 137
    assert rec.commands("kill")[-1] == ["docker", "kill", "--signal", "SIGKILL", "mshd-h4"]
    assert not backend.daemon_running("h4")
    backend.start_daemon("h4")
    assert rec.commands("start") == [["docker", "start", "mshd-h4"]]
    # a started container has a fresh network namespace: its rules are loaded again
    assert rec.calls[-2][0] == ["docker", "exec", "-i", "mshd-h4", "nft", "-f", "-"]
    assert backend.stop_daemon("h5") == 0
    assert rec.commands("stop") == [["docker", "stop", "--time", "10", "mshd-h5"]]
    assert [e.cause for e in backend.poll_exits()] == ["kill", "stop"]  # nothing crashed


def test_an_exit_nobody_caused_is_a_crash(docker: tuple[DockerBackend, Recorder]) -> None:
    backend, rec = docker
    rec.running["mshd-h2"] = False
    rec.exit_code["mshd-h2"] = 1
    crashes = [e for e in backend.poll_exits() if e.cause == "crash"]
    assert [(e.host, e.code) for e in crashes] == [("h2", 1)]


def test_up_and_down_go_through_compose_with_the_runs_environment(
    docker: tuple[DockerBackend, Recorder],
) -> None:
    backend, rec = docker
    backend.up(build=False)
    up = rec.commands("compose")[0]
    assert up[:6] == ["docker", "compose", "-f", str(COMPOSE_FILE), "-p", "mshd"]
    assert up[6:] == ["up", "-d", "h1", "h2", "h3", "h4", "h5"]
    env = backend.compose_env()
    assert env["CHAOS_KEY"] == KEY and env["CHAOS_NET"] == "10.78.9"
    assert env["CHAOS_RUN_DIR"] == str(backend.run_dir)
    assert (backend.run_dir / "h1").is_dir()  # the bind-mount source exists before up
    again = DockerBackend.attach(backend.run_dir, backend.spec, runner=rec)
    assert again.hosts == backend.hosts and again.addr("h5") == "10.78.9.6"
    backend.close()
    assert rec.commands("compose")[-1][6:] == [
        "down",
        "--volumes",
        "--remove-orphans",
        "--timeout",
        "10",
    ]


def test_more_hosts_than_the_compose_file_defines_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"render_compose\(7\)"):
        DockerBackend(tmp_path, DaemonSpec(key=KEY), hosts=7, runner=Recorder())


def test_a_failing_docker_command_raises_with_its_stderr(tmp_path: Path) -> None:
    def broken(argv: Sequence[str], **_kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(list(argv), 1, "", "Cannot connect to the daemon")

    backend = DockerBackend(tmp_path, DaemonSpec(key=KEY), hosts=3, runner=broken)
    with pytest.raises(ChaosError, match="Cannot connect to the daemon"):
        backend.set_loss("h1", 0.1)


ENGINE = engine_unavailable_reason()


@pytest.mark.root
def test_a_container_cluster_partitions_and_heals(tmp_path: Path) -> None:
    """The real thing, where a Docker engine (and compose) exist."""
    if ENGINE is not None:
        pytest.skip(f"Docker engine test skipped: {ENGINE}")
    from chaos.cluster import Cluster

    cluster = Cluster.create(
        3, backend="docker", prefix=f"mcd{os.getpid() % 1000}", run_dir=tmp_path / "run"
    )
    try:
        cluster.wait_ready(180)
        cluster.partition([["h1"], ["h2", "h3"]])
        assert "partition: h1 | others" in cluster.backend.ruleset("h1")
        time.sleep(8)
        cluster.heal()
        cluster.wait_ready(60)
    finally:
        cluster.close()
