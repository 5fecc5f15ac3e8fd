"""Rich rendering of API results for meshctl (tables for people, JSON for scripts)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

STATUS_STYLE = {"alive": "green", "suspect": "yellow", "dead": "bold red", "left": "dim"}


def ago(timestamp: float, now: float | None = None) -> str:
    seconds = max(0.0, (now if now is not None else time.time()) - timestamp)
    if seconds < 60:
        return f"{seconds:.1f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m ago"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h ago"
    return f"{seconds / 86400:.1f}d ago"


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def members_table(members: Iterable[Mapping[str, Any]], title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold")
    for column in ("name", "address", "status", "incarnation", "tags", "last change"):
        table.add_column(column, justify="right" if column == "incarnation" else "left")
    now = time.time()
    for m in members:
        tags = ", ".join(
            f"{k}={v}" for k, v in sorted(m.get("tags", {}).items()) if not k.startswith("meshd.")
        )
        since = m.get("since")
        table.add_row(
            str(m.get("name", "")),
            str(m.get("addr", "")),
            status_text(str(m.get("status", ""))),
            str(m.get("incarnation", "")),
            tags,
            ago(since, now) if isinstance(since, int | float) else "",
        )
    return table


def info_table(info: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key in (
        "node",
        "version",
        "addr",
        "profile",
        "incarnation",
        "joined",
        "awareness",
        "encrypted",
        "keys",
        "label",
        "uptime_s",
        "socket",
    ):
        if key in info:
            table.add_row(key, str(info[key]))
    protocols = info.get("protocols")
    if isinstance(protocols, dict):
        table.add_row(
            "protocols",
            ", ".join(
                f"{k} {'/'.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in protocols.items()
            ),
        )
    store = info.get("store")
    if isinstance(store, dict):
        table.add_row("store", store_line(store))
    counts = info.get("members", {})
    table.add_row("members", ", ".join(f"{k} {v}" for k, v in counts.items()))
    for key, value in info.get("stats", {}).items():
        shown = (
            ", ".join(f"{k}={v}" for k, v in sorted(value.items())) or "none"
            if isinstance(value, dict)
            else str(value)
        )
        table.add_row(key, shown)
    return table


def store_line(store: dict[str, Any]) -> Text:
    """The store in one line: memory only, or health, documents and directory."""
    docs = f"{store.get('documents', 0)} documents"
    if not store.get("enabled"):
        return Text(f"memory only (storage.enabled = false), {docs}", "red")
    if not store.get("healthy"):
        return Text(f"FAILING ({store.get('failure')}), {docs} in {store.get('directory')}", "red")
    return Text(f"ok, {docs} in {store.get('directory')}", "green")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def storage_table(status: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    if not status.get("enabled"):
        table.add_row("storage", Text("disabled: memory only, nothing survives a restart", "red"))
        table.add_row("documents", str(status.get("documents", 0)))
        return table
    healthy = status.get("healthy")
    table.add_row(
        "health",
        Text("ok", "green")
        if healthy
        else Text(f"FAILING ({status.get('failure')}): {status.get('failure_detail')}", "red"),
    )
    table.add_row("directory", str(status.get("directory")))
    table.add_row("documents", str(status.get("documents")))
    table.add_row("on disk", _size(int(status.get("disk_bytes", 0))))
    table.add_row(
        "snapshot",
        f"{_size(int(status.get('snapshot_bytes', 0)))}, "
        + (ago(status["last_snapshot"]) if status.get("last_snapshot") else "none this run"),
    )
    table.add_row("log since snapshot", _size(int(status.get("log_bytes", 0))))
    table.add_row(
        "last fsync", ago(status["last_sync"]) if status.get("last_sync") else "none this run"
    )
    mean = status.get("fsync_mean_ms")
    table.add_row("fsync mean", f"{mean} ms" if mean is not None else "-")
    table.add_row("waiting for disk", _size(int(status.get("pending_bytes", 0))))
    failures = status.get("failures") or {}
    table.add_row("errors", ", ".join(f"{k}={v}" for k, v in sorted(failures.items())) or "none")
    if status.get("last_error"):
        table.add_row("last error", str(status["last_error"]))
    return table


def keys_table(result: dict[str, Any]) -> Table:
    total = result.get("members", 0)
    table = Table(
        title=f"keys {result.get('op')}: {result.get('acknowledged')}/{total} members answered",
        title_justify="left",
        header_style="bold",
    )
    table.add_column("key id")
    table.add_column("installed on", justify="right")
    table.add_column("primary on", justify="right")
    primaries = result.get("primaries", {})
    for kid, count in sorted(result.get("keys", {}).items()):
        table.add_row(kid, f"{count}/{total}", f"{primaries.get(kid, 0)}/{total}")
    return table


def key_failures(result: dict[str, Any]) -> list[str]:
    return [
        f"{name}: {r.get('error')}"
        for name, r in sorted(result.get("results", {}).items())
        if not r.get("ok")
    ]


def console(json_mode: bool = False) -> Console:
    return Console(highlight=False, soft_wrap=json_mode)


def agents_table(result: dict[str, Any], title: str | None = None) -> Table:
    shown = result.get("agents", [])
    count = result.get("count", len(shown))
    suffix = f" ({len(shown)} of {count} shown)" if count > len(shown) else f" ({count})"
    table = Table(title=(title or "agents") + suffix, title_justify="left", header_style="bold")
    for column in ("name", "node", "kind", "capabilities", "metadata", "registered"):
        table.add_column(column)
    now = time.time()
    for a in shown:
        meta = ", ".join(f"{k}={v}" for k, v in sorted(a.get("metadata", {}).items()))
        at = a.get("registered_at")
        table.add_row(
            str(a.get("name", "")),
            str(a.get("node", "")),
            str(a.get("kind", "")),
            ", ".join(a.get("capabilities", [])),
            meta,
            ago(at / 1000, now) if isinstance(at, int) else "",
        )
    return table


def registry_event(event: dict[str, Any]) -> Text:
    kind = str(event.get("kind", ""))
    entry = event.get("entry", {})
    style = {
        "registered": "green",
        "unregistered": "dim",
        "moved": "cyan",
        "conflict": "bold red",
    }.get(kind, "")
    text = Text(f"{kind:<12}", style=style)
    text.append(f" {event.get('name')} on {entry.get('node')}")
    if kind == "moved":
        text.append(f" (was on {event.get('previous', {}).get('node')})")
    if kind == "conflict":
        text.append(f" lost to the entry on {event.get('winner', {}).get('node')}")
    return text


def state_table(docs: Iterable[dict[str, Any]]) -> Table:
    table = Table(title="state documents", title_justify="left", header_style="bold")
    table.add_column("name")
    table.add_column("epoch", justify="right")
    table.add_column("bytes", justify="right")
    for d in docs:
        table.add_row(str(d.get("name")), str(d.get("epoch")), str(d.get("bytes")))
    return table


def kinds_table(kinds: dict[str, dict[str, dict[str, Any]]]) -> Table:
    table = Table(title="agent kinds", title_justify="left", header_style="bold")
    for column in ("kind", "host", "active", "capacity", "strategy", "draining"):
        table.add_column(column, justify="right" if column in ("active", "capacity") else "left")
    for kind, hosts in sorted(kinds.items()):
        for host, info in sorted(hosts.items()):
            table.add_row(
                kind,
                host,
                str(info.get("active")),
                str(info.get("capacity")),
                str(info.get("strategy")),
                "yes" if info.get("draining") else "",
            )
    return table
