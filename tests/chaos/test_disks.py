"""Small disks for the disk-full fault: sizes, mount detection, and the refusal to fill
anything but a tmpfs mount point (the real mounts are tested in test_netns.py)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from chaos.disks import FILLER, fill, filled, free, mount_fstype, parse_size

MOUNTINFO = """\
22 1 252:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 0:35 / /run/meshd-chaos/mshr/h3/data rw,relatime shared:20 - tmpfs chaos-mshr rw,size=16384k
41 22 0:36 / /tmp/with\\040space rw - tmpfs chaos-x rw,size=1024k
42 22 0:37 / /run/meshd-chaos/mshr/h3/data rw - ext4 /dev/vdb rw
"""


def test_parse_size() -> None:
    assert parse_size("16m") == 16 << 20
    assert parse_size("1G") == 1 << 30
    assert parse_size("2048k") == 2 << 20
    assert parse_size("1048576") == 1 << 20
    for bad in ("", "16 m", "16t", "-1m", "512k", "2g"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_mount_fstype_reads_the_last_mount_at_exactly_that_path() -> None:
    assert mount_fstype("/tmp/with space", MOUNTINFO) == "tmpfs"
    assert mount_fstype("/", MOUNTINFO) == "ext4"
    assert mount_fstype("/run/meshd-chaos/mshr/h3/data", MOUNTINFO) == "ext4"  # mounted over
    assert mount_fstype("/run/meshd-chaos/mshr/h3", MOUNTINFO) is None
    assert mount_fstype("/run/meshd-chaos/mshr/h3/data/store", MOUNTINFO) is None


def test_never_fills_or_frees_what_is_not_a_tmpfs_mount(tmp_path: Path) -> None:
    for action in (fill, free):
        with pytest.raises(OSError) as raised:
            action(tmp_path)
        assert raised.value.errno == errno.EINVAL
    assert not (tmp_path / FILLER).exists()
    assert not filled(tmp_path)
