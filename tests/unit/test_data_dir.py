"""The daemon creates its data directory at start: mode 0700, missing parents too."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshd.config.model import ConfigError
from meshd.node.node import make_data_dir


@pytest.fixture
def umask() -> Iterator[None]:
    """A umask that would take the owner's write bit off: the mode must not depend on it."""
    old = os.umask(0o277)
    try:
        yield
    finally:
        os.umask(old)


def test_the_data_dir_is_created_with_mode_0700_parents_too(tmp_path: Path, umask: None) -> None:
    target = tmp_path / "a" / "b" / "data"
    make_data_dir(str(target))
    for directory in (tmp_path / "a", tmp_path / "a" / "b", target):
        assert directory.is_dir()
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    os.chmod(target, 0o750)
    make_data_dir(str(target))
    assert stat.S_IMODE(target.stat().st_mode) == 0o750  # an existing one is left alone


def test_a_data_dir_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError) as info:
        make_data_dir(str(tmp_path / "file" / "data"))
    assert info.value.key == "node.data_dir"
    with pytest.raises(ConfigError, match="not a directory"):
        make_data_dir(str(tmp_path / "file"))
