"""Fixtures for end-to-end tests: real meshd processes on loopback, cleaned up by pid."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshd.testing.localcluster import LocalCluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path / "cluster", profile="local")
    try:
        yield c
    finally:
        codes = c.stop_all()
        for name, daemon in c.daemons.items():
            if daemon.starts and "Traceback" in daemon.log_text():
                print(f"--- {name} log ---\n{daemon.log_text()[-4000:]}")
        del codes
