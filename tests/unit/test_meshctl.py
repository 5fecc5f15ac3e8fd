"""meshctl without a daemon: Serf-style member filters, the common options anywhere on the
command line, usage errors (exit 2) and the generated shell completion scripts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from meshd.cli import completion
from meshd.cli.filters import FilterError, MemberFilter
from meshd.cli.meshctl import EXIT_USAGE, main, parser

MEMBERS: list[dict[str, Any]] = [
    {"name": "web-1", "status": "alive", "tags": {"role": "web", "zone": "a"}},
    {"name": "web-2", "status": "suspect", "tags": {"role": "web"}},
    {"name": "db-1", "status": "dead", "tags": {"role": "db", "zone": "a"}},
    {"name": "xweb-1", "status": "left", "tags": {}},
]


def chosen(status: str | None = None, name: str | None = None, *tags: str) -> list[str]:
    return [str(m["name"]) for m in MemberFilter.parse(status, name, tags).select(MEMBERS)]


def test_no_filter_keeps_everyone() -> None:
    assert chosen() == ["web-1", "web-2", "db-1", "xweb-1"]


def test_filters_are_anchored_regular_expressions() -> None:
    assert chosen(name="web-.") == ["web-1", "web-2"]  # not xweb-1: the whole name must match
    assert chosen(name="web") == []
    assert chosen(status="alive|suspect") == ["web-1", "web-2"]
    assert chosen(status="ali") == []


def test_every_filter_must_match() -> None:
    assert chosen("alive|dead", None, "zone=a") == ["web-1", "db-1"]
    assert chosen(None, "web.*", "role=web", "zone=a") == ["web-1"]


def test_a_missing_tag_is_matched_as_empty() -> None:
    assert chosen(None, None, "zone=") == ["web-2", "xweb-1"]
    assert chosen(None, None, "zone=.*") == ["web-1", "web-2", "db-1", "xweb-1"]


@pytest.mark.parametrize(
    ("status", "name", "tags"),
    [("(", None, ()), (None, "[a", ()), (None, None, ("role",)), (None, None, ("=web",))],
)
def test_bad_filters_are_refused(status: str | None, name: str | None, tags: tuple[str]) -> None:
    with pytest.raises(FilterError):
        MemberFilter.parse(status, name, tags)


def test_common_options_go_before_or_after_the_command() -> None:
    p = parser()
    assert p.parse_args(["members"]).format == "table"
    assert p.parse_args(["--json", "members"]).format == "json"
    assert p.parse_args(["members", "--json"]).format == "json"
    assert p.parse_args(["members", "--format", "json"]).format == "json"
    assert p.parse_args(["keys", "list", "--json"]).format == "json"
    # Given before the command, not reset by the command's own defaults.
    ns = p.parse_args(["--socket", "/s", "--timeout", "3", "--json", "state", "list"])
    assert (ns.socket, ns.timeout, ns.format) == ("/s", 3.0, "json")
    ns = p.parse_args(["info", "--socket", "/t"])
    assert (ns.socket, ns.timeout, ns.format) == ("/t", 10.0, "table")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nosuch"],
        ["members", "--status"],
        ["members", "--name", "("],
        ["members", "--tag", "novalue"],
        ["info", "--format", "xml"],
        ["completion", "fish"],
    ],
)
def test_usage_errors_exit_2_without_a_daemon(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--socket", "/nonexistent/meshd.sock", *argv])
    assert exited.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("usage: meshctl") and ": error: " in err


def test_completion_table_follows_the_parser() -> None:
    t = completion.table(parser())
    assert "completion" in t.words["meshctl"]
    assert t.words["meshctl keys"] == ["list", "install", "use", "remove"]
    assert t.words["meshctl storage"] == ["status", "snapshot"]
    assert "--tag" in t.options["meshctl members"]
    assert "--json" in t.options["meshctl keys install"]
    assert t.values["--format"] == ["table", "json"]
    assert t.values["--timeout"] == []  # a free value: skipped, nothing offered
    assert "--json" not in t.values and "--watch" not in t.values  # flags take no value


def write_script(shell: str, tmp_path: Path) -> Path:
    done = subprocess.run(
        [sys.executable, "-m", "meshd.cli.meshctl", "completion", shell],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    path = tmp_path / f"meshctl.{shell}"
    path.write_text(done.stdout)
    return path


def test_bash_completion(tmp_path: Path) -> None:
    script = write_script("bash", tmp_path)
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    # Run the completion function as bash would: the words so far -> what it offers.
    probe = (
        f"source {script}\n"
        't() { COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _meshctl; echo "${COMPREPLY[*]}"; }\n'
        "t meshctl ke\nt meshctl keys ''\nt meshctl --format json st\n"
        "t meshctl members --status ''\nt meshctl members --ta\nt meshctl --format j\n"
        "t meshctl --socket /x state w\nt meshctl storage ''\nt meshctl --timeout 5 k\n"
    )
    lines = subprocess.run(
        ["bash", "--norc", "-c", probe], check=True, capture_output=True, text=True, timeout=30
    ).stdout.splitlines()
    assert lines == [
        "keys",
        "list install use remove",
        "storage state",
        "alive suspect dead left",
        "--tag",
        "json",
        "watch",
        "status snapshot",
        "kinds keys",
    ]


def test_zsh_completion(tmp_path: Path) -> None:
    script = write_script("zsh", tmp_path)
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed (make system-deps installs it)")
    subprocess.run(["zsh", "-n", str(script)], check=True, timeout=30)
    # compadd is stubbed to print what is offered (zsh itself filters by the prefix typed).
    probe = (
        f"source {script}\n"
        'compadd() { [[ $1 == -- ]] && shift; print -r -- "$*"; }\n'
        "_files() { print files; }\n"
        't() { words=("$@"); CURRENT=$#; _meshctl; }\n'
        "t meshctl keys ''\nt meshctl --timeout 3 state ''\nt meshctl --socket ''\n"
        "t meshctl members --status ''\nt meshctl storage --\n"
    )
    lines = subprocess.run(
        ["zsh", "-f", "-c", probe], check=True, capture_output=True, text=True, timeout=30
    ).stdout.splitlines()
    assert lines == [
        "list install use remove",
        "get watch list",
        "files",
        "alive suspect dead left",
        "--help --socket --format --json --timeout",
    ]
