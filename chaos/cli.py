"""``chaos``: isolated meshd hosts, faults, workloads and a checker, from the command line.

    chaos up 5                          # 5 hosts, one meshd each; returns, cluster keeps running
    chaos partition h1,h2 '|' h3,h4,h5  # two-way
    chaos partition --one-way h1 '->' h2
    chaos bridge --via h3 h1,h2 '|' h4,h5
    chaos isolate h4 ; chaos loss h2 20% ; chaos loss all 5%
    chaos kill h5 ; chaos pause h4 ; chaos resume h4 ; chaos restart h2
    chaos kill-all                      # kill -9 of every daemon at once (a power cut)
    chaos up 5 --small-disk h3=16m ; chaos fill-disk h3 ; chaos free-disk h3
    chaos heal [--all]                  # network faults (--all: also resume and restart)
    chaos rotate-key
    chaos workload --duration 60        # real client traffic, recorded in the run's history
    chaos check [--json]                # observe, then judge every invariant
    chaos down                          # remove everything (by pid; state file)
    chaos run --all [--json]            # every shipped scenario, each on a fresh cluster

Each command is its own process: ``up`` leaves the daemons running (detached, listed with
their pids and start times in the run directory's state file) and every later command
attaches to that state. See docs/chaos.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.table import Table

from chaos.backends import DaemonSpec
from chaos.checker import check
from chaos.cluster import Cluster, call, default_run_dir, new_key, wait_majority
from chaos.disks import parse_size
from chaos.faults import parse_groups, percent_of
from chaos.history import load as load_history
from chaos.netns import DEFAULT_PREFIX, DEFAULT_SUBNET, ChaosError, HostNet
from chaos.observe import collect, watch_convergence
from chaos.report import print_suite, print_verdict
from chaos.runner import DEFAULT_RESULTS, RunOptions, run_scenario, summary
from chaos.scenario import Scenario, find, shipped
from chaos.workload import WorkloadConfig, open_workload
from meshd_client.protocol.errors import MeshError

out = Console()
err = Console(stderr=True, soft_wrap=True)
WORKLOAD_PID = "workload.pid"


# ---------------------------------------------------------------------------- helpers


def _run_dir(args: argparse.Namespace) -> Path:
    return Path(args.run_dir) if args.run_dir else default_run_dir(args.prefix)


def _attach(args: argparse.Namespace) -> Cluster:
    return Cluster.attach(_run_dir(args))


def _with_cluster(args: argparse.Namespace, fn: Callable[[Cluster], Any]) -> Any:
    """Attach, act, detach (the cluster keeps running)."""
    cluster = _attach(args)
    try:
        return fn(cluster)
    finally:
        cluster.detach()


def _hosts(cluster: Cluster, spec: str) -> list[str]:
    if spec == "all":
        return cluster.hosts
    hosts = [h.strip() for h in spec.split(",") if h.strip()]
    unknown = sorted(set(hosts) - set(cluster.hosts))
    if unknown:
        raise ChaosError(f"unknown hosts {unknown} (hosts: {', '.join(cluster.hosts)})")
    return hosts


def _loss(text: str) -> float:
    """``20%``, ``20`` or ``0.2`` -> 0.2."""
    value = float(text.rstrip("%"))
    if text.endswith("%") or value > 1:
        value /= 100
    percent_of(value)  # whole percent, 0..100
    return value


def _arrow(tokens: Sequence[str]) -> tuple[list[str], list[str]]:
    text = " ".join(tokens)
    if "->" not in text:
        raise ChaosError("one-way partitions are written SRC -> DST, e.g. h1 '->' h2,h3")
    left, right = text.split("->", 1)
    src = [h.strip() for h in left.replace(" ", ",").split(",") if h.strip()]
    dst = [h.strip() for h in right.replace(" ", ",").split(",") if h.strip()]
    if not src or not dst:
        raise ChaosError("one-way partitions need hosts on both sides of '->'")
    return src, dst


def _trio(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    return anyio.run(fn, *args, backend="trio")


# ---------------------------------------------------------------------------- commands


def _small_disks(specs: Sequence[str]) -> dict[str, int]:
    """``["h3=16m"]`` -> ``{"h3": 16777216}``."""
    out: dict[str, int] = {}
    for spec in specs:
        host, sep, size = spec.partition("=")
        if not sep or not host.strip():
            raise ChaosError(f"--small-disk {spec!r}: write HOST=SIZE, e.g. h3=16m")
        out[host.strip()] = parse_size(size)
    return out


def cmd_up(args: argparse.Namespace) -> int:
    spec = DaemonSpec(profile=args.profile, key=new_key(), log_level=args.log_level)
    disks = _small_disks(args.small_disk)
    unknown = sorted(set(disks) - {f"h{i}" for i in range(1, args.hosts + 1)})
    if unknown:
        raise ChaosError(f"--small-disk names unknown hosts {unknown}")
    cluster = Cluster.create(
        args.hosts,
        backend=args.backend,
        prefix=args.prefix,
        subnet=args.subnet,
        run_dir=_run_dir(args),
        spec=spec,
        docker_net=args.docker_net,
        build=not args.no_build,
        disks=disks,
    )
    try:
        if not args.no_wait:
            took = cluster.wait_ready(args.timeout)
            err.print(f"[green]{args.hosts} hosts up, one membership view after {took:.1f} s[/]")
        _print_status(cluster)
    except BaseException:
        cluster.close()
        raise
    cluster.detach()
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    run_dir = _run_dir(args)
    try:
        cluster = Cluster.attach(run_dir)
    except (ChaosError, FileNotFoundError, KeyError, ValueError) as exc:
        # No usable cluster file: remove whatever the host layer's state file lists.
        err.print(f"[yellow]{exc}; cleaning up from the state file[/]")
        return cmd_cleanup(args)
    cluster.close(keep=Path(args.keep) if args.keep else None)
    err.print(f"[green]cluster in {run_dir} removed[/]")
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    """After a crash of the harness: remove what the state file lists, by pid and name."""
    run_dir = _run_dir(args)
    if (run_dir / "docker-state.json").exists():
        return _cleanup_docker(run_dir)
    if not (run_dir / "state.json").exists():
        err.print(f"nothing to clean in {run_dir}")
        return 0
    data = json.loads((run_dir / "state.json").read_text())
    net = HostNet(
        [h["name"] for h in data["hosts"]],
        prefix=data["prefix"],
        subnet=data["subnet"],
        bridge=data["bridge"],
        run_dir=run_dir,
    )
    removed = net.cleanup()
    with contextlib.suppress(OSError):
        for item in (run_dir / "cluster.json", run_dir / "docker-state.json"):
            item.unlink(missing_ok=True)
    for line in removed:
        err.print(f"removed {line}")
    return 0


def _cleanup_docker(run_dir: Path) -> int:
    """The Docker backend's leftovers: the compose project's containers and network (by
    its label too), the small disks' mounts, the state files."""
    from chaos.docker import STATE_FILE, DockerBackend

    try:
        spec = DaemonSpec.from_json(json.loads((run_dir / "cluster.json").read_text())["spec"])
    except (OSError, ValueError, KeyError):
        spec = DaemonSpec()
    backend = DockerBackend.attach(run_dir, spec)
    project = backend.project
    backend.close()
    with contextlib.suppress(OSError):
        for item in (run_dir / "cluster.json", run_dir / STATE_FILE):
            item.unlink(missing_ok=True)
    err.print(f"removed the containers and network of compose project {project}")
    return 0


def _print_status(cluster: Cluster) -> None:
    table = Table(title=f"chaos cluster in {cluster.run_dir} ({cluster.backend.kind})")
    for col in ("host", "address", "meshd", "alive seen", "socket"):
        table.add_column(col)

    async def alive(host: str) -> str:
        try:
            members = await call(cluster, host, "members", timeout=1.0)
        except MeshError as exc:
            return exc.kind.value
        return str(sum(1 for m in members if m["status"] == "alive"))

    for host in cluster.hosts:
        pid = cluster.backend.daemon_pid(host)
        state = "down" if pid is None else f"pid {pid}"
        if host in cluster.paused:
            state += " [yellow]paused[/]"
        seen = "—" if pid is None or host in cluster.paused else _trio(alive, host)
        table.add_row(host, cluster.backend.addr(host), state, seen, cluster.socket(host))
    out.print(table)
    faults = cluster.backend.faults.describe()
    faults += [
        f"disk {h} full" for h in cluster.backend.small_disks() if cluster.backend.disk_filled(h)
    ]
    out.print("faults: " + ("; ".join(faults) if faults else "none"))


def cmd_status(args: argparse.Namespace) -> int:
    if args.json:

        def status(c: Cluster) -> dict[str, Any]:
            return {
                "run_dir": str(c.run_dir),
                "backend": c.backend.kind,
                "hosts": {
                    h: {
                        "addr": c.backend.addr(h),
                        "pid": c.backend.daemon_pid(h),
                        "paused": h in c.paused,
                        "socket": c.socket(h),
                    }
                    for h in c.hosts
                },
                "faults": c.backend.faults.to_json(),
                "disks": {
                    h: {"size": size, "full": c.backend.disk_filled(h)}
                    for h, size in c.backend.small_disks().items()
                },
            }

        print(json.dumps(_with_cluster(args, status), indent=2))
    else:
        _with_cluster(args, _print_status)
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    if "--one-way" in args.groups:
        args.groups.remove("--one-way")
        args.one_way = True
    if not args.groups:
        raise ChaosError("partition needs groups: A,B '|' C,D  or  --one-way A '->' B")
    if args.one_way:
        src, dst = _arrow(args.groups)
        _with_cluster(args, lambda c: c.one_way(_hosts(c, ",".join(src)), _hosts(c, ",".join(dst))))
        err.print(f"{','.join(src)} can no longer reach {','.join(dst)} (the reverse still works)")
        return 0
    groups = parse_groups(" ".join(args.groups))
    _with_cluster(args, lambda c: c.partition([_hosts(c, ",".join(g)) for g in groups]))
    err.print("partitioned: " + " | ".join(",".join(g) for g in groups))
    return 0


def cmd_bridge(args: argparse.Namespace) -> int:
    groups = parse_groups(" ".join(args.groups))
    if len(groups) != 2:
        raise ChaosError("a bridge partition has two sides: A,B '|' C,D")
    via = args.via.split(",")
    _with_cluster(args, lambda c: c.bridge(groups[0], groups[1], _hosts(c, ",".join(via))))
    err.print(f"{','.join(groups[0])} | {','.join(groups[1])}, bridged by {','.join(via)}")
    return 0


def cmd_isolate(args: argparse.Namespace) -> int:
    _with_cluster(args, lambda c: c.isolate(_hosts(c, args.host)[0]))
    return 0


def cmd_loss(args: argparse.Namespace) -> int:
    p = _loss(args.p)
    _with_cluster(args, lambda c: c.loss(_hosts(c, args.hosts), p))
    err.print(f"{args.hosts}: {p:.0%} of arriving packets dropped")
    return 0


def _process_cmd(action: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        def act(c: Cluster) -> None:
            for host in _hosts(c, args.hosts):
                getattr(c, action)(host)
                err.print(f"{action} {host}")

        _with_cluster(args, act)
        return 0

    return run


def cmd_kill_all(args: argparse.Namespace) -> int:
    codes = _with_cluster(args, lambda c: c.kill_all(_hosts(c, args.hosts)))
    err.print("killed at once: " + ", ".join(f"{h} ({code})" for h, code in codes.items()))
    return 0


def cmd_fill_disk(args: argparse.Namespace) -> int:
    written = _with_cluster(args, lambda c: c.fill_disk(_hosts(c, args.host)[0]))
    err.print(f"{args.host}: disk full ({written} bytes of filler)")
    return 0


def cmd_free_disk(args: argparse.Namespace) -> int:
    freed = _with_cluster(args, lambda c: c.free_disk(_hosts(c, args.host)[0]))
    err.print(f"{args.host}: {freed} bytes freed (the daemon must recover by itself)")
    return 0


def cmd_heal(args: argparse.Namespace) -> int:
    if args.all:
        _with_cluster(args, lambda c: c.heal())
        err.print("healed: no network faults, no full disk, every daemon running")
    else:
        _with_cluster(args, lambda c: c.heal_network())
        err.print("network healed (paused or killed daemons stay so; `chaos heal --all`)")
    return 0


def cmd_rotate_key(args: argparse.Namespace) -> int:
    result = _with_cluster(args, lambda c: c.rotate_key())
    for step, res in result["steps"].items():
        err.print(f"keys {step}: {res['acknowledged']}/{res['members']} members")
    return 0


def cmd_workload(args: argparse.Namespace) -> int:
    cluster = _attach(args)
    cluster.backend.detach()  # never hold the run's lock: fault commands run meanwhile
    pid_file = cluster.run_dir / WORKLOAD_PID
    pid_file.write_text(str(os.getpid()))
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    config = WorkloadConfig(request_timeout=args.request_timeout)

    async def main() -> None:
        await wait_majority(cluster)
        cluster.history.add("workload", seed=seed, duration=args.duration)
        async with open_workload(cluster, cluster.history, config, random.Random(seed)) as wl:
            wl.start_drivers()
            with anyio.move_on_after(args.duration):
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        break
            err.print("workload: stopping; waiting for operations in flight")
            await wl.stop_drivers()

    try:
        _trio(main)
    finally:
        pid_file.unlink(missing_ok=True)
        cluster.history.close()
    ops = [e for e in load_history(cluster.run_dir / "history.jsonl") if e.get("type") == "op"]
    err.print(f"workload done: {len(ops)} operations recorded (seed {seed})")
    return 0


def _wait_workload(run_dir: Path, timeout: float) -> None:
    pid_file = run_dir / WORKLOAD_PID
    deadline = time.monotonic() + timeout
    while pid_file.exists() and time.monotonic() < deadline:
        try:
            os.kill(int(pid_file.read_text()), 0)
        except (ProcessLookupError, ValueError):
            break
        time.sleep(0.5)


def cmd_check(args: argparse.Namespace) -> int:
    run_dir = _run_dir(args)
    _wait_workload(run_dir, args.wait_workload)
    cluster = _attach(args)
    try:
        events = load_history(run_dir / "history.jsonl")
        if not any(e.get("type") == "meta" for e in events):
            cluster.history.add(
                "meta",
                scenario="manual",
                seed=None,
                hosts=cluster.hosts,
                backend=cluster.backend.kind,
                workload=any(e.get("type") == "op" for e in events),
                expect={"all_running": False},
            )

        agents = {e["agent"] for e in events if e.get("op") == "request" and "agent" in e}

        async def observe() -> None:
            await watch_convergence(cluster, cluster.history, args.bound, after="check")
            await collect(cluster, cluster.history, None, bound=args.bound, agents=agents)

        _trio(observe)
        cluster.history.close()
        verdict = check(load_history(run_dir / "history.jsonl"))
    finally:
        cluster.detach()
    if args.json:
        print(json.dumps(verdict.to_json(), indent=2, default=str))
    else:
        print_verdict(verdict, out)
    return 0 if verdict.ok else 1


def cmd_scenarios(_args: argparse.Namespace) -> int:
    table = Table(title="shipped scenarios")
    for col in ("name", "ci", "hosts", "duration", "schedule", "description"):
        table.add_column(col, overflow="fold")
    for s in shipped():
        table.add_row(
            s.name,
            "yes" if s.ci else "",
            str(s.hosts),
            f"{s.duration:.0f} s",
            "\n".join(s.describe()),
            " ".join(s.description.split()),
        )
    out.print(table)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    scenarios: list[Scenario]
    if args.all:
        scenarios = shipped()
    elif args.ci:
        scenarios = [s for s in shipped() if s.ci]
    else:
        scenarios = [find(name) for name in args.scenarios]
    if not scenarios:
        raise ChaosError("name scenarios, or use --all / --ci (see `chaos scenarios`)")
    options = RunOptions(
        prefix=args.prefix,
        subnet=args.subnet,
        backend=args.backend,
        results=Path(args.results),
        keep_logs=args.keep_logs,
        seed=args.seed,
        docker_net=args.docker_net,
    )

    async def main() -> list[Any]:
        verdicts = []
        async with anyio.create_task_group() as tg:

            async def on_sigterm() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        err.print(f"{name}: stopping and cleaning up")
                        tg.cancel_scope.cancel()

            tg.start_soon(on_sigterm)
            for scenario in scenarios:
                err.print(f"[bold]▶ {scenario.name}[/] ({scenario.duration:.0f} s of faults)")
                verdict = await run_scenario(scenario, options)
                verdicts.append(verdict)
                if not args.json:
                    print_verdict(verdict, out)
                else:
                    mark = "[green]PASS[/]" if verdict.ok else "[red]FAIL[/]"
                    err.print(f"  {mark} in {verdict.duration_s} s, seed {verdict.seed}")
            tg.cancel_scope.cancel()
        return verdicts

    verdicts = _trio(main)
    if len(verdicts) < len(scenarios):
        err.print("interrupted; every cluster was removed")
        return 130
    result = summary(verdicts)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print_suite(result, out)
    return 0 if result["failed"] == 0 else 1


# ---------------------------------------------------------------------------- parser


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chaos", description="meshd chaos testing (docs/chaos.md)")
    p.add_argument(
        "--prefix",
        default=os.environ.get("CHAOS_PREFIX", DEFAULT_PREFIX),
        help="name prefix of namespaces, links and containers (default %(default)s)",
    )
    p.add_argument("--run-dir", help="the run directory (default /run/meshd-chaos/PREFIX)")
    # The same two options after the command too (`chaos run --prefix x ...`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--prefix", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--run-dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)

    up = add("up", help="create N hosts, one meshd each, and leave them running")
    up.add_argument("hosts", type=int)
    up.add_argument("--subnet", default=DEFAULT_SUBNET, help="IPv4 /24 for the hosts (netns)")
    up.add_argument("--profile", default="local", help="meshd timing profile")
    up.add_argument("--log-level", default="info")
    up.add_argument("--backend", choices=("netns", "docker"), default="netns")
    up.add_argument("--docker-net", help="first three octets of the compose network (docker)")
    up.add_argument("--no-build", action="store_true", help="docker: do not build the image")
    up.add_argument("--no-wait", action="store_true", help="return before the view converged")
    up.add_argument("--timeout", type=float, default=60.0)
    up.add_argument(
        "--small-disk",
        action="append",
        default=[],
        metavar="HOST=SIZE",
        help="a tmpfs of SIZE (e.g. 16m) as HOST's data directory, for fill-disk",
    )
    up.set_defaults(fn=cmd_up)

    down = add("down", help="stop every daemon, remove every namespace/link/rule")
    down.add_argument("--keep", metavar="DIR", help="copy logs and history here first")
    down.set_defaults(fn=cmd_down)
    add("cleanup", help="after a harness crash: remove what the state file lists").set_defaults(
        fn=cmd_cleanup
    )

    status = add("status", help="hosts, daemons and active faults")
    status.add_argument("--json", action="store_true")
    status.set_defaults(fn=cmd_status)

    part = add("partition", help="A,B '|' C,D (two-way) or --one-way A '->' B")
    part.add_argument("--one-way", action="store_true")
    # REMAINDER: '->' looks like an option to argparse
    part.add_argument("groups", nargs=argparse.REMAINDER, help="A,B '|' C,D  or  A '->' B")
    part.set_defaults(fn=cmd_partition)

    bridge = add("bridge", help="--via X A,B '|' C,D: X sees both sides")
    bridge.add_argument("--via", required=True)
    bridge.add_argument("groups", nargs="+")
    bridge.set_defaults(fn=cmd_bridge)

    iso = add("isolate", help="cut one host off from every other")
    iso.add_argument("host")
    iso.set_defaults(fn=cmd_isolate)

    loss = add("loss", help="HOSTS P: drop P of packets arriving at HOSTS")
    loss.add_argument("hosts", help="a host, h1,h2, or all")
    loss.add_argument("p", help="20%%, 20 or 0.2")
    loss.set_defaults(fn=cmd_loss)

    for action, text in (
        ("kill", "SIGKILL the daemon (kill -9)"),
        ("pause", "SIGSTOP the daemon"),
        ("resume", "SIGCONT the daemon"),
        ("restart", "graceful stop, then a fresh start"),
        ("stop", "graceful stop (SIGTERM: the daemon leaves)"),
        ("start", "start a stopped or killed daemon"),
    ):
        cmd = add(action, help=text)
        cmd.add_argument("hosts", help="a host, h1,h2, or all")
        cmd.set_defaults(fn=_process_cmd(action))

    kill_all = add("kill-all", help="SIGKILL every daemon at once (a power cut)")
    kill_all.add_argument("hosts", nargs="?", default="all", help="all (default) or h1,h2")
    kill_all.set_defaults(fn=cmd_kill_all)

    fill = add("fill-disk", help="fill a host's small disk (up --small-disk) until ENOSPC")
    fill.add_argument("host")
    fill.set_defaults(fn=cmd_fill_disk)
    free = add("free-disk", help="delete what fill-disk wrote")
    free.add_argument("host")
    free.set_defaults(fn=cmd_free_disk)

    heal = add("heal", help="remove every network fault")
    heal.add_argument(
        "--all", action="store_true", help="also free full disks, resume and restart daemons"
    )
    heal.set_defaults(fn=cmd_heal)

    add("rotate-key", help="install, use a new gossip key; remove the old").set_defaults(
        fn=cmd_rotate_key
    )

    wl = add("workload", help="run the recorded client workload for a while")
    wl.add_argument("--duration", type=float, default=60.0)
    wl.add_argument("--seed", type=int)
    wl.add_argument("--request-timeout", type=float, default=30.0)
    wl.set_defaults(fn=cmd_workload)

    chk = add("check", help="observe the cluster and judge every invariant")
    chk.add_argument("--json", action="store_true")
    chk.add_argument("--bound", type=float, default=30.0, help="seconds allowed to converge")
    chk.add_argument("--wait-workload", type=float, default=120.0)
    chk.set_defaults(fn=cmd_check)

    add("scenarios", help="list the shipped scenarios").set_defaults(fn=cmd_scenarios)

    run = add("run", help="run scenarios, each on a fresh cluster, and check them")
    run.add_argument("scenarios", nargs="*", help="shipped scenario names or scenario files")
    run.add_argument("--all", action="store_true", help="every shipped scenario")
    run.add_argument("--ci", action="store_true", help="the short CI subset")
    run.add_argument("--json", action="store_true")
    run.add_argument("--seed", type=int)
    run.add_argument("--results", default=str(DEFAULT_RESULTS))
    run.add_argument("--keep-logs", action="store_true", help="keep logs of passing runs too")
    run.add_argument("--backend", choices=("netns", "docker"), default="netns")
    run.add_argument("--subnet", default=DEFAULT_SUBNET)
    run.add_argument("--docker-net", help="first three octets of the compose network (docker)")
    run.set_defaults(fn=cmd_run, prefix_default=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "run" and args.prefix == DEFAULT_PREFIX:
        args.prefix = "mshr"  # scenario runs never touch a hand-made `chaos up` cluster
    try:
        code: int = args.fn(args)
        return code
    except (ChaosError, ValueError, KeyError) as exc:
        err.print(f"[red]chaos: {exc}[/]")
        return 1
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except BaseExceptionGroup as group:
        # Ctrl-C inside the event loop arrives wrapped; everything was cleaned up on the way.
        if group.subgroup(KeyboardInterrupt) is not None:
            err.print("interrupted")
            return 130
        raise


if __name__ == "__main__":
    sys.exit(main())
