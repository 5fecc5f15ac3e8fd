"""The chaos host layer against the real kernel: namespaces, a bridge, veths and nftables.

No mocks: every check sends real UDP datagrams between processes running in different network
namespaces. These tests need root, `ip` and `nft`. Elsewhere they skip with the reason; in CI
(``CI`` set, where they are expected to run) a missing prerequisite is a failure, not a
silent skip.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chaos import disks
from chaos.netns import (
    ChaosError,
    Conflict,
    HostNet,
    existing_links,
    existing_namespaces,
    render_ruleset,
    unavailable_reason,
)

REASON = unavailable_reason()
PORT = 9999

SINK = """
import socket, sys, time
want, wait = int(sys.argv[1]), float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[3])))
print("ready", flush=True)
deadline = time.monotonic() + wait
n = 0
while n < want and time.monotonic() < deadline:
    s.settimeout(max(0.001, deadline - time.monotonic()))
    try:
        s.recvfrom(2048)
        n += 1
    except TimeoutError:
        break
print(n, flush=True)
"""

SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[1])):
    s.sendto(b"chaos", (sys.argv[2], int(sys.argv[3])))
    time.sleep(0.0005)
"""

_counter = itertools.count()


@pytest.fixture
def require_host_layer() -> None:
    if REASON is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"chaos host-layer tests must run in CI, but: {REASON}")
    pytest.skip(f"chaos host layer unavailable: {REASON}")


@pytest.fixture
def make_net(require_host_layer: None, tmp_path: Path) -> Iterator[Callable[..., HostNet]]:
    """HostNets with a prefix and subnet unique to this test, closed whatever happens."""
    nets: list[HostNet] = []

    def make(hosts: int = 2, **kw: object) -> HostNet:
        k = next(_counter)
        kw.setdefault("prefix", f"mt{os.getpid() % 1000}{chr(ord('a') + k)}")
        kw.setdefault("subnet", f"10.77.{200 + k}.0/24")
        kw.setdefault("run_dir", tmp_path / f"run{k}")
        net = HostNet(hosts, **kw)  # type: ignore[arg-type]
        nets.append(net)
        return net

    yield make
    for net in nets:
        net.close()


def udp_count(net: HostNet, src: str, dst: str, count: int = 40, wait: float = 1.0) -> int:
    """How many of ``count`` datagrams sent from ``src`` arrive at ``dst``."""
    sink = net.popen(
        dst,
        [sys.executable, "-I", "-S", "-c", SINK, str(count), str(wait), str(PORT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sink.stdout is not None
    assert sink.stdout.readline().strip() == "ready"
    target = "127.0.0.1" if src == dst else net.addr(dst)
    sent = net.run(
        src, [sys.executable, "-I", "-S", "-c", SEND, str(count), target, str(PORT)], timeout=10
    )
    assert sent.returncode == 0, sent.stderr
    out, _ = sink.communicate(timeout=wait + 5)
    net.stop(sink)
    return int(out.strip())


def leftovers(net: HostNet) -> list[str]:
    names = {h.netns for h in net.hosts}
    links = {net.bridge, *(h.veth for h in net.hosts)}
    return sorted((names & existing_namespaces()) | (links & existing_links()))


def test_render_ruleset_is_one_atomic_replacement() -> None:
    script = render_ruleset(["ip saddr { 10.0.0.2 } drop"], exempt=["10.0.0.1"])
    lines = script.splitlines()
    assert lines[:3] == [
        "table inet meshd_chaos",
        "delete table inet meshd_chaos",
        "table inet meshd_chaos {",
    ]
    assert "type filter hook input priority filter; policy accept;" in script
    # loopback and the controller are accepted before any fault rule
    assert lines.index('\t\tiifname "lo" accept') < lines.index("\t\tip saddr 10.0.0.1 accept")
    assert lines.index("\t\tip saddr 10.0.0.1 accept") < lines.index(
        "\t\tip saddr { 10.0.0.2 } drop"
    )


@pytest.mark.root
def test_hosts_reach_each_other_over_udp(make_net: Callable[..., HostNet]) -> None:
    with make_net(2) as net:
        assert [h.addr for h in net.hosts] == [str(net.subnet[2]), str(net.subnet[3])]
        assert udp_count(net, "h1", "h2") == 40
        assert udp_count(net, "h2", "h1") == 40
        assert udp_count(net, "h1", "h1") == 40  # loopback is up inside the host


@pytest.mark.root
def test_loss_applies_to_arriving_packets(make_net: Callable[..., HostNet]) -> None:
    with make_net(2) as net:
        net.set_loss("h2", 1.0)
        assert udp_count(net, "h1", "h2", wait=0.5) == 0
        assert udp_count(net, "h2", "h1") == 40  # input-only: h2's own sends still go out
        assert udp_count(net, "h2", "h2") == 40  # loopback is exempt
        net.set_loss("h2", 0.3)
        got = udp_count(net, "h1", "h2", count=400, wait=1.5)
        assert 200 <= got <= 340, got  # ~280 expected; bounds are > 6 sigma wide
        counted = net.counters("h2")
        assert counted["arriving"] >= 400
        assert counted["loss 30%"] >= 400 - got  # what the rule dropped is what went missing
        net.set_loss("h2", 0)
        assert udp_count(net, "h1", "h2") == 40
        with pytest.raises(ValueError, match="whole percent"):
            net.set_loss("h2", 0.105)


@pytest.mark.root
def test_block_is_one_way(make_net: Callable[..., HostNet]) -> None:
    with make_net(2) as net:
        net.block("h1", "h2")
        assert udp_count(net, "h1", "h2", wait=0.5) == 0
        assert udp_count(net, "h2", "h1") == 40
        net.unblock("h1", "h2")
        assert udp_count(net, "h1", "h2") == 40


@pytest.mark.root
def test_link_loss_is_one_way(make_net: Callable[..., HostNet]) -> None:
    with make_net(3) as net:
        net.set_link_loss("h1", "h2", 1.0)
        assert udp_count(net, "h1", "h2", wait=0.5) == 0
        assert udp_count(net, "h2", "h1") == 40  # the other direction is untouched
        assert udp_count(net, "h3", "h2") == 40  # and so is everyone else's link to h2
        net.set_link_loss("h1", "h2", 0.3)
        got = udp_count(net, "h1", "h2", count=400, wait=1.5)
        assert 200 <= got <= 340, got  # ~280 expected; bounds are > 6 sigma wide
        assert net.counters("h2")["loss h1 -> h2 30%"] >= 400 - got
        net.set_link_loss("h1", "h2", 0)
        assert udp_count(net, "h1", "h2") == 40


TCP_CONNECT = """
import socket, sys
s = socket.socket()
s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("connected")
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timeout")
"""


@pytest.mark.root
def test_isolate_silences_a_host_both_ways_without_resets(
    make_net: Callable[..., HostNet],
) -> None:
    with make_net(3) as net:
        net.isolate("h2")
        assert udp_count(net, "h1", "h2", wait=0.5) == 0
        assert udp_count(net, "h2", "h3", wait=0.5) == 0
        assert udp_count(net, "h1", "h3") == 40  # the others still talk
        # A TCP connect to a port nobody listens on in the isolated host times out: its
        # kernel never sees the SYN, so it answers no reset (a crashed process would).
        probe = [sys.executable, "-I", "-S", "-c", TCP_CONNECT, net.addr("h2"), "9", "1.0"]
        assert net.run("h1", probe, timeout=10, text=True).stdout.strip() == "timeout"
        net.heal()
        assert net.run("h1", probe, timeout=10, text=True).stdout.strip() == "refused"
        assert udp_count(net, "h1", "h2") == 40


@pytest.mark.root
def test_partition_and_heal(make_net: Callable[..., HostNet]) -> None:
    with make_net(3) as net:
        net.partition([["h1"], ["h2", "h3"]])
        assert udp_count(net, "h1", "h2", wait=0.5) == 0
        assert udp_count(net, "h3", "h1", wait=0.5) == 0
        assert udp_count(net, "h2", "h3") == 40
        net.heal()
        assert "drop" not in net.ruleset("h1")
        assert udp_count(net, "h1", "h2") == 40
        assert udp_count(net, "h3", "h1") == 40


@pytest.mark.root
def test_close_removes_everything_even_after_an_error(make_net: Callable[..., HostNet]) -> None:
    net = make_net(2)
    with pytest.raises(RuntimeError, match="boom"), net:
        net.set_loss("h1", 0.5)
        sleeper = net.popen("h2", ["sleep", "60"])
        assert leftovers(net)
        raise RuntimeError("boom")
    assert sleeper.poll() is not None
    assert leftovers(net) == []
    assert not net.state_path.exists()
    assert not net.run_dir.exists()


@pytest.mark.root
def test_cleanup_after_a_crash(make_net: Callable[..., HostNet], tmp_path: Path) -> None:
    net = make_net(2)
    child = f"""
import json, sys, time
from chaos.netns import HostNet
net = HostNet(2, prefix={net.prefix!r}, subnet={str(net.subnet)!r}, run_dir={str(net.run_dir)!r})
net.start()
net.set_loss("h1", 0.2)
net.mount_tmpfs("h1", {str(tmp_path / "disk")!r}, 1 << 20)
p = net.popen("h1", ["sleep", "60"])
print(json.dumps({{"pid": p.pid}}), flush=True)
time.sleep(60)
"""
    crashed = subprocess.Popen(
        [sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    try:
        assert crashed.stdout is not None
        sleeper = json.loads(crashed.stdout.readline())["pid"]
        assert leftovers(net)
        with pytest.raises(Conflict, match="in use"):
            net.start()  # the owner is alive: not ours to touch
    finally:
        crashed.send_signal(signal.SIGKILL)
        crashed.wait()
    assert net.state_path.exists()
    assert disks.mount_fstype(tmp_path / "disk") == "tmpfs"
    removed = net.cleanup()
    assert f"pid {sleeper}" in removed
    assert f"tmpfs {tmp_path / 'disk'}" in removed
    assert disks.mount_fstype(tmp_path / "disk") is None
    assert leftovers(net) == []
    deadline = time.monotonic() + 5
    while Path(f"/proc/{sleeper}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{sleeper}").exists()


@pytest.mark.root
def test_a_small_disk_fills_frees_and_goes_away(make_net: Callable[..., HostNet]) -> None:
    net = make_net(2)
    net.start()
    path = net.run_dir / "h1" / "data"
    net.mount_tmpfs("h1", path, 2 << 20)
    assert [m["host"] for m in net.mounts()] == ["h1"]
    # A process in the host (ip netns exec: its own mount namespace) sees the same disk.
    seen = net.run("h1", ["stat", "-f", "-c", "%T", str(path)], text=True)
    assert seen.stdout.strip() == "tmpfs"
    assert disks.fill(path) > 1 << 20
    assert disks.filled(path)
    with pytest.raises(OSError) as full:
        (path / "more").write_bytes(bytes(8192))
    assert full.value.errno == errno.ENOSPC
    assert disks.free(path) > 1 << 20
    (path / "more").write_bytes(bytes(8192))  # room again
    assert disks.free(path) == 0  # nothing left to free
    net.close()
    assert disks.mount_fstype(path) is None
    assert leftovers(net) == []


@pytest.mark.root
def test_start_reclaims_its_own_leftovers(make_net: Callable[..., HostNet]) -> None:
    first = make_net(2)
    first.start()
    first._release_lock()  # simulate a crash: the state file stays, the lock is free
    second = HostNet(2, prefix=first.prefix, subnet=str(first.subnet), run_dir=first.run_dir)
    try:
        second.start()
        assert udp_count(second, "h1", "h2") == 40
    finally:
        second.close()
    assert leftovers(second) == []


@pytest.mark.root
def test_refuses_names_and_subnets_that_are_not_ours(make_net: Callable[..., HostNet]) -> None:
    net = make_net(2)
    foreign = f"{net.prefix}2"
    subprocess.run(["ip", "netns", "add", foreign], check=True)
    try:
        with pytest.raises(Conflict, match=f"network namespace {foreign} exists"):
            net.start()
        assert foreign in existing_namespaces()  # not ours: left alone
    finally:
        subprocess.run(["ip", "netns", "del", foreign], check=True)
    assert leftovers(net) == []
    with pytest.raises(Conflict, match="overlaps"):
        make_net(2, subnet="127.0.0.0/24").start()
    with pytest.raises(ChaosError, match="not started"):
        net.set_loss("h1", 0.1)
