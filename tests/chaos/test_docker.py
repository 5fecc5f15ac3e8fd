"""The Docker backend: its rendered commands everywhere, the real thing on an engine.

The first part checks the commands as rendered: each goes through the backend's ``runner``
callable, which these tests replace with a recorder that answers ``docker inspect`` like an
engine would. The claim worth testing there is that the *same nft text* reaches a container
as reaches a namespace, through ``docker exec -i <container> nft -f -``, whichever compose
CLI drives the project.

The tests on a real engine are in ``test_suite.py`` (the last chaos file collected, so
``make test`` runs them after the namespace tests, while it brings the engine up): the CI
scenarios through each compose CLI, and ``chaos cleanup`` after a harness that crashed.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from shutil import which as shutil_which
from typing import Any

import pytest

from chaos import engine
from chaos.backends import DaemonSpec
from chaos.docker import COMPOSE_FILE, DockerBackend, render_compose
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
        tmp_path / "run",
        DaemonSpec(key=KEY),
        hosts=5,
        project="mshd",
        net="10.78.9",
        compose=["docker", "compose"],
        image="meshd-chaos:test",
        runner=rec,
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
    assert "MESHD_NODE_DATA_DIR: /run/meshd/data" in text  # on the bind mount: a small disk
    assert 'image: "${CHAOS_IMAGE:-meshd-chaos:latest}"' in text
    assert "h4:" not in text
    # docker-compose 1.29 rejects a top-level `name`; the project is always given with -p
    assert not any(line.startswith("name:") for line in text.splitlines())


def test_dockerfile_builds_offline_from_the_lock_files_on_a_chosen_base() -> None:
    text = (REPO / "deploy" / "Dockerfile").read_text()
    assert "ARG BASE=" in text and "FROM ${BASE}" in text
    assert "COPY build/wheelhouse/ /wheels/" in text
    # every pip install in the build: no index, and the lock files' hashes checked again
    logical = re.sub(r"\\\n\s*", " ", text)  # continuation lines joined
    installs = [c for run in logical.split("\nRUN ")[1:] for c in run.split("&&") if "pip " in c]
    assert len(installs) == 3 and all("install --no-cache-dir --no-index" in c for c in installs)
    assert "--require-hashes -r requirements/runtime.lock" in text
    assert "nftables" in text
    assert "--no-deps --no-build-isolation ./client ." in text
    assert "ENTRYPOINT" not in text and "tini" not in text  # no init in front of meshd
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") :].count("!build/wheelhouse/") == 1


def test_the_wheelhouse_build_lock_is_cut_from_the_dev_lock_as_the_dockerfile_does(
    tmp_path: Path,
) -> None:
    cut = engine.build_requirements(REPO / "requirements" / "dev.lock")
    names = [line.split("==")[0] for line in cut.splitlines() if "==" in line]
    assert sorted(names) == ["packaging", "setuptools", "wheel"]
    assert all(
        line.startswith(("packaging==", "setuptools==", "wheel==", "    --hash=sha256:"))
        for line in cut.splitlines()
    )
    if shutil_which("awk"):
        awk = (REPO / "deploy" / "Dockerfile").read_text().split("awk '")[1].split("'")[0]
        out = subprocess.run(
            ["awk", awk, str(REPO / "requirements" / "dev.lock")],
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout == cut


def test_waiting_for_up_waits_for_the_lock_and_reports_how_up_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHAOS_RUN_ROOT", str(tmp_path))
    assert engine.wait_for_up(1.0) is None  # never run: nothing to report
    d = engine.engine_dir()
    holder = subprocess.Popen(  # another process's `up`, under way
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            f"fh = open({str(d / 'lock')!r}, 'w'); fcntl.flock(fh, fcntl.LOCK_EX)\n"
            "print('held', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(ChaosError, match="held by another process"):
            engine.wait_for_up(0.5)
        (d / "last-up.json").write_text(json.dumps({"ok": False, "error": "no debootstrap"}))
    finally:
        holder.communicate("", timeout=10)  # it ends, and the lock goes with it
    assert engine.wait_for_up(5.0) == "no debootstrap"
    (d / "last-up.json").write_text(json.dumps({"ok": True, "image": "meshd-chaos:x"}))
    assert engine.wait_for_up(5.0) is None


def test_the_debian_mirror_is_read_from_apts_sources(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "a-tools.list").write_text("deb https://tools.example/apt tools-bookworm main\n")
    (d / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n"
    )
    assert engine.debian_mirror([tmp_path]) == "http://mirror.example/debian"
    (d / "debian.sources").unlink()
    (tmp_path / "sources.list").write_text(
        "# old style\ndeb [arch=amd64] http://old.example/debian/ bookworm main contrib\n"
    )
    assert engine.debian_mirror([tmp_path]) == "http://old.example/debian"


def test_the_image_tag_follows_every_input_and_nothing_else(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    inputs = ["deploy/Dockerfile", ".dockerignore", "pyproject.toml", "README.md"]
    inputs += ["requirements/runtime.lock", "meshd/node.py", "client/meshd_client/x.py"]
    for name in inputs:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(name)
    tag = engine.image_tag("sha256:base", repo)
    assert tag.startswith("meshd-chaos:") and tag == engine.image_tag("sha256:base", repo)
    (repo / "meshd" / "__pycache__").mkdir()
    (repo / "meshd" / "__pycache__" / "node.cpython-311.pyc").write_text("x")
    (repo / "docs.md").write_text("not in the image")
    assert engine.image_tag("sha256:base", repo) == tag
    assert engine.image_tag("sha256:other", repo) != tag
    (repo / "meshd" / "node.py").write_text("changed")
    assert engine.image_tag("sha256:base", repo) != tag


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
    assert [argv for argv, _ in rec.calls if argv[1] == "exec"] == [
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
    assert up[6:] == ["up", "-d", "--no-build", "h1", "h2", "h3", "h4", "h5"]  # never builds
    env = backend.compose_env()
    assert env["CHAOS_KEY"] == KEY and env["CHAOS_NET"] == "10.78.9"
    assert env["CHAOS_RUN_DIR"] == str(backend.run_dir)
    assert env["CHAOS_IMAGE"] == "meshd-chaos:test"
    assert (backend.run_dir / "h1").is_dir()  # the bind-mount source exists before up
    again = DockerBackend.attach(backend.run_dir, backend.spec, runner=rec)
    assert again.hosts == backend.hosts and again.addr("h5") == "10.78.9.6"
    assert again.compose == ["docker", "compose"] and again.image == "meshd-chaos:test"
    rec.calls.clear()
    backend.close()
    assert [argv for argv, _ in rec.calls] == [
        [*up[:6], "down", "--volumes", "--remove-orphans", "--timeout", "10"],
        # whatever compose left of the project goes by its label
        ["docker", "ps", "-a", "-q", "--filter", "label=com.docker.compose.project=mshd"],
        ["docker", "network", "ls", "-q", "--filter", "label=com.docker.compose.project=mshd"],
    ]
    assert not (backend.run_dir / "docker-state.json").exists()


def test_compose_v1_gets_the_same_commands(tmp_path: Path) -> None:
    rec = Recorder()
    backend = DockerBackend(
        tmp_path, DaemonSpec(key=KEY), hosts=3, compose=["docker-compose"], image="x", runner=rec
    )
    backend.up(build=False)
    assert rec.commands("-f")[0] == [
        "docker-compose",
        "-f",
        str(COMPOSE_FILE),
        "-p",
        "mshc",
        "up",
        "-d",
        "--no-build",
        "h1",
        "h2",
        "h3",
    ]


def test_a_stopped_container_gets_its_rules_when_it_starts(
    docker: tuple[DockerBackend, Recorder],
) -> None:
    backend, rec = docker
    backend.kill_daemon("h5")
    rec.calls.clear()
    backend.partition([["h5"]])  # h5 has no network namespace now: nothing sent to it
    assert [argv[3] for argv, _ in rec.calls if argv[1] == "exec"] == [
        f"mshd-h{i}" for i in range(1, 5)
    ]
    backend.heal()
    assert "mshd-h5" not in {argv[2] for argv, _ in rec.calls if argv[1] == "exec"}
    rec.calls.clear()
    backend.start_daemon("h5")
    assert rec.calls[1][0] == ["docker", "exec", "-i", "mshd-h5", "nft", "-f", "-"]


def test_more_hosts_than_the_compose_file_defines_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"render_compose\(7\)"):
        DockerBackend(tmp_path, DaemonSpec(key=KEY), hosts=7, runner=Recorder())


def test_a_failing_docker_command_raises_with_its_stderr(tmp_path: Path) -> None:
    def broken(argv: Sequence[str], **_kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(list(argv), 1, "", "Cannot connect to the daemon")

    backend = DockerBackend(tmp_path, DaemonSpec(key=KEY), hosts=3, runner=broken)
    with pytest.raises(ChaosError, match="Cannot connect to the daemon"):
        backend.set_loss("h1", 0.1)
