"""Scenario files: a workload, a fault schedule and what must hold afterwards.

A scenario is a TOML file (the shipped ones are in ``chaos/scenarios/``) or a Python file
defining ``SCENARIO`` (a :class:`Scenario`) — for schedules easier to compute than to
write out. TOML::

    name = "partition-heal"
    description = "a 2|3 split for 12 s, a duplicate name on each side, then heal"
    hosts = 5
    duration = 24            # seconds the workload runs; the schedule plays meanwhile
    converge_bound = 30      # seconds allowed, after the heal, to reach one view
    ci = true                # part of the short suite `make test` runs

    [disks]                  # hosts whose data directory is a small tmpfs (fill_disk)
    h3 = "16m"

    [workload]               # chaos.workload.WorkloadConfig fields
    writers = 2

    [expect]
    conflicts = ["dup-1"]    # names whose conflict must have happened and been resolved
    never_dead = []          # members nobody may declare dead ("*": all)
    dead = []                # members every other member must have declared dead
    keys_rotated = false
    rejections = []          # extra "layer/reason" counters the faults explain

    [[step]]
    at = 4                   # seconds after the workload started
    action = "partition"
    groups = [["h1", "h2"], ["h3", "h4", "h5"]]

Actions and their arguments: ``partition`` (groups), ``one_way`` (src, dst: lists),
``unblock`` (src, dst), ``bridge`` (a, b, via), ``isolate`` (host), ``loss`` (hosts, p),
``heal_network``, ``kill`` / ``pause`` / ``resume`` / ``restart`` / ``stop`` / ``start``
(hosts), ``flap`` (a, b, period, times: the link between a and b goes down and up),
``rolling_restart`` (hosts, settle: one at a time, each after the previous rejoined),
``rotate_key``, ``register_duplicate`` (name, hosts), ``kill_all`` (hosts, optional: kill -9
of every daemon at once), ``fill_disk`` / ``free_disk`` (host, which needs a ``[disks]``
entry), ``write_burst`` (hosts, kind: majority or local, count: that many writes through each
host at once), ``wait``. After the last step and the duration, the runner heals everything
(network, filled disks, paused and dead daemons) and checks.
"""

from __future__ import annotations

import importlib.util
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos.disks import parse_size
from chaos.workload import WorkloadConfig

SHIPPED = Path(__file__).resolve().parent / "scenarios"

# Every action and the arguments it takes (checked when a scenario is loaded, so a typo
# fails before any namespace is created).
ACTIONS: dict[str, set[str]] = {
    "partition": {"groups"},
    "one_way": {"src", "dst"},
    "unblock": {"src", "dst"},
    "bridge": {"a", "b", "via"},
    "isolate": {"host"},
    "loss": {"hosts", "p"},
    "heal_network": set(),
    "kill": {"hosts"},
    "pause": {"hosts"},
    "resume": {"hosts"},
    "restart": {"hosts"},
    "stop": {"hosts"},
    "start": {"hosts"},
    "flap": {"a", "b", "period", "times"},
    "rolling_restart": {"hosts", "settle"},
    "rotate_key": set(),
    "register_duplicate": {"name", "hosts"},
    "kill_all": {"hosts"},
    "fill_disk": {"host"},
    "free_disk": {"host"},
    "write_burst": {"hosts", "kind", "count"},
    "wait": set(),
}
OPTIONAL = {"rolling_restart": {"hosts", "settle"}, "loss": set(), "kill_all": {"hosts"}}


@dataclass(slots=True)
class Step:
    at: float
    action: str
    args: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        args = " ".join(f"{k}={v}" for k, v in self.args.items())
        return f"{self.at:>5.1f}s {self.action} {args}".rstrip()


@dataclass(slots=True)
class Expect:
    conflicts: list[str] = field(default_factory=list)
    never_dead: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    keys_rotated: bool = False
    rejections: list[str] = field(default_factory=list)
    all_running: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "conflicts": self.conflicts,
            "never_dead": self.never_dead,
            "dead": self.dead,
            "keys_rotated": self.keys_rotated,
            "rejections": self.rejections,
            "all_running": self.all_running,
        }


@dataclass(slots=True)
class Scenario:
    name: str
    description: str = ""
    hosts: int = 5
    profile: str = "local"
    duration: float = 20.0
    converge_bound: float = 30.0
    settle: float = 2.0  # seconds after the cluster is up before the workload starts
    ci: bool = False
    disks: dict[str, str] = field(default_factory=dict)  # host -> small data disk ("16m")
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    expect: Expect = field(default_factory=Expect)
    steps: list[Step] = field(default_factory=list)
    source: str = ""

    def validate(self) -> None:
        hosts = {f"h{i}" for i in range(1, self.hosts + 1)}
        if self.hosts < 3:
            raise ValueError(f"{self.name}: at least 3 hosts")
        for step in self.steps:
            if step.action not in ACTIONS:
                raise ValueError(
                    f"{self.name}: unknown action {step.action!r} "
                    f"(one of {', '.join(sorted(ACTIONS))})"
                )
            allowed = ACTIONS[step.action]
            unknown = set(step.args) - allowed
            missing = allowed - set(step.args) - OPTIONAL.get(step.action, set())
            if unknown or missing:
                raise ValueError(
                    f"{self.name}: {step.action} at {step.at}s: "
                    f"unknown {sorted(unknown)}, missing {sorted(missing)}"
                )
            named = _hosts_in(step.args)
            if named - hosts:
                raise ValueError(f"{self.name}: unknown hosts {sorted(named - hosts)}")
            if step.at < 0 or step.at > self.duration:
                raise ValueError(f"{self.name}: step at {step.at}s outside 0..{self.duration}")
        for member in self.expect.dead + [m for m in self.expect.never_dead if m != "*"]:
            if member not in hosts:
                raise ValueError(f"{self.name}: expect names unknown host {member}")
        for host, size in self.disks.items():
            if host not in hosts:
                raise ValueError(f"{self.name}: [disks] names unknown host {host}")
            parse_size(size)
        for step in self.steps:
            if step.action in ("fill_disk", "free_disk") and step.args["host"] not in self.disks:
                raise ValueError(
                    f"{self.name}: {step.action} at {step.at}s: {step.args['host']} has no small "
                    "disk (add it under [disks])"
                )
            if step.action == "write_burst" and step.args["kind"] not in ("majority", "local"):
                raise ValueError(f"{self.name}: write_burst kind is majority or local")

    def disk_sizes(self) -> dict[str, int]:
        return {host: parse_size(size) for host, size in self.disks.items()}

    def describe(self) -> list[str]:
        return [s.describe() for s in self.steps]


def _hosts_in(args: dict[str, Any]) -> set[str]:
    found: set[str] = set()
    for key in ("host", "hosts", "groups", "src", "dst", "a", "b", "via"):
        value = args.get(key)
        if isinstance(value, str):
            found.add(value)
        elif isinstance(value, list):
            for v in value:
                found.update([v] if isinstance(v, str) else v)
    return found


def from_dict(data: dict[str, Any], source: str = "") -> Scenario:
    data = dict(data)
    steps = [
        Step(float(s.pop("at")), str(s.pop("action")), s)
        for s in (dict(x) for x in data.pop("step", []))
    ]
    workload = WorkloadConfig.from_dict(data.pop("workload", {}))
    disks = {str(h): str(size) for h, size in dict(data.pop("disks", {})).items()}
    expect = Expect(**data.pop("expect", {}))
    known = set(Scenario.__dataclass_fields__) - {"workload", "expect", "steps", "source"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{source}: unknown scenario settings: {', '.join(unknown)}")
    scenario = Scenario(
        **data,
        disks=disks,
        workload=workload,
        expect=expect,
        steps=sorted(steps, key=lambda s: s.at),
        source=source,
    )
    scenario.validate()
    return scenario


def load(path: str | Path) -> Scenario:
    """A scenario from a TOML file or a Python file that defines ``SCENARIO``."""
    path = Path(path)
    if path.suffix == ".py":
        spec = importlib.util.spec_from_file_location(f"chaos_scenario_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise ValueError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        scenario = getattr(module, "SCENARIO", None)
        if not isinstance(scenario, Scenario):
            raise ValueError(f"{path} defines no SCENARIO = chaos.scenario.Scenario(...)")
        scenario.source = str(path)
        scenario.validate()
        return scenario
    with open(path, "rb") as f:
        return from_dict(tomllib.load(f), str(path))


def shipped() -> list[Scenario]:
    """Every scenario in chaos/scenarios, in file-name order."""
    return [load(p) for p in sorted(SHIPPED.glob("*.toml"))]


def find(name_or_path: str) -> Scenario:
    """A shipped scenario by name, or a scenario file by path."""
    path = Path(name_or_path)
    if path.exists():
        return load(path)
    for scenario in shipped():
        if scenario.name == name_or_path:
            return scenario
    names = ", ".join(s.name for s in shipped())
    raise ValueError(f"no scenario {name_or_path!r} (shipped: {names})")
