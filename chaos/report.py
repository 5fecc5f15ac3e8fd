"""Verdicts for people (rich tables) and for machines (JSON)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from chaos.checker import Verdict

PASS = "[green]PASS[/green]"  # noqa: S105 (a verdict label)
FAIL = "[bold red]FAIL[/bold red]"


def verdict_table(verdict: Verdict) -> Table:
    title = f"{verdict.scenario}: {PASS if verdict.ok else FAIL}"
    if verdict.seed is not None:
        title += f"  (seed {verdict.seed})"
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("invariant")
    table.add_column("", justify="center")
    table.add_column("what was found", overflow="fold")
    for c in verdict.checks:
        table.add_row(c.name, PASS if c.ok else FAIL, c.summary)
    return table


def suite_table(result: dict[str, Any]) -> Table:
    table = Table(title="chaos suite", title_justify="left")
    cols = ("scenario", "verdict", "ops ok/all", "lost", "local lost", "dup", "converge", "took")
    for col in (*cols, "seed"):
        table.add_column(col, justify="left" if col in ("scenario", "verdict") else "right")
    for s in result["scenarios"]:
        ops = [v for k, v in s["stats"].items() if isinstance(v, dict)]
        ok = sum(v.get("ok", 0) for v in ops)
        total = sum(sum(v.values()) for v in ops)
        failed = [c["name"] for c in s["checks"] if not c["ok"]]
        table.add_row(
            s["scenario"],
            PASS if s["passed"] else f"{FAIL} {', '.join(failed)}",
            f"{ok}/{total}",
            str(s["lost_writes"]),
            str(s.get("lost_local_writes", 0)),
            str(s["duplicate_deliveries"]),
            "—" if s["converge_s"] is None else f"{s['converge_s']:.1f} s",
            "—" if s["duration_s"] is None else f"{s['duration_s']:.0f} s",
            str(s["seed"]),
        )
    return table


def print_verdict(verdict: Verdict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(verdict_table(verdict))
    for c in verdict.checks:
        if not c.ok and c.details:
            console.print(f"[red]{c.name}[/red] details: {c.details}", soft_wrap=True)


def print_suite(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    console.print(suite_table(result))
    console.print(
        f"passed {result['passed']}, failed {result['failed']}, "
        f"lost writes {result['lost_writes']} (acknowledged majority writes lost: "
        f"{result.get('lost_majority_writes', 0)}; local writes lost, allowed after a kill: "
        f"{result.get('lost_local_writes', 0)}), duplicate deliveries "
        f"{result['duplicate_deliveries']}, slowest convergence {result['max_converge_s']} s"
    )
