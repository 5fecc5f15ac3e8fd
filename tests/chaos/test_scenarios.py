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


def test_the_ci_subset_is_short_and_covers_partition_kill_pause_loss() -> None:
    ci = [s for s in shipped() if s.ci]
    assert {s.name for s in ci} == {"partition-heal", "kill-minority", "pause-long", "loss-20"}
    assert sum(s.duration for s in ci) <= 120  # + ~6 s per run for up, heal, check, down


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
    ],
)
def test_mistakes_are_reported_when_loading(step: dict[str, object], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        from_dict({"name": "bad", "duration": 10, "step": [step]})


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
