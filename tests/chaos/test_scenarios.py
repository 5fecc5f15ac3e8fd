"""Scenario files: every shipped one loads and validates; mistakes fail before any host exists."""

from __future__ import annotations

from pathlib import Path

import pytest

from chaos.scenario import ACTIONS, find, from_dict, load, shipped

ISSUE = {
    "partition-heal",
    "one-way",
    "bridge",
    "flapping-link",
    "loss-20",
    "kill-minority",
    "pause-long",
    "pause-short",
    "rolling-restart",
    "key-rotation",
    "power-loss",
    "minority-writer",
    "disk-full",
}


def test_every_shipped_scenario_loads() -> None:
    scenarios = shipped()
    names = [s.name for s in scenarios]
    assert len(names) == len(set(names))
    assert set(names) == ISSUE
    for s in scenarios:
        assert s.steps, s.name
        assert s.description, s.name
        assert all(step.action in ACTIONS for step in s.steps)


def test_the_ci_subset_is_short_and_covers_partition_kill_pause_loss_power() -> None:
    ci = [s for s in shipped() if s.ci]
    assert {s.name for s in ci} == {
        "partition-heal",
        "kill-minority",
        "pause-long",
        "loss-20",
        "power-loss",
    }
    assert sum(s.duration for s in ci) <= 130  # + ~8 s per run for up, heal, check, down


def test_pause_scenarios_straddle_the_suspicion_timeout() -> None:
    # local profile, 5 members: suspicion timeout between 3 s and 18 s (docs/operations.md)
    def paused_for(name: str) -> list[float]:
        steps = find(name).steps
        starts = [s.at for s in steps if s.action == "pause"]
        ends = [s.at for s in steps if s.action == "resume"]
        return [b - a for a, b in zip(starts, ends, strict=True)]

    assert all(d < 3 for d in paused_for("pause-short"))
    assert all(d > 18 for d in paused_for("pause-long"))


@pytest.mark.parametrize(
    ("step", "error"),
    [
        ({"at": 1, "action": "explode"}, "unknown action"),
        ({"at": 1, "action": "kill", "host": "h1"}, "unknown"),
        ({"at": 1, "action": "partition"}, "missing"),
        ({"at": 1, "action": "kill", "hosts": ["h9"]}, "unknown hosts"),
        ({"at": 99, "action": "heal_network"}, "outside"),
        ({"at": 1, "action": "fill_disk", "host": "h2"}, "no small disk"),
        ({"at": 1, "action": "write_burst", "hosts": ["h1"], "kind": "x", "count": 1}, "kind"),
    ],
)
def test_mistakes_are_reported_when_loading(step: dict[str, object], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        from_dict({"name": "bad", "duration": 10, "step": [step]})


def test_durability_scenarios_use_what_they_test() -> None:
    power = find("power-loss")
    assert [s.action for s in power.steps] == ["kill_all", "start"]
    assert power.ci
    minority = find("minority-writer")
    isolated = next(s.args["host"] for s in minority.steps if s.action == "isolate")
    bursts = [s for s in minority.steps if s.action == "write_burst"]
    assert bursts and all(s.args["hosts"] == [isolated] for s in bursts)
    assert any(s.args["kind"] == "majority" for s in bursts)
    disk = find("disk-full")
    assert disk.disk_sizes() == {"h3": 16 << 20}
    assert [s.action for s in disk.steps if "disk" in s.action] == ["fill_disk", "free_disk"]
    assert disk.expect.never_dead == ["h3"]


def test_small_disks_are_validated() -> None:
    with pytest.raises(ValueError, match="unknown host"):
        from_dict({"name": "bad", "disks": {"h9": "16m"}})
    with pytest.raises(ValueError, match="disk size"):
        from_dict({"name": "bad", "disks": {"h1": "16 parsecs"}})
    with pytest.raises(ValueError, match="between 1m and 1g"):
        from_dict({"name": "bad", "disks": {"h1": "4k"}})


def test_unknown_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown scenario settings"):
        from_dict({"name": "bad", "duraton": 10})
    with pytest.raises(ValueError, match="unknown workload settings"):
        from_dict({"name": "bad", "workload": {"writerz": 1}})


def test_a_python_scenario_file(tmp_path: Path) -> None:
    path = tmp_path / "custom.py"
    path.write_text(
        "from chaos.scenario import Scenario, Step\n"
        "SCENARIO = Scenario(name='custom', duration=12, steps=[\n"
        "    Step(at=2 + i, action='pause' if i % 2 == 0 else 'resume', args={'hosts': ['h2']})\n"
        "    for i in range(4)])\n"
    )
    scenario = load(path)
    assert scenario.name == "custom"
    assert [s.action for s in scenario.steps] == ["pause", "resume", "pause", "resume"]
    assert find(str(path)).name == "custom"
    with pytest.raises(ValueError, match="no scenario"):
        find("no-such-scenario")
