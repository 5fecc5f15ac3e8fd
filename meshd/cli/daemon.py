"""``meshd``: run the daemon, generate a key, check a configuration."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict

import trio

from meshd import __version__
from meshd.config import add_run_arguments, build_config, overrides_from_args
from meshd.config.model import Config, ConfigError
from meshd.logs import configure_logging, kv
from meshd.storage.store import StoreCorrupt


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshd", description="CRDT gossip mesh daemon.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon in the foreground")
    add_run_arguments(run)
    check = sub.add_parser("config", help="validate a configuration and print the result")
    add_run_arguments(check)
    sub.add_parser("keygen", help="print a new random 32-byte gossip key (base64)")
    storage = sub.add_parser("storage", help="check or repair this node's store (daemon stopped)")
    storage.add_argument("action", choices=("check", "repair"))
    storage.add_argument(
        "--data-dir",
        metavar="PATH",
        default=os.environ.get("MESHD_NODE_DATA_DIR", "/var/lib/meshd"),
        help="the node's data directory (default: $MESHD_NODE_DATA_DIR or /var/lib/meshd)",
    )
    sub.add_parser("version", help="print the version")
    return parser


def _load(ns: argparse.Namespace) -> Config:
    return build_config(ns.config, os.environ, overrides_from_args(ns))


def _config_dict(config: Config) -> dict[str, object]:
    data = asdict(config)
    data["security"]["keys"] = [
        f"<{len(base64.b64decode(k))}-byte key>" for k in config.security.keys
    ]
    return data


def _raise_open_files_limit(wanted: int = 65536) -> None:
    """Each peer costs a daemon up to four sockets (two persistent links each way), more than
    the common soft limit of 1,024 descriptors allows past a few hundred peers: raise the
    soft limit towards the hard one (the systemd unit sets both)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # keep the limit we have; accept errors are counted and logged


def _return_large_buffers(threshold: int = 256 << 10) -> None:
    """Make glibc serve every allocation of ``threshold`` bytes or more with its own mapping,
    given back to the system when freed. By default the threshold rises to the largest
    block freed so far (up to 32 MiB): after a burst of large frames (a peer's 8 MiB sync, a
    client's 1 MiB requests), later buffers of that size come from the heap, and the heap,
    fragmented by the small objects in between, keeps its size after the burst is over.
    Setting the threshold fixes it. Elsewhere than glibc this does nothing."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold = -3
    mallopt(ctypes.c_int(m_mmap_threshold), ctypes.c_int(threshold))


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _describe(exc: BaseException) -> str:
    """One line: an OSError without its errno prefix (its message names what failed)."""
    if isinstance(exc, ConfigError):
        return f"configuration error: {exc}"
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc)


def _storage(action: str, directory: str) -> int:
    from meshd.storage import repair
    from meshd.storage.files import OsFiles, StoreLocked

    files = OsFiles()
    if action == "check":
        report = repair.check(files, directory)
        print(json.dumps(asdict(report), indent=2))
        if report.in_use:
            print(
                "note: a daemon is using this store; its unfinished writes may show",
                file=sys.stderr,
            )
        return 0 if report.ok else 1
    try:
        done = repair.repair(files, directory)
    except StoreLocked:
        print("meshd: the store is in use: stop the daemon first", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"meshd: repair failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(done), indent=2))
    print(
        f"repaired: {done.documents} documents kept; the original files are in "
        f"{done.quarantine}. Start the daemon: it resyncs the rest from its peers.",
        file=sys.stderr,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    if ns.command == "version":
        print(f"meshd {__version__}")
        return 0
    if ns.command == "keygen":
        print(base64.b64encode(os.urandom(32)).decode())
        return 0
    if ns.command == "storage":
        return _storage(ns.action, os.path.join(ns.data_dir, "store"))
    try:
        config = _load(ns)
    except ConfigError as exc:
        print(f"meshd: configuration error: {exc}", file=sys.stderr)
        return 2
    if ns.command == "config":
        print(json.dumps(_config_dict(config), indent=2, default=str))
        return 0
    configure_logging(config.log.level, config.log.format)
    if config.overridden:
        logging.getLogger("meshd").info(
            "configuration: settings given in more than one place (the last one named won)",
            extra=kv(overridden="; ".join(config.overridden)),
        )
    _raise_open_files_limit()
    _return_large_buffers()
    from meshd.node.node import Node

    async def serve() -> int:
        node = await Node.open(config, reload=lambda: _load(ns))
        return await node.run()

    try:
        return trio.run(serve)
    except BaseExceptionGroup as group:
        # Raised inside the daemon's nursery: report what went wrong, one line each.
        leaves = _leaves(group)
        if not all(isinstance(e, ConfigError | OSError | StoreCorrupt) for e in leaves):
            raise
        for leaf in leaves:
            print(f"meshd: {_describe(leaf)}", file=sys.stderr)
        return 1 if any(isinstance(e, StoreCorrupt) for e in leaves) else 2
    except ConfigError as exc:
        print(f"meshd: configuration error: {exc}", file=sys.stderr)
        return 2
    except StoreCorrupt as exc:
        print(
            f"meshd: the store cannot be read: {exc}\n"
            f"  Check it with:   meshd storage check --data-dir {config.node.data_dir}\n"
            f"  Way out:         meshd storage repair --data-dir {config.node.data_dir}\n"
            "                   (moves the unreadable files aside; this node then starts from "
            "what is left and resyncs the rest from its peers)",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        print(f"meshd: {_describe(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
