"""Shared fixtures for the chaos tests: the host-layer gate and names that cannot collide.

Tests that need root, namespaces and nftables skip with the reason where those are missing,
and fail instead when ``CI`` is set (CI is where they must run). Names and subnets include
this process's pid, so two test sessions on one machine (or a hand-made ``chaos up``
cluster) never collide.
"""

from __future__ import annotations

import itertools
import os

import pytest

from chaos.netns import unavailable_reason

HOST_LAYER = unavailable_reason()
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
