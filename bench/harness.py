"""What every benchmark command does around its measurement.

A run directory (daemon logs, configs) that is removed after a good run and kept, and named,
after a failed or interrupted one; SIGTERM (or Ctrl-C) ends a run cleanly — every process
it started is ended by pid on the way out — with exit status 130; the result goes out as
one JSON object (``--json``) or as the benchmark's own table.
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
from rich.console import Console

Result = dict[str, Any]
err = Console(stderr=True, soft_wrap=True)


async def until_sigterm(measure: Callable[[], Awaitable[Result]]) -> Result:
    """Run ``measure``; SIGTERM cancels it (raised as KeyboardInterrupt, like Ctrl-C)."""
    result: Result = {}
    async with anyio.create_task_group() as tg:

        async def on_sigterm() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    err.print("SIGTERM: stopping and cleaning up")
                    tg.cancel_scope.cancel()

        tg.start_soon(on_sigterm)
        result = await measure()
        tg.cancel_scope.cancel()
    if not result:
        raise KeyboardInterrupt
    return result


def run(
    prefix: str,
    measure: Callable[[Path], Result],
    *,
    keep: bool,
    as_json: bool,
    table: Callable[[Result], None],
    interrupted: str = "interrupted; every process was ended by its pid",
) -> int:
    """Measure in a fresh run directory and print the result; the process exit status."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    result: Result | None = None
    stopped = False
    try:
        result = measure(root)
    except* KeyboardInterrupt:
        stopped = True
    finally:
        if result is not None and not keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            err.print(f"run directory kept: {root}")
    if stopped or result is None:
        err.print(interrupted)
        return 130
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        table(result)
    return 0


def subset(option: str, value: str, allowed: Sequence[str]) -> list[str]:
    """A comma-separated subset of ``allowed`` (``--phases``, ``--engines``); exits naming
    the names it does not know."""
    chosen = [v for v in value.split(",") if v]
    unknown = sorted(set(chosen) - set(allowed))
    if unknown or not chosen:
        raise SystemExit(f"{option}: unknown {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(allowed)}")  # fmt: skip
    return chosen


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> None:
    """SIGTERM ends the run like Ctrl-C, for benchmarks that run several event loops in turn
    (``until_sigterm`` covers one)."""
    signal.signal(signal.SIGTERM, _interrupt)
